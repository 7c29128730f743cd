"""Every class of bad input is stopped before start (d2kd/engine/preflight.py): one line that
names the problem and the fix, and nothing trained or overwritten."""
import os

import pytest
import torch
from conftest import CONFIGS, distill_cfg, save_untrained_teacher, tiny_training_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd.config import ConfigError, load_config
from d2kd.engine.checkpoint import AtomicCheckpointer, resume_checkpoint
from d2kd.engine.preflight import check_run

MGD = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"
MTPD = "DigitsDet/retinanet_R18_from_R50_R34_mtpd_mgd.yaml"


def _bad(cfg, tmp_path, pattern: str, resume: bool = False) -> str:
    """``check_run`` fails with one line matching ``pattern``; OUTPUT_DIR is left as it was."""
    before = sorted(os.listdir(cfg.OUTPUT_DIR)) if os.path.isdir(cfg.OUTPUT_DIR) else None
    with pytest.raises(ConfigError, match=pattern) as error:
        check_run(cfg, resume=resume)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    after = sorted(os.listdir(cfg.OUTPUT_DIR)) if os.path.isdir(cfg.OUTPUT_DIR) else None
    assert after == before, "nothing may be written before start"
    return message


def test_a_good_config_passes(tiny_digitsdet, tmp_path, teacher_weights):
    assert check_run(distill_cfg(str(tmp_path / "out"), teacher_weights)) is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, pattern", [
    ("DISTILL.DFD.HARD_FRACTION", 1.5,
     r"^DISTILL\.DFD\.HARD_FRACTION = 1\.5: must be a number in \[0, 1\]\.$"),
    ("DISTILL.LOC.LOSS", "l3", r"^DISTILL\.LOC\.LOSS = 'l3': must be one of 'l1', 'smooth_l1'\.$"),
], ids=["dfd-rho", "loc-loss"])
def test_invalid_head_option(key, value, pattern, tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights, heads=("DFDHead", "LocKDHead"))
    section, name = key.rsplit(".", 1)
    cfg.DISTILL[section.split(".")[1]][name] = value
    assert _bad(cfg, tmp_path, pattern).startswith(key)


def test_unknown_head_name(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights, heads=("MDGHead",))
    assert _bad(cfg, tmp_path, r"^Unknown distillation head 'MDGHead' in DISTILL\.HEADS; "
                        r"registered: .*MGDHead")


def test_malformed_genome(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights, heads=("DetKDSHead",))
    cfg.DISTILL.DETKDS.GENOME = "global:natt|nonsense"
    assert "nonsense" in _bad(cfg, tmp_path, r"^DISTILL\.DETKDS\.GENOME: ")


def test_level_missing_on_one_side_and_channel_mismatch(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights)
    cfg.DISTILL.IN_FEATURES = ["p2", "p3"]
    _bad(cfg, tmp_path, r"'p2' must exist in student and teacher")
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights)
    cfg.DISTILL.ADAPTER = False
    _bad(cfg, tmp_path, r"student has 64 channels, teacher 128")


def test_teacher_weights_of_another_architecture(tiny_digitsdet, tmp_path):
    other = save_untrained_teacher("DigitsDet/retinanet_R34_teacher.yaml", tmp_path / "r34")
    cfg = distill_cfg(str(tmp_path / "out"), other)  # the config names the R-50/2 teacher
    _bad(cfg, tmp_path, r"weights .*model_final\.pth do not match the teacher config: "
                        r".*(missing|shape)")


def test_corrupt_or_missing_teacher_weights(tiny_digitsdet, tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    cfg = distill_cfg(str(tmp_path / "out"), str(tmp_path / "corrupt.pth"))
    _bad(cfg, tmp_path, r"corrupt\.pth cannot be read as a checkpoint .*; re-download")
    cfg = distill_cfg(str(tmp_path / "out"), str(tmp_path / "missing.pth"))
    _bad(cfg, tmp_path, r"missing\.pth do not exist\. Train the teacher first")


def test_missing_teacher_config(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights)
    cfg.DISTILL.TEACHER.CONFIGS = [str(tmp_path / "no_teacher.yaml")]
    _bad(cfg, tmp_path, r"Teacher config .*no_teacher\.yaml does not exist")


@pytest.mark.parametrize("key, value, shown", [
    ("DISTILL.MGD.ALPHA", -2e-5, "-2e-05"), ("DISTILL.FITNET.WEIGHT", float("nan"), "nan"),
    ("DISTILL.SCHEDULE.JOINT_WEIGHTS", [1.0, float("inf")], "inf")],
    ids=["negative", "nan", "inf-in-list"])
def test_negative_or_non_finite_loss_weight(key, value, shown, tiny_digitsdet, tmp_path,
                                             teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights)
    _, section, name = key.split(".")
    cfg.DISTILL[section][name] = value
    _bad(cfg, tmp_path, rf"^{key} = {shown}: a loss weight must be a finite number >= 0")


def test_every_stage_of_a_teacher_schedule_is_checked(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = tiny_training_cfg(MTPD, str(tmp_path / "out"))
    cfg.DISTILL.SCHEDULE.STAGE_ITERS = [1, 1]
    # stage 2's teacher is an R-34/2
    cfg.DISTILL.TEACHER.WEIGHTS = [teacher_weights, teacher_weights]
    _bad(cfg, tmp_path, r"retinanet_R34_teacher\.yaml: weights .* do not match")


def _checkpoints(tmp_path, teacher_weights, iterations):
    """A run directory with training checkpoints (model, trainer state, iteration) after the
    given iterations (the last one tagged)."""
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights)
    model = build_model(student := load_config(os.path.join(CONFIGS, "DigitsDet",
                                                            "retinanet_R18_student.yaml")))
    del student
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # stands for the trainer's state
    checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=optimizer)
    for iteration in iterations:
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    return cfg


def test_corrupt_checkpoint_on_resume_falls_back_to_the_previous_one(tiny_digitsdet, tmp_path,
                                                                     teacher_weights, caplog):
    cfg = _checkpoints(tmp_path, teacher_weights, [1, 3])
    newest = os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)  # a torn copy, e.g. from another tool
    check_run(cfg, resume=True)
    assert "model_0000003.pth" in caplog.text and "resuming from" in caplog.text
    assert resume_checkpoint(cfg.OUTPUT_DIR).endswith("model_0000001.pth")
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"


def test_resume_with_no_readable_checkpoint_names_the_files(tiny_digitsdet, tmp_path,
                                                            teacher_weights):
    cfg = _checkpoints(tmp_path, teacher_weights, [1])
    with open(os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    _bad(cfg, tmp_path, r"^--resume: no readable checkpoint in .*model_0000001\.pth "
                        r"\(.*\)\. Delete the unreadable files", resume=True)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def torn(obj, f, *args, **kwargs):  # f: the open temporary file
        f.write(b"torn")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert DetectionCheckpointer(model).get_checkpoint_file  # public API still there


@pytest.mark.slow
def test_train_net_stops_a_bad_head_option_in_one_line(tiny_digitsdet, tmp_path, teacher_weights):
    import subprocess
    import sys

    from conftest import REPO

    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           os.path.join(CONFIGS, MGD), "DISTILL.TEACHER.WEIGHTS", repr([teacher_weights]),
           "DISTILL.HEADS", "['DFDHead']", "DISTILL.DFD.HARD_FRACTION", "1.5",
           "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digitsdet))
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: DISTILL.DFD.HARD_FRACTION = 1.5: must be a number in [0, 1]."]
    assert not (tmp_path / "out").exists()
