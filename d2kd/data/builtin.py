"""Registration of the embedded DigitsDet benchmark in detectron2's catalogs.

The dataset lives in ``$DETECTRON2_DATASETS/digitsdet`` (default ``datasets/digitsdet``,
relative to the working directory, exactly like detectron2's builtin datasets) and is
generated with the default :class:`DigitsDetSpec` the first time a split is used. Concurrent
processes (``launch()`` workers, test runners) serialise on a lock file, so exactly one of
them generates and the others wait.
"""
import fcntl
import json
import logging
import os
from dataclasses import asdict
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .digitsdet import THING_CLASSES, DigitsDetSpec, generate_digitsdet

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


def digitsdet_root() -> str:
    """Directory of the registered DigitsDet copy (``$DETECTRON2_DATASETS/digitsdet``)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "digitsdet")


def ensure_digitsdet(root: str, spec: DigitsDetSpec = DigitsDetSpec()) -> None:
    """Generate DigitsDet at ``root`` (default spec) unless it is already there."""
    if os.path.isfile(os.path.join(root, "val.json")):
        return
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(root) and not os.path.isfile(os.path.join(root, "val.json")):
            raise RuntimeError(
                f"{root} exists but has no val.json: it is not a DigitsDet copy. Remove it; it "
                "will be regenerated on first use (or run `python -m d2kd.data.digitsdet "
                f"--out {root}`)."
            )
        if not os.path.isdir(root):
            logger.info("Generating DigitsDet at %s with %s", root, asdict(spec))
            generate_digitsdet(root, spec)


def _load_split(root: str, split: str, dataset_name: str) -> List[Dict]:
    ensure_digitsdet(root)
    json_file = os.path.join(root, f"{split}.json")
    fix = f"Remove {root}; it will be regenerated on first use."
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"DigitsDet annotation file {json_file} is missing. {fix}")
    try:
        return load_coco_json(json_file, root, dataset_name=dataset_name)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"DigitsDet annotation file {json_file} is corrupt ({type(e).__name__}: {e}). {fix}"
        ) from None


def register_digitsdet(root: str = "", name_prefix: str = "digitsdet") -> None:
    """Register ``<name_prefix>_train`` / ``<name_prefix>_val`` (generated on first use).

    ``root`` defaults to :func:`digitsdet_root`. Re-registering a name replaces it.
    """
    root = root or digitsdet_root()
    for split in SPLITS:
        name = f"{name_prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda root=root, split=split, name=name: _load_split(root, split, name)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(THING_CLASSES),
            json_file=os.path.join(root, f"{split}.json"),
            image_root=root,
            evaluator_type="coco",
            digitsdet=True,  # generated on first use; see ensure_digitsdet
        )
