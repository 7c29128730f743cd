"""Checks of the inputs a config refers to (datasets, weights), run before training starts."""
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import OmegaConf

from ..data import ensure_digitsdet
from ..data.digitsdet import DigitsDetSpec
from ..model_zoo import PRETRAINED_PREFIX, pretrain_config
from .loading import ConfigError
from .ranges import check_key_ranges
from .schedule import TeacherSchedule
from .teachers import YACS, load_teacher_config, teacher_specs, teacher_weights

# Annotation files up to this size are parsed up front to catch corrupt files early.
_MAX_PARSED_ANNOTATION_BYTES = 64 * 2**20
# MODEL.WEIGHTS values that are resolved by detectron2's PathManager, not local files.
_REMOTE_PREFIXES = ("detectron2://", "http://", "https://", "catalog://", "manifold://")


@dataclass(frozen=True)
class DatasetSummary:
    """What a registered dataset holds (None: not known without loading it)."""

    images: int
    annotated_images: int
    classes: Optional[int]


def check_datasets(names: Iterable[str]) -> Dict[str, DatasetSummary]:
    """Every dataset is registered and its annotation file (if it declares one) readable;
    returns what each holds (from the annotation file when it is parsed, else from
    detectron2's ``DatasetCatalog``)."""
    summaries = {}
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
        coco = check_annotation_file(json_file, name) if json_file else None
        summaries[name] = _summary_of_coco(coco) if coco else _summary_of_catalog(name)
    return summaries


def _summary_of_coco(coco: Dict) -> DatasetSummary:
    annotated = {a.get("image_id") for a in coco.get("annotations", [])}
    return DatasetSummary(len(coco.get("images", [])), len(annotated),
                          len(coco["categories"]) if "categories" in coco else None)


def _summary_of_catalog(name: str) -> DatasetSummary:
    dicts = DatasetCatalog.get(name)
    classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
    return DatasetSummary(len(dicts), sum(bool(d.get("annotations")) for d in dicts),
                          len(classes) if classes is not None else None)


def check_annotation_file(json_file: str, dataset_name: str) -> Optional[Dict]:
    """The file exists and, unless huge, is valid JSON; returns it parsed (None: too large
    to parse up front)."""
    if not os.path.isfile(json_file):
        raise ConfigError(f"Annotation file {json_file} of dataset '{dataset_name}' "
                          "does not exist.")
    if os.path.getsize(json_file) > _MAX_PARSED_ANNOTATION_BYTES:
        return None
    try:
        with open(json_file, "rb") as f:
            return json.load(f)
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
    """Every teacher config loads, is a detector (not a distillation config) and its local
    weights file exists."""
    for spec in teacher_specs(cfg):
        teacher_cfg = load_teacher_config(spec, cfg)
        if spec.kind == YACS and teacher_cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
            raise ConfigError(
                f"Teacher {spec.index} ({spec.reference}) is a distillation config; a teacher is "
                "a detector. Give the student config its run exported "
                "(OUTPUT_DIR/model_final_student.yaml) with DISTILL.TEACHER.WEIGHTS pointing at "
                "its model_final_student.pth.")
        path = teacher_weights(spec, teacher_cfg)
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


#: where each detectron2 / d2kd meta-architecture keeps its number of classes
NUM_CLASSES_KEYS = {"RetinaNet": "MODEL.RETINANET.NUM_CLASSES", "FCOS": "MODEL.FCOS.NUM_CLASSES",
                    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES"}
#: where LazyConfig detectors keep it
_LAZY_NUM_CLASSES_KEYS = ("model.num_classes", "model.roi_heads.num_classes",
                          "model.head.num_classes")


def num_classes_of(model_cfg) -> Optional[Tuple[str, int]]:
    """(key, value) of a detector config's number of classes; None when unknown."""
    if isinstance(model_cfg, CfgNode):
        arch = model_cfg.MODEL.META_ARCHITECTURE
        if arch == "DistillationDetector":
            arch = model_cfg.DISTILL.STUDENT_META_ARCHITECTURE
        key = NUM_CLASSES_KEYS.get(arch)
        if key is None:
            return None
        node = model_cfg
        for part in key.split("."):
            node = node[part]
        return key, node
    for key in _LAZY_NUM_CLASSES_KEYS:
        value = OmegaConf.select(model_cfg, key, default=None)
        if isinstance(value, int):
            return key, value
    return None


def check_datasets_fit(cfg: CfgNode, summaries: Dict[str, DatasetSummary]) -> None:
    """Training datasets have annotated images, test datasets images, and the student and
    every teacher predict as many classes as each dataset has."""
    for name in cfg.DATASETS.TRAIN:
        if summaries[name].annotated_images == 0:
            raise ConfigError(f"Training dataset '{name}' has no annotated image "
                              f"({summaries[name].images} images): nothing to train on.")
    for name in cfg.DATASETS.TEST:
        if summaries[name].images == 0:
            raise ConfigError(f"Test dataset '{name}' has no image: nothing to evaluate.")
    models = [("the student" if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector"
               else "the model", cfg)]
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        models += [(f"teacher {spec.index} ({spec.reference})", load_teacher_config(spec, cfg))
                   for spec in teacher_specs(cfg)]
    for name, summary in summaries.items():
        if summary.classes is None:
            continue
        for who, model_cfg in models:
            found = num_classes_of(model_cfg)
            if found is not None and found[1] != summary.classes:
                raise ConfigError(f"{found[0]} = {found[1]} of {who}, but dataset '{name}' has "
                                  f"{summary.classes} classes: set it to {summary.classes}.")


def check_processes(cfg: CfgNode, world_size: int) -> None:
    """The batch splits evenly over the run's processes."""
    if world_size > 0 and cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} does not split over the "
            f"{world_size} processes (--num-gpus x --num-machines): make it a multiple of "
            f"{world_size}.")


def check_inputs(cfg: CfgNode, resume: bool = False, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for the first bad input of ``cfg`` run on ``world_size``
    processes (0: not known here)."""
    check_key_ranges(cfg)
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range" and len(cfg.INPUT.MIN_SIZE_TRAIN) != 2:
        raise ConfigError(f"INPUT.MIN_SIZE_TRAIN = {cfg.INPUT.MIN_SIZE_TRAIN} with "
                          "MIN_SIZE_TRAIN_SAMPLING = 'range' needs two sizes (min, max).")
    check_processes(cfg, world_size)
    summaries = check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        check_loss_weights(cfg)
        check_teachers(cfg)
        TeacherSchedule.from_config(cfg)  # DISTILL.SCHEDULE is consistent
    check_datasets_fit(cfg, summaries)
    has_checkpoint = os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not (resume and has_checkpoint):
        check_weights(cfg.MODEL.WEIGHTS)
