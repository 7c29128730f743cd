"""Weights load where they belong, or the run stops (docs/trust.md): ``--eval-only`` loads every
tensor of the evaluated detector, a training initialisation of which nothing loads is an error,
``--resume`` takes only the run's own training checkpoints, and checkpoint writes are durable."""
import logging
import os

import pytest
import torch
from conftest import distill_cfg, save_untrained_teacher
from detectron2.modeling import build_model

from d2kd.config import ConfigError
from d2kd.engine.checkpoint import AtomicCheckpointer, remove_torn_writes, resume_checkpoint
from d2kd.engine.preflight import check_run
from d2kd.modeling import load_for_evaluation, load_initialisation
from d2kd.modeling.distillation_detector import student_config
from d2kd.utils import io as d2kd_io
from d2kd.utils.io import atomic_save

STUDENT = "DigitsDet/retinanet_R18_student.yaml"


@pytest.fixture(scope="module")
def files(tiny_digitsdet, module_tmp_path_factory):
    """A distillation config and the weights files a user may hand it: a full distillation
    checkpoint, the student export, the teacher's checkpoint (another architecture) and a
    file of unrelated tensors."""
    out = module_tmp_path_factory.mktemp("trust")
    teacher = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", out / "teacher")
    cfg = distill_cfg(str(out / "run"), teacher)
    torch.manual_seed(1)
    model = build_model(cfg)
    full = str(out / "model_final.pth")
    atomic_save({"model": model.state_dict(), "iteration": 1}, full)
    export = str(out / "model_final_student.pth")
    student_state = {k[len("student."):]: v for k, v in model.state_dict().items()
                     if k.startswith("student.")}
    atomic_save({"model": student_state}, export)
    unrelated = str(out / "unrelated.pth")
    atomic_save({"model": {"encoder.weight": torch.zeros(3, 3)}}, unrelated)
    return {"cfg": cfg, "full": full, "export": export, "teacher": teacher,
            "unrelated": unrelated, "student_state": student_state}


def _student(files):
    return build_model(student_config(files["cfg"]))


@pytest.mark.parametrize("kind", ["full", "export"])
def test_eval_loads_every_student_tensor_from_a_checkpoint_or_the_export(files, kind):
    student = _student(files)
    load_for_evaluation(student, files[kind])
    loaded = student.state_dict()
    for key, expected in files["student_state"].items():  # compared with the file, key by key
        assert torch.equal(loaded[key], expected), key


@pytest.mark.parametrize("kind, message", [
    ("teacher", r"is not a checkpoint of the evaluated model \(RetinaNet\): .*missing keys|"
                r"is not a checkpoint of the evaluated model \(RetinaNet\): shape mismatches"),
    ("unrelated", r"is not a checkpoint of the evaluated model \(RetinaNet\): missing keys: "
                  r"\d+, e\.g\. ")])
def test_eval_of_another_models_weights_stops_in_one_short_line(files, kind, message):
    cfg = files["cfg"].clone()
    cfg.MODEL.WEIGHTS = files[kind]
    with pytest.raises(ConfigError, match=message) as error:
        check_run(cfg, eval_only=True)
    line = str(error.value)
    assert "\n" not in line and len(line.replace(files[kind], "PATH")) < 500


def test_eval_without_weights_is_an_error(files):
    with pytest.raises(ConfigError, match="--eval-only needs trained weights"):
        check_run(files["cfg"], eval_only=True)


@pytest.mark.parametrize("kind", ["full", "export"])
def test_eval_preflight_accepts_the_runs_checkpoints(files, kind):
    cfg = files["cfg"].clone()
    cfg.MODEL.WEIGHTS = files[kind]
    check_run(cfg, eval_only=True)


def test_initialisation_of_which_nothing_loads_is_an_error(files):
    with pytest.raises(ConfigError, match=r"none of the \d+ parameters of the RetinaNet loads"):
        load_initialisation(_student(files), files["unrelated"])
    cfg = files["cfg"].clone()
    cfg.MODEL.WEIGHTS = files["unrelated"]
    with pytest.raises(ConfigError, match="none of the"):
        check_run(cfg)


def test_initialisation_share_is_the_loaded_parameters_share(files, tmp_path, caplog):
    """A backbone-only file (detectron2's partial init stays): the logged share is the
    backbone's share of the parameter values, counted here by hand."""
    backbone = {k: v for k, v in files["student_state"].items() if k.startswith("backbone.")}
    path = str(tmp_path / "backbone.pth")
    atomic_save({"model": backbone}, path)
    student = _student(files)
    params = dict(student.named_parameters())
    expected = (sum(p.numel() for k, p in params.items() if k.startswith("backbone."))
                / sum(p.numel() for p in params.values()))
    assert 0 < expected < 1
    with caplog.at_level(logging.INFO, logger="d2kd.modeling.weights"):
        assert load_initialisation(student, path) == pytest.approx(expected)
    assert "parameter tensors loaded" in caplog.text


def _training_checkpoints(output_dir, iterations):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(model, output_dir,
                                      trainer=torch.optim.SGD(model.parameters(), lr=0.1))
    for iteration in iterations:
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    return checkpointer


def test_resume_never_takes_the_student_export(tmp_path):
    """model_final.pth missing: --resume takes the newest training checkpoint, not
    model_final_student.pth (an export: no optimizer, scheduler or trainer state)."""
    out = str(tmp_path)
    checkpointer = _training_checkpoints(out, [1, 3])
    atomic_save({"model": {"weight": torch.zeros(2, 2)}, "iteration": 9},
                os.path.join(out, "model_final_student.pth"))
    checkpointer.tag_last_checkpoint("model_final.pth")  # tagged, then lost
    assert resume_checkpoint(out) == os.path.join(out, "model_0000003.pth")


def test_resume_refuses_an_export_it_is_pointed_at(tmp_path):
    out = str(tmp_path)
    checkpointer = _training_checkpoints(out, [])
    atomic_save({"model": {"weight": torch.zeros(2, 2)}},
                os.path.join(out, "model_final_student.pth"))
    checkpointer.tag_last_checkpoint("model_final_student.pth")
    with pytest.raises(ConfigError, match=r"no readable checkpoint .*not a training checkpoint"):
        resume_checkpoint(out)


def test_a_model_only_file_named_like_a_checkpoint_is_not_resumed(tmp_path):
    out = str(tmp_path)
    _training_checkpoints(out, [1])
    atomic_save({"model": {"weight": torch.zeros(2, 2)}}, os.path.join(out, "model_final.pth"))
    AtomicCheckpointer(torch.nn.Linear(2, 2), out).tag_last_checkpoint("model_final.pth")
    assert resume_checkpoint(out) == os.path.join(out, "model_0000001.pth")


def test_torn_writes_are_removed_on_the_next_start(tmp_path):
    for name in ("model_0000199.pth.k3j2ab.tmp", "last_checkpoint.x8e1.tmp", "notes.tmp",
                 "model_0000199.pth"):
        (tmp_path / name).write_text("x")
    removed = remove_torn_writes(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "last_checkpoint.x8e1.tmp", "model_0000199.pth.k3j2ab.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["model_0000199.pth", "notes.tmp"]


def test_checkpoint_is_on_disk_before_the_tag_moves(tmp_path, monkeypatch):
    """The order of operations of one checkpoint save: the checkpoint's bytes are synced, it is
    renamed into place, its folder synced, and only then is the tag written."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(d2kd_io.os, "fsync", fsync)
    monkeypatch.setattr(d2kd_io.os, "replace", replace)
    _training_checkpoints(str(tmp_path), [1])
    folder = os.path.basename(str(tmp_path))
    checkpoint = [e for e in events if "model_0000001.pth" in e[1] or e[1] == folder]
    assert [kind for kind, _ in checkpoint[:3]] == ["fsync", "rename", "fsync"]
    assert checkpoint[1] == ("rename", "model_0000001.pth") and checkpoint[2][1] == folder
    tag = events.index(("rename", "last_checkpoint"))
    assert events.index(checkpoint[2]) < tag


@pytest.mark.slow
def test_a_resumed_finished_run_keeps_its_export(files, tmp_path):
    """Resuming a finished distillation run trains nothing and leaves model_final_student.pth
    as the run wrote it (bytes and modification time)."""
    from d2kd.engine import DistillTrainer

    cfg = distill_cfg(str(tmp_path / "run"), files["teacher"], max_iter=1)
    DistillTrainer(cfg).train()
    export = tmp_path / "run" / "model_final_student.pth"
    before = (export.read_bytes(), export.stat().st_mtime_ns)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    assert (export.read_bytes(), export.stat().st_mtime_ns) == before
