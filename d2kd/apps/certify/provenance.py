"""What a result depends on, recorded beside it: the code (d2kd version and git commit), the
software stack (detectron2 build, torch), the threads, and the content hashes of every file
the run started from (pre-trained backbone, teachers' weights, datasets' annotations)."""
import json
import os
import subprocess
from typing import Dict, List, Optional

import detectron2
import torch
from detectron2.data import MetadataCatalog

import d2kd

from ...compat import has_compiled_extension
from ...config.teachers import load_teacher_config, teacher_specs, teacher_weights
from ...utils.hashing import file_sha256, weights_sha256
from ...utils.io import atomic_write_json

_PACKAGE_DIR = os.path.dirname(os.path.abspath(d2kd.__file__))
#: the provenance of every start of a run, in its folder (:func:`record_start`)
STARTS = "provenance_starts.json"


def code_version() -> Dict[str, object]:
    """d2kd's version and, when it runs from a git checkout, the commit and whether tracked
    files differ from it (``dirty``)."""
    version: Dict[str, object] = {"d2kd": d2kd.__version__}
    try:
        git = ["git", "-C", _PACKAGE_DIR]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return version  # an installed copy: no checkout
    version.update(commit=commit, dirty=bool(status.strip()))
    return version


def software_stack(threads: int = 0) -> Dict[str, object]:
    """The builds a number depends on (numerics differ between detectron2 builds) and the
    torch threads of the run (``threads``; 0: this process's)."""
    return {"detectron2": detectron2.__version__, "detectron2_compiled": has_compiled_extension(),
            "torch": torch.__version__, "threads": threads or torch.get_num_threads()}


def weights_hash(weights: str) -> Optional[str]:
    """SHA-256 of a weights file (a URL: of detectron2's local copy); None for no weights."""
    return weights_sha256(weights) if weights else None


def inputs_of(cfg) -> Dict[str, object]:
    """Content hashes of what a training config starts from: ``MODEL.WEIGHTS``, each
    teacher's weights and the annotation file of each dataset it trains or tests on."""
    teachers: List[Dict[str, object]] = []
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        for spec in teacher_specs(cfg):
            weights = teacher_weights(spec, load_teacher_config(spec, cfg))
            teachers.append({"config": spec.reference, "weights": weights,
                             "sha256": weights_hash(weights)})
    datasets = {}
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        json_file = getattr(MetadataCatalog.get(name), "json_file", None)
        datasets[name] = file_sha256(json_file) if json_file and os.path.isfile(json_file) else None
    return {"weights": cfg.MODEL.WEIGHTS, "weights_sha256": weights_hash(cfg.MODEL.WEIGHTS),
            "teachers": teachers, "datasets": datasets}


def provenance(cfg, threads: int = 0) -> Dict[str, object]:
    """Everything above for one run of ``cfg`` with ``threads`` torch threads (JSON-ready)."""
    return {"code": code_version(), "software": software_stack(threads), "inputs": inputs_of(cfg)}


def record_start(cfg, output_dir: str, threads: int = 0) -> None:
    """Append what this start (or resume) of the run in ``output_dir`` depends on to
    ``output_dir/STARTS``: taken when training starts, so that a checkout or a teacher file
    changed while it trained is not what its result file names."""
    starts = _starts(output_dir)
    starts.append(provenance(cfg, threads))
    atomic_write_json(os.path.join(output_dir, STARTS), starts)


def run_provenance(output_dir: str) -> Dict[str, object]:
    """The provenance of the run's first start; ``later_starts_differ``: the records of the
    resumes that ran with other code, software or inputs (absent when none did)."""
    starts = _starts(output_dir)
    if not starts:
        raise FileNotFoundError(f"{output_dir}: no {STARTS} (record_start was not called)")
    first, differing = starts[0], [s for s in starts[1:] if s != starts[0]]
    return {**first, "later_starts_differ": differing} if differing else first


def _starts(output_dir: str) -> List[Dict[str, object]]:
    path = os.path.join(output_dir, STARTS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)
