"""Registration of the embedded DigitsDet benchmark in detectron2's catalogs.

The dataset lives in ``$DETECTRON2_DATASETS/digitsdet`` (default ``datasets/digitsdet``,
relative to the working directory, exactly like detectron2's builtin datasets) and is
generated with the default :class:`DigitsDetSpec` the first time a split is used. Concurrent
processes (``launch()`` workers, test runners) serialise on a lock file, so exactly one of
them generates and the others wait.

Splits: ``_train`` fits models, ``_val`` makes every choice (recipes, hyper-parameters,
ablation verdicts, searches validate on held-out training images), ``_test`` only reports.
A copy made before the test split existed gets it added on first use; its train and val stay
byte-identical.

A second variant, ``digitsdet_hard_{train,val,test}`` in ``$DETECTRON2_DATASETS/digitsdet_hard``,
is generated from :data:`HARD_SPEC`: another seed, more clutter, more and smaller digits (the
robustness check of the DigitsDet comparisons).
"""
import fcntl
import json
import logging
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .digitsdet import SPLITS, THING_CLASSES, DigitsDetSpec, add_split, generate_digitsdet

logger = logging.getLogger(__name__)

#: the split added after DigitsDet was first published: older copies get it on first use
ADDED_SPLIT = "test"

#: The harder DigitsDet variant: another seed; 4-10 distractor shapes (default 0-4); 3-8
#: digits per image (2-6); close-ups with one large digit in 40 % of the images (80 %); and
#: 80 % of the other digits small (50 %).
HARD_SPEC = DigitsDetSpec(seed=1, min_digits=3, max_digits=8, large_image_prob=0.4,
                          small_prob=0.8, min_clutter=4, max_clutter=10)


def digitsdet_root() -> str:
    """Directory of the registered DigitsDet copy (``$DETECTRON2_DATASETS/digitsdet``)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                        "digitsdet")


def ensure_digitsdet(root: str, spec: Optional[DigitsDetSpec] = None) -> None:
    """Generate DigitsDet at ``root`` from ``spec`` (None: the default spec) unless it is
    already there, and add the test split to a copy made before it existed; given a ``spec``,
    a copy made from another one is an error (its ``spec.json`` says which)."""
    if os.path.isfile(os.path.join(root, f"{ADDED_SPLIT}.json")):
        if spec is not None:
            _check_spec(root, spec)
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
            spec = spec or DigitsDetSpec()
            logger.info("Generating DigitsDet at %s with %s", root, asdict(spec))
            generate_digitsdet(root, spec)
            return
        if spec is not None:
            _check_spec(root, spec)
        if not os.path.isfile(os.path.join(root, f"{ADDED_SPLIT}.json")):
            logger.info("Adding the %s split to the DigitsDet copy at %s", ADDED_SPLIT, root)
            add_split(root, ADDED_SPLIT, spec or _recorded_spec(root))


def _recorded_spec(root: str) -> DigitsDetSpec:
    """The spec in ``root/spec.json`` (keys it predates take their defaults); the default spec
    for a copy made by hand without one."""
    path = os.path.join(root, "spec.json")
    if not os.path.isfile(path):
        return DigitsDetSpec()
    with open(path) as f:
        found = json.load(f)
    return DigitsDetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in found.items()})


def _check_spec(root: str, spec: DigitsDetSpec) -> None:
    path = os.path.join(root, "spec.json")
    if not os.path.isfile(path):
        return  # a copy made by hand (python -m d2kd.data.digitsdet writes spec.json)
    with open(path) as f:
        found = json.load(f)
    wanted = json.loads(json.dumps(asdict(spec)))  # tuples as JSON lists
    # a key the copy predates (num_test) is no difference: the missing split is added from spec
    differ = sorted(k for k in wanted if k in found and found[k] != wanted[k])
    if differ:
        raise ValueError(
            f"{root} was generated from another DigitsDet spec than the one registered for it "
            f"({', '.join(f'{k}: {found.get(k)} != {wanted[k]}' for k in differ)}). Remove it "
            "(it is regenerated on first use) or point $DETECTRON2_DATASETS elsewhere.")


def _load_split(root: str, split: str, dataset_name: str,
                spec: Optional[DigitsDetSpec] = None) -> List[Dict]:
    ensure_digitsdet(root, spec)
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


def register_digitsdet(root: str = "", name_prefix: str = "digitsdet",
                       spec: Optional[DigitsDetSpec] = None) -> None:
    """Register ``<name_prefix>_{train,val,test}`` (generated on first use from
    ``spec``, None: the default spec; a given spec is also checked against an existing copy).

    ``root`` defaults to :func:`digitsdet_root`. Re-registering a name replaces it.
    """
    root = root or digitsdet_root()
    for split in SPLITS:
        name = f"{name_prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda root=root, split=split, name=name: _load_split(root, split, name, spec)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(THING_CLASSES),
            json_file=os.path.join(root, f"{split}.json"),
            image_root=root,
            evaluator_type="coco",
            digitsdet=True,  # generated on first use; see ensure_digitsdet
            digitsdet_spec=asdict(spec) if spec is not None else None,
        )


def register_builtin_datasets() -> None:
    """``digitsdet_{train,val,test}`` and ``digitsdet_hard_{train,val,test}`` under
    ``$DETECTRON2_DATASETS`` (as it is now)."""
    register_digitsdet()
    register_digitsdet(os.path.join(os.path.dirname(digitsdet_root()), "digitsdet_hard"),
                       "digitsdet_hard", HARD_SPEC)
