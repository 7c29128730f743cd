"""``--resume`` after ``kill -9`` at any point gives the bit-identical final model.

Every case trains a tiny DigitsDet run in a subprocess that SIGKILLs itself at a chosen point
(tests/helpers/kill_driver.py), resumes it in a new process and compares every tensor of
``model_final.pth`` with an uninterrupted run's.
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CONFIGS, REPO

pytestmark = [pytest.mark.slow, pytest.mark.long]

DRIVER = os.path.join(REPO, "tests", "helpers", "kill_driver.py")


def _run(cfg_file: str, root: str, mode: str, kill_point: str = "") -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, DRIVER, cfg_file, root, mode, kill_point], env=env,
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def _final(output_dir) -> dict:
    return torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu",
                      weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_digitsdet, teachers, module_tmp_path_factory):
    """kind -> output directory of its uninterrupted run (trained on first use)."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            runs[kind] = module_tmp_path_factory.mktemp(f"{kind}-uninterrupted")
            assert _run(_config(kind, runs[kind], teachers), tiny_digitsdet, "fresh") == 0
        return runs[kind]

    return run


def _config(kind: str, output_dir, teachers) -> str:
    """A 6-iteration run of ``kind`` on the tiny dataset, checkpoints every 2 iterations,
    written as a file whose ``_BASE_`` is the shipped config (the driver process loads it
    as tools/train_net.py would)."""
    config = {"plain": "DigitsDet/retinanet_R18_student.yaml",
              "gk": "DigitsDet/retinanet_R18_from_R50_gk.yaml",
              "mtpd": "DigitsDet/retinanet_R18_from_R50_R34_mtpd_mgd.yaml"}[kind]
    overrides = {
        "_BASE_": os.path.join(CONFIGS, config), "OUTPUT_DIR": str(output_dir),
        "MODEL": {"WEIGHTS": ""}, "DATALOADER": {"NUM_WORKERS": 0}, "TEST": {"EVAL_PERIOD": 0},
        "DATASETS": {"TRAIN": ["digitsdet_tiny_train"], "TEST": ["digitsdet_tiny_val"]},
        "SOLVER": {"IMS_PER_BATCH": 2, "MAX_ITER": 6, "WARMUP_ITERS": 2,
                   "CHECKPOINT_PERIOD": 2}}
    if kind == "gk":
        overrides["DISTILL"] = {"TEACHER": {"WEIGHTS": [teachers[0]]}, "PROTOTYPES": {
            "MAX_IMAGES_PER_CLASS": 2, "REFRESH_PERIOD": 3}}  # refresh before 0 and after 2
    if kind == "mtpd":
        overrides["DISTILL"] = {"TEACHER": {"WEIGHTS": list(teachers)},
                                "SCHEDULE": {"STAGE_ITERS": [3, 3]}}
    path = os.path.join(str(output_dir), "config.yaml")
    os.makedirs(str(output_dir), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(overrides, f)
    return path


CASES = [  # (run kind, kill point): the step index is the iteration about to run
    ("plain", "step:1"),  # before the first checkpoint: the resumed run starts afresh
    ("plain", "step:5"),  # mid-run, 1 step after the checkpoint of iteration 3
    ("gk", "refresh:2"),  # inside the prototype refresh after step 2
    ("mtpd", "switch:1"),  # inside the stage switch at iteration 3 (new teacher built)
    ("gk", "save:2"),  # while the checkpoint after step 3 was being written
]


@pytest.mark.parametrize("kind, kill_point", CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_killed_and_resumed_run_ends_bit_identical(kind, kill_point, tiny_digitsdet, teachers,
                                                   uninterrupted, tmp_path):
    reference = uninterrupted(kind)
    killed = tmp_path / f"{kind}-killed"
    config = _config(kind, killed, teachers)
    assert _run(config, tiny_digitsdet, "fresh", kill_point) == -9
    assert not os.path.isfile(killed / "model_final.pth")
    assert _run(config, tiny_digitsdet, "resume") == 0
    expected, got = _final(reference), _final(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different[:5]
