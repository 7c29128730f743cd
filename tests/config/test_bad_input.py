"""Bad input is reported as one clear error that names the problem and the fix."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, tiny_training_cfg

from d2kd.config import ConfigError, check_inputs, load_config
from d2kd.data import register_digitsdet

STUDENT = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_student.yaml")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_config_key_typo_in_file_suggests_the_key(tmp_path):
    cfg_file = _write(tmp_path / "typo.yaml",
                      f'_BASE_: "{STUDENT}"\nMODEL:\n  RETINANET:\n    NUM_CLASES: 10\n')
    with pytest.raises(ConfigError, match=r"unknown config key MODEL\.RETINANET\.NUM_CLASES\. "
                                          r"Did you mean MODEL\.RETINANET\.NUM_CLASSES\?"):
        load_config(cfg_file)


def test_config_key_typo_in_override():
    with pytest.raises(ConfigError, match=r"command-line override: unknown config key "
                                          r"SOLVER\.MAX_ITERS\. Did you mean SOLVER\.MAX_ITER"):
        load_config(STUDENT, ["SOLVER.MAX_ITERS", "10"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/DigitsDet/no_such.yaml")


def test_unknown_dataset_name_lists_close_names(tiny_digitsdet):
    cfg = load_config(STUDENT, ["DATASETS.TRAIN", "('digitsdet_tiny_trian',)"])
    with pytest.raises(ConfigError, match=r"'digitsdet_tiny_trian' is not registered\. "
                                          r"Did you mean digitsdet_tiny_train"):
        check_inputs(cfg)


def test_missing_weights_file(tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path))
    cfg.MODEL.WEIGHTS = str(tmp_path / "teacher" / "model_final.pth")
    with pytest.raises(ConfigError, match=r"MODEL\.WEIGHTS=.*model_final\.pth does not exist\. "
                                          r"Train that model first"):
        check_inputs(cfg)


@pytest.fixture
def broken_copy(tiny_digitsdet, tmp_path):
    """A copy of the tiny dataset registered as digitsdet_broken_*; tests damage it."""
    root = tmp_path / "digitsdet"
    shutil.copytree(tiny_digitsdet, root)
    register_digitsdet(str(root), name_prefix="digitsdet_broken")
    return root


def _broken_cfg(tmp_path):
    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path / "out"))
    cfg.DATASETS.TRAIN = ("digitsdet_broken_train",)
    cfg.DATASETS.TEST = ("digitsdet_broken_val",)
    return cfg


def test_corrupt_annotation_file(broken_copy, tmp_path):
    (broken_copy / "train.json").write_text('{"images": [')
    with pytest.raises(ConfigError, match=r"train\.json of dataset 'digitsdet_broken_train' is "
                                          r"corrupt .*Remove .*regenerated on first use"):
        check_inputs(_broken_cfg(tmp_path))


def test_missing_annotation_file(broken_copy, tmp_path):
    (broken_copy / "train.json").unlink()
    with pytest.raises(ConfigError, match=r"train\.json of dataset 'digitsdet_broken_train' "
                                          r"does not exist"):
        check_inputs(_broken_cfg(tmp_path))


@pytest.mark.slow
def test_train_net_prints_one_error_line_before_training(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", STUDENT,
           "SOLVER.BASE_LRR", "0.1", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: command-line override: unknown config key SOLVER.BASE_LRR. "
        "Did you mean SOLVER.BASE_LR?"
    ]
    assert not (tmp_path / "out").exists()


def test_missing_teacher_weights_name_the_command_that_trains_the_teacher(tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_from_R50_mgd.yaml", str(tmp_path))
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "nope.pth")]
    with pytest.raises(ConfigError, match=r"Teacher 0 \(.*retinanet_R50_teacher\.yaml\) weights "
                                          r".*nope\.pth do not exist\. Train the teacher first"):
        check_inputs(cfg)
