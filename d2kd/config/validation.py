"""Checks of the inputs a config refers to (datasets, weights), run before training starts."""
import difflib
import json
import math
import os
from typing import Iterable

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..model_zoo import PRETRAINED_PREFIX, pretrain_config
from ..data import ensure_digitsdet
from ..data.digitsdet import DigitsDetSpec
from .loading import ConfigError
from .schedule import TeacherSchedule
from .teachers import YACS, load_teacher_config, teacher_specs, teacher_weights

# Annotation files up to this size are parsed up front to catch corrupt files early.
_MAX_PARSED_ANNOTATION_BYTES = 64 * 2**20
# MODEL.WEIGHTS values that are resolved by detectron2's PathManager, not local files.
_REMOTE_PREFIXES = ("detectron2://", "http://", "https://", "catalog://", "manifold://")


def check_datasets(names: Iterable[str]) -> None:
    """Every dataset is registered and its annotation file (if it declares one) readable."""
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"Dataset '{name}' is not registered.{hint} Register it in detectron2's "
                "DatasetCatalog (d2kd registers digitsdet_{train,val,test} and "
                "digitsdet_hard_{train,val,test})."
            )
        metadata = MetadataCatalog.get(name)
        if getattr(metadata, "digitsdet", False):
            # generates a missing copy
            spec = getattr(metadata, "digitsdet_spec", None)
            ensure_digitsdet(metadata.image_root, DigitsDetSpec(**spec) if spec else None)
        json_file = getattr(metadata, "json_file", None)
        if json_file:
            check_annotation_file(json_file, name)


def check_annotation_file(json_file: str, dataset_name: str) -> None:
    """The file exists and, unless huge, is valid JSON."""
    if not os.path.isfile(json_file):
        raise ConfigError(f"Annotation file {json_file} of dataset '{dataset_name}' does not exist.")
    if os.path.getsize(json_file) > _MAX_PARSED_ANNOTATION_BYTES:
        return
    try:
        with open(json_file, "rb") as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = "Regenerate or re-download it"
        if getattr(MetadataCatalog.get(dataset_name), "digitsdet", False):
            fix = f"Remove {os.path.dirname(json_file)}; it is regenerated on first use"
        raise ConfigError(
            f"Annotation file {json_file} of dataset '{dataset_name}' is corrupt ({e}). {fix}."
        ) from None


def check_weights(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """A local weights file must exist (remote URLs are left to detectron2's PathManager;
    ``digitsdet-pretrained://NAME`` must name a pre-training config: the launchers pre-train
    it once the rest of the run is checked)."""
    if path.startswith(PRETRAINED_PREFIX):
        try:
            pretrain_config(path[len(PRETRAINED_PREFIX):])
        except FileNotFoundError as e:
            raise ConfigError(f"{key}={path}: {e}") from None
        return
    if path and not path.startswith(_REMOTE_PREFIXES) and not os.path.isfile(path):
        raise ConfigError(
            f"{key}={path} does not exist. Train that model first (tools/train_net.py writes "
            "OUTPUT_DIR/model_final.pth), point the key at an existing file, or set it to '' "
            "to start from random initialisation."
        )


def check_teachers(cfg: CfgNode) -> None:
    """Every teacher config loads and its local weights file exists."""
    for spec in teacher_specs(cfg):
        path = teacher_weights(spec, load_teacher_config(spec, cfg))
        if "://" not in path and not os.path.isfile(path):
            train = (f" Train the teacher first: tools/train_net.py --config-file "
                     f"{spec.config_file}" if spec.kind == YACS else "")
            raise ConfigError(f"Teacher {spec.index} ({spec.reference}) weights {path} do not "
                              f"exist.{train}")


def _loss_weight_keys(node: CfgNode, prefix: str):
    """(key, value) of every loss weight under ``node``: keys named ``*WEIGHT`` /
    ``*WEIGHTS`` (numbers or lists of them) and the loss scales named ``ALPHA``."""
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, CfgNode):
            yield from _loss_weight_keys(value, key + ".")
        elif name.endswith(("WEIGHT", "WEIGHTS")) or name == "ALPHA":
            values = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                yield key, values


def check_loss_weights(cfg: CfgNode) -> None:
    """Every distillation loss weight is a finite number >= 0."""
    for key, values in _loss_weight_keys(cfg.DISTILL, "DISTILL."):
        for value in values:
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key} = {value}: a loss weight must be a finite number "
                                  ">= 0 (0 switches the term off).")


def check_inputs(cfg: CfgNode, resume: bool = False) -> None:
    """Raise :class:`ConfigError` for the first bad input of ``cfg``."""
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        check_loss_weights(cfg)
        check_teachers(cfg)
        TeacherSchedule.from_config(cfg)  # DISTILL.SCHEDULE is consistent
    has_checkpoint = os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not (resume and has_checkpoint):
        check_weights(cfg.MODEL.WEIGHTS)
