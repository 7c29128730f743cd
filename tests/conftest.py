"""Shared fixtures and helpers of the test suite (test modules import nothing from each other).

Fixtures: ``tiny_digitsdet`` (a tiny DigitsDet copy registered as
``digitsdet_tiny_{train,val,test}``), ``teacher_weights`` (an untrained R-50/2 RetinaNet
teacher), ``teachers`` (untrained R-50/2 and R-34/2 RetinaNet teachers) and
``module_tmp_path_factory`` (folders for a module's shared fixtures, removed when its tests
end). Helpers: ``tiny_training_cfg``, ``distill_cfg``, ``save_untrained_teacher``,
``launch_two_processes``, ``cosine``.

Tests that train (a ``DistillTrainer``, ``tools/*.py`` or another subprocess, a benchmark, pip's
resolver) are marked ``slow`` (pytest.ini): ``pytest -m "not slow"`` runs the rest in under a
minute; ``make test`` runs everything.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import d2kd  # noqa: F401  (registrations)
from d2kd.config import load_config
from d2kd.data import register_digitsdet
from d2kd.data.digitsdet import DigitsDetSpec, generate_digitsdet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY_SPEC = DigitsDetSpec(seed=0, num_train=24, num_val=8, num_test=4)
TEACHER = "DigitsDet/retinanet_R50_teacher.yaml"  # R-50/2, FPN 128
TEACHER_R34 = "DigitsDet/retinanet_R34_teacher.yaml"  # R-34/2, FPN 96
DISTILL = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"  # student R-18/2, teacher R-50/2

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_digitsdet(tmp_path_factory) -> str:
    """Root of a tiny DigitsDet (24 train / 8 val / 4 test images), registered as
    digitsdet_tiny_*."""
    root = str(tmp_path_factory.mktemp("datasets") / "digitsdet")
    generate_digitsdet(root, TINY_SPEC, show_progress=False)
    register_digitsdet(root, name_prefix="digitsdet_tiny")
    return root


class ModuleTempFolders:
    """``tmp_path_factory.mktemp`` for one test module's shared fixtures: numbered folders in one
    folder of the module's."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, basename: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=basename, dir=self.root))


@pytest.fixture(scope="module")
def module_tmp_path_factory(tmp_path_factory, request):
    """Folders for a module's shared fixtures (untrained full-size teachers, finished runs: up to
    ~370 MB each), removed when the module's tests end unless one of them failed: the same
    retention as ``tmp_path``'s (pytest.ini: ``tmp_path_retention_policy = failed``), so that a
    whole suite needs disk for one module at a time, not for all of them."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield ModuleTempFolders(root)
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)


def tiny_training_cfg(config_file: str, output_dir: str, max_iter: int = 2):
    """A DigitsDet config shrunk to a few iterations on the tiny dataset (CPU, 2 images/step)."""
    cfg = load_config(os.path.join(CONFIGS, config_file))
    cfg.DATASETS.TRAIN = ("digitsdet_tiny_train",)
    cfg.DATASETS.TEST = ("digitsdet_tiny_val",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = max_iter
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.MODEL.WEIGHTS = ""  # no pre-trained backbone: tests must not pre-train
    cfg.OUTPUT_DIR = output_dir
    return cfg


def save_untrained_teacher(teacher_config: str, out) -> str:
    """A checkpoint that matches ``teacher_config`` (random weights: enough for these tests)."""
    os.makedirs(out, exist_ok=True)
    cfg = load_config(os.path.join(CONFIGS, teacher_config), ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(out)).save("model_final")
    return str(out / "model_final.pth")


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> str:
    """An untrained checkpoint of the R-50/2 RetinaNet teacher (``TEACHER``); read-only."""
    return save_untrained_teacher(TEACHER, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Untrained checkpoints of the R-50/2 (FPN 128) and R-34/2 (FPN 96) RetinaNet teachers, in
    the DigitsDet chain's order (the R-34/2 is the higher-AP target); read-only."""
    root = tmp_path_factory.mktemp("teachers")
    return [save_untrained_teacher(TEACHER, root / "r50"),
            save_untrained_teacher(TEACHER_R34, root / "r34")]


def distill_cfg(output_dir, teacher_weights, heads=("MGDHead",), max_iter=2, config=DISTILL):
    """``tiny_training_cfg`` of a distillation config with one teacher checkpoint and ``heads``."""
    cfg = tiny_training_cfg(config, output_dir, max_iter=max_iter)
    cfg.DISTILL.TEACHER.WEIGHTS = [teacher_weights]
    cfg.DISTILL.HEADS = list(heads)
    return cfg


def launch_two_processes(config_file, output_dir, dataset_root, *opts):
    """tools/train_net.py --num-gpus 2 (gloo, CPU) for 2 iterations of a DigitsDet config; asserts
    that both ranks ran and the evaluation was printed."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(dataset_root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "DigitsDet", config_file),
        "--num-gpus", "2",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", str(output_dir), *opts,
    ]
    proc = subprocess.run(cmd, cwd=output_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (output_dir / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "copypaste: AP,AP50" in log


def cosine(a, b) -> float:
    """Cosine similarity of two 1-D tensors, as a Python float."""
    return float(a @ b) / (float(a.norm()) * float(b.norm()))
