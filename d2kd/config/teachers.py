"""Which teachers a distillation config names, and where their configs and weights are.

``DISTILL.TEACHER.CONFIGS`` accepts three kinds of entry (docs/teachers.md):

- a yacs ``.yaml`` file (a d2kd or detectron2 detector config), relative to the config file
  that lists it;
- a LazyConfig ``.py`` file whose ``model`` is a detector (detectron2's ``new_baselines``,
  its LazyConfig RetinaNet / FCOS / Mask R-CNN, or your own);
- a name in detectron2's model zoo, written ``model_zoo://<path in the zoo>``, e.g.
  ``model_zoo://COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml`` or
  ``model_zoo://new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``, resolved with
  ``detectron2.model_zoo``; its weights default to the zoo's trained model;
- a file of detectron2's ``projects/`` folder (not part of a pip-installed detectron2),
  written ``detectron2_projects://<path under projects/>``, e.g.
  ``detectron2_projects://ViTDet/configs/COCO/cascade_mask_rcnn_swin_b_in21k_50ep.py``,
  found under ``$DETECTRON2_PROJECTS`` or the ``projects/`` of the source checkout detectron2
  runs from (d2kd/compat/projects.py); its weights must be given.

Weights, in order: ``DISTILL.TEACHER.WEIGHTS[i]`` when given; the zoo's trained checkpoint
for a model-zoo name; the yacs file's ``MODEL.WEIGHTS``. A LazyConfig file's
``train.init_checkpoint`` is the *initialisation* of that model's training (e.g. ImageNet),
never a trained teacher, so it is not used. Local paths and every URL detectron2's
``PathManager`` resolves (``detectron2://``, ``https://``) are accepted.
"""
import os
from dataclasses import dataclass
from typing import List, Union

from detectron2.config import CfgNode, LazyConfig
from omegaconf import DictConfig

from ..compat.projects import missing_transformer_backbones, projects_dir, projects_dir_candidates
from .loading import ConfigError, load_config

MODEL_ZOO_PREFIX = "model_zoo://"
PROJECTS_PREFIX = "detectron2_projects://"

YACS, LAZY = "yacs", "lazy"


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of ``DISTILL.TEACHER.CONFIGS`` resolved to files."""

    index: int
    reference: str  # as written in DISTILL.TEACHER.CONFIGS
    config_file: str  # the local config file
    kind: str  # YACS or LAZY
    weights: str  # local path or URL; "" when none was given (an error when building)


def _config_kind(path: str, reference: str) -> str:
    if path.endswith(".py"):
        return LAZY
    if path.endswith((".yaml", ".yml")):
        return YACS
    raise ConfigError(f"DISTILL.TEACHER.CONFIGS: {reference} is neither a yacs .yaml nor a "
                      "LazyConfig .py file.")


def _zoo_config_file(name: str) -> str:
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise ConfigError(
            f"DISTILL.TEACHER.CONFIGS: {MODEL_ZOO_PREFIX}{name} is not in detectron2's model "
            "zoo; use a path under detectron2/model_zoo/configs, e.g. "
            f"{MODEL_ZOO_PREFIX}COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml.") from None


def _projects_config_file(name: str) -> str:
    """The file ``name`` (a path under detectron2's ``projects/``) on this machine."""
    root = projects_dir()
    if root is None:
        raise ConfigError(
            f"DISTILL.TEACHER.CONFIGS: {PROJECTS_PREFIX}{name} needs detectron2's projects/ "
            "folder, which a pip-installed detectron2 does not contain; set "
            "DETECTRON2_PROJECTS to the projects/ folder of a detectron2 source checkout "
            f"(looked at {projects_dir_candidates()}).")
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ConfigError(f"DISTILL.TEACHER.CONFIGS: {PROJECTS_PREFIX}{name}: no file {path} "
                          f"(detectron2 projects/ folder {root}).")
    return path


def _zoo_weights(name: str) -> str:
    from detectron2 import model_zoo

    try:
        return model_zoo.get_checkpoint_url(name)
    except RuntimeError:
        raise ConfigError(
            f"{MODEL_ZOO_PREFIX}{name} has no trained checkpoint in detectron2's model zoo; "
            "give the teacher's weights in DISTILL.TEACHER.WEIGHTS.") from None


def teacher_specs(cfg: CfgNode) -> List[TeacherSpec]:
    """Every teacher of ``cfg`` with its config file, kind and weights."""
    configs, weights = list(cfg.DISTILL.TEACHER.CONFIGS), list(cfg.DISTILL.TEACHER.WEIGHTS)
    if not configs:
        raise ConfigError("MODEL.META_ARCHITECTURE is DistillationDetector but "
                          "DISTILL.TEACHER.CONFIGS is empty; list the teacher configs.")
    if weights and len(weights) != len(configs):
        raise ConfigError(f"DISTILL.TEACHER.WEIGHTS has {len(weights)} entries for "
                          f"{len(configs)} teacher configs; give one per teacher (or none).")
    specs = []
    for index, reference in enumerate(configs):
        if reference.startswith(MODEL_ZOO_PREFIX):
            config_file = _zoo_config_file(reference[len(MODEL_ZOO_PREFIX):])
        elif reference.startswith(PROJECTS_PREFIX):
            config_file = _projects_config_file(reference[len(PROJECTS_PREFIX):])
        else:
            config_file = reference
            if not os.path.isfile(config_file):
                raise ConfigError(f"Teacher config {config_file} does not exist; check "
                                  "DISTILL.TEACHER.CONFIGS.")
        kind = _config_kind(config_file, reference)
        given = weights[index] if weights else ""
        if not given and reference.startswith(MODEL_ZOO_PREFIX):
            given = _zoo_weights(reference[len(MODEL_ZOO_PREFIX):])
        specs.append(TeacherSpec(index, reference, config_file, kind, given))
    return specs


def load_teacher_config(spec: TeacherSpec, cfg: CfgNode) -> Union[CfgNode, DictConfig]:
    """The teacher's own config with the student config's teacher overrides applied:
    ``DISTILL.TEACHER.OPTS`` (yacs ``KEY VALUE``) for a yacs teacher,
    ``DISTILL.TEACHER.LAZY_OVERRIDES`` (``key=value``) for a LazyConfig teacher."""
    if spec.kind == YACS:
        teacher_cfg = load_config(spec.config_file, list(cfg.DISTILL.TEACHER.OPTS)
                                  + ["MODEL.DEVICE", cfg.MODEL.DEVICE])
        teacher_cfg.freeze()
        return teacher_cfg
    try:
        lazy = LazyConfig.load(spec.config_file)
        lazy = LazyConfig.apply_overrides(lazy, list(cfg.DISTILL.TEACHER.LAZY_OVERRIDES))
    except Exception as e:  # a LazyConfig file is arbitrary Python: report any failure
        missing = missing_transformer_backbones() if isinstance(e, ImportError) else []
        hint = (f"; this detectron2 lacks {', '.join(missing)} (added after v0.6): transformer "
                "teachers need detectron2 main, see docs/transformer_teachers.md"
                if missing else "")
        raise ConfigError(f"Teacher LazyConfig {spec.reference} cannot be loaded: "
                          f"{type(e).__name__}: {e}{hint}") from None
    if "model" not in lazy:
        raise ConfigError(f"Teacher LazyConfig {spec.reference} defines no `model`; a teacher "
                          "config must describe a detector as `model = L(...)(...)`.")
    return lazy


def teacher_weights(spec: TeacherSpec, teacher_cfg) -> str:
    """The weights the teacher loads (see the module docstring for the order)."""
    if spec.weights:
        return spec.weights
    if spec.kind == YACS and teacher_cfg.MODEL.WEIGHTS:
        return teacher_cfg.MODEL.WEIGHTS
    where = ("its config's MODEL.WEIGHTS" if spec.kind == YACS else
             "(a LazyConfig's train.init_checkpoint is an initialisation, not a teacher)")
    raise ConfigError(f"Teacher {spec.index} ({spec.reference}) has no weights: set "
                      f"DISTILL.TEACHER.WEIGHTS or {where} to the trained teacher's checkpoint.")
