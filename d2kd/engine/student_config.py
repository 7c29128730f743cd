"""The distilled student as a plain detectron2 config, written next to its weights.

``plain_student_config`` turns a distillation config into the config of its student:
``MODEL.META_ARCHITECTURE`` is the student's, ``MODEL.WEIGHTS`` the student-only weights, and
the keys vanilla detectron2 does not know are left out: ``DISTILL.*`` and ``D2KD.*`` always,
d2kd's trainer keys (``SOLVER.OPTIMIZER``, ``SOLVER.BETAS``) always, and d2kd's model keys
(``MODEL.FPN.TOP_BLOCK``, ``MODEL.FCOS.*``, ``MODEL.*`` keys of config extensions) unless the
student is built from a component registered outside detectron2 (DigitsDet's
``build_scalable_resnet_fpn_backbone``, d2kd's ``FCOS``), which reads them. So a student of
stock detectron2 components (the COCO configs) loads with ``get_cfg().merge_from_file(path)``
alone; the others need their components imported (``import d2kd``) and are loaded with
``d2kd.config.get_d2kd_cfg()`` or with ``get_cfg()`` after ``cfg.set_new_allowed(True)``.
The file starts with a comment saying which case it is.
"""
import logging
import os
import textwrap
from typing import List, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import (
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    RPN_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
)

from ..config import load_config
from ..modeling.distillation_detector import student_config
from ..utils.io import atomic_write_text

logger = logging.getLogger(__name__)

# Every config key that names a registered component of a yacs detectron2 model.
_COMPONENT_KEYS = [
    ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
    ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
    ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY),
    ("MODEL.RPN.HEAD_NAME", RPN_HEAD_REGISTRY),
    ("MODEL.ANCHOR_GENERATOR.NAME", ANCHOR_GENERATOR_REGISTRY),
    ("MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY),
    ("MODEL.ROI_BOX_HEAD.NAME", ROI_BOX_HEAD_REGISTRY),
    ("MODEL.ROI_MASK_HEAD.NAME", ROI_MASK_HEAD_REGISTRY),
    ("MODEL.ROI_KEYPOINT_HEAD.NAME", ROI_KEYPOINT_HEAD_REGISTRY),
    ("MODEL.SEM_SEG_HEAD.NAME", SEM_SEG_HEADS_REGISTRY),
]


def student_config_path(weights_path: str) -> str:
    """Where the plain config of ``weights_path`` goes: same folder and name, ``.yaml``."""
    return os.path.splitext(weights_path)[0] + ".yaml"


def load_student_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """A config file (plain, or a distillation config) as the config of the model to deploy:
    a distillation config becomes its student's (``DISTILL.STUDENT_META_ARCHITECTURE``)."""
    cfg = load_config(config_file, opts)
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        cfg = student_config(cfg)
    return cfg


def components_outside_detectron2(cfg: CfgNode) -> List[str]:
    """``KEY=NAME (module)`` of every component ``cfg`` names that detectron2 does not
    register itself (``not registered`` for a name no imported module registered)."""
    outside = []
    for key, registry in _COMPONENT_KEYS:
        name = cfg
        for part in key.split("."):
            name = name[part]
        if not name:  # e.g. ROI_BOX_HEAD.NAME is "" by default
            continue
        try:
            module = getattr(registry.get(name), "__module__", "") or ""
        except KeyError:
            module = "not registered"
        if module != "detectron2" and not module.startswith("detectron2."):
            outside.append(f"{key}={name} ({module})")
    return outside


def _drop_unknown_keys(node: CfgNode, known: CfgNode, keep_model_keys: bool, prefix: str = ""):
    for name in list(node.keys()):
        key = prefix + name
        if name not in known:
            if not (keep_model_keys and key.startswith("MODEL.")):
                del node[name]
        elif isinstance(node[name], CfgNode) and isinstance(known[name], CfgNode):
            _drop_unknown_keys(node[name], known[name], keep_model_keys, key + ".")


def plain_student_config(cfg: CfgNode, weights: str) -> CfgNode:
    """The student of ``cfg`` (a distillation or a plain config) as a config that vanilla
    detectron2 loads, with ``MODEL.WEIGHTS = weights`` (see the module docstring)."""
    student = student_config(cfg) if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector" \
        else cfg.clone()
    student.defrost()
    student.MODEL.WEIGHTS = weights
    outside = components_outside_detectron2(student)
    _drop_unknown_keys(student, get_cfg(), keep_model_keys=bool(outside))
    return student


def _header(outside: List[str]) -> str:
    lines = ["The student of a d2kd distillation as a plain detectron2 config (no DISTILL / "
             "D2KD keys)."]
    if not outside:
        lines.append("Stock detectron2 components only: load it with detectron2's "
                     "get_cfg().merge_from_file(); d2kd is not needed.")
    else:
        lines += ["Components registered outside detectron2: " + ", ".join(outside) + ".",
                  "Import them first (`import d2kd`), then load it with "
                  "d2kd.config.get_d2kd_cfg().merge_from_file(), or with detectron2's get_cfg() "
                  "after cfg.set_new_allowed(True) (the d2kd MODEL keys they read are below)."]
    return "".join(f"# {line}\n" for paragraph in lines
                   for line in textwrap.wrap(paragraph, 92))


def write_student_config(cfg: CfgNode, weights_path: str) -> str:
    """Atomically write :func:`plain_student_config` of ``cfg`` next to ``weights_path``
    (``MODEL.WEIGHTS`` is its absolute path); returns the config's path."""
    plain = plain_student_config(cfg, os.path.abspath(weights_path))
    path = student_config_path(weights_path)
    atomic_write_text(path, _header(components_outside_detectron2(plain)) + plain.dump())
    logger.info("Wrote the student's plain detectron2 config to %s", path)
    return path
