"""certify end to end on tiny runs: the matched control, the teacher arms, the certificate,
reuse of finished runs, and one line for bad input."""
import json
import os

import pytest
from conftest import CONFIGS, save_untrained_teacher

from d2kd.apps.certify.__main__ import main as certify
from d2kd.apps.certify.runs import control_config
from d2kd.config import load_config
from d2kd.data import register_builtin_datasets

pytestmark = pytest.mark.slow

MGD = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_mgd.yaml")
TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "TEST.EVAL_PERIOD", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]  # detections


@pytest.fixture
def builtin_is_tiny(tiny_digitsdet, monkeypatch):
    """``digitsdet_*`` registered at the tiny copy, in this process (certify's pre-start
    check) and in the runs it starts (``DETECTRON2_DATASETS``); restored afterwards."""
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(tiny_digitsdet))
    register_builtin_datasets()
    yield
    monkeypatch.undo()
    register_builtin_datasets()


def test_the_control_is_the_same_student_without_distillation():
    cfg = load_config(MGD)
    control = control_config(cfg)
    assert control.MODEL.META_ARCHITECTURE == cfg.DISTILL.STUDENT_META_ARCHITECTURE
    assert control.DISTILL.HEADS == [] and control.DISTILL.TEACHER.CONFIGS == []
    for key in ("SOLVER", "DATASETS", "INPUT", "DATALOADER"):
        assert control[key] == cfg[key], key
    assert control.MODEL.WEIGHTS == cfg.MODEL.WEIGHTS and control.SEED == cfg.SEED
    assert control.MODEL.RESNETS == cfg.MODEL.RESNETS and control.MODEL.FPN == cfg.MODEL.FPN


@pytest.mark.long
def test_certify_trains_evaluates_and_reuses(builtin_is_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    teacher = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "teacher")
    argv = [MGD, "--seeds", "2", "--teacher-seeds", "2", "--splits", "digitsdet_test",
            "digitsdet_val", "--output", str(tmp_path / "cert"), *TINY,
            "DISTILL.TEACHER.WEIGHTS", f"['{teacher}']"]
    certify(argv)
    cert = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    for split in ("digitsdet_test", "digitsdet_val"):
        result = cert["splits"][split]
        assert sorted(result["arms"]) == ["control", "distilled", "teacher_0", "teacher_0_used"]
        assert len(result["arms"]["distilled"]["aps"]) == 2 and result["paired_seeds"] == [0, 1]
        distilled, control = (result["arms"][a]["aps"] for a in ("distilled", "control"))
        assert all(ap is not None for ap in [*distilled.values(), *control.values()])
        diffs = [distilled[s] - control[s] for s in ("0", "1")]
        assert result["vs_control"]["difference"] == pytest.approx(sum(diffs) / 2)
        assert result["vs_control"]["method"] == "paired t"
        assert result["vs_control"]["verdict"] in ("gain certified", "no measurable gain", "loss")
        assert result["vs_teacher_0"]["method"] == "Welch t"
        assert result["vs_teacher_0_used"]["method"] == "one-sample t"
    assert (tmp_path / "cert" / "certificate.png").stat().st_size > 0
    assert "## digitsdet_test" in (tmp_path / "cert" / "certificate.md").read_text()
    (control,) = (tmp_path / "controls").iterdir()  # shared by content beside the output
    assert sorted(p.name for p in control.iterdir()) == ["control.yaml", "seed0", "seed1"]
    (teacher_runs,) = (tmp_path / "teachers").iterdir()
    assert sorted(p.name for p in teacher_runs.iterdir()) == ["seed0", "seed1"]
    record = tmp_path / "cert" / "distilled" / "seed1" / "certify_run.json"
    provenance = json.loads(record.read_text())["provenance"]
    assert provenance["inputs"]["teachers"][0]["sha256"] and provenance["software"]["threads"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model_final.pth")}
    capsys.readouterr()
    certify(argv)  # everything finished: reused, nothing trained again
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((tmp_path / "cert" / "certificate.json").read_text())["splits"] == \
        cert["splits"]
    # teachers trained elsewhere: evaluated as the teacher's seeds, not trained
    at = argv.index("--teacher-seeds")
    certify([*argv[:at], "--teacher-runs", str(teacher_runs / "seed0"),
             str(teacher_runs / "seed1"), *argv[at + 2:]])
    given = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in before} == before
    for split in ("digitsdet_test", "digitsdet_val"):
        assert given["splits"][split]["arms"]["teacher_0"] == \
            cert["splits"][split]["arms"]["teacher_0"]


def test_bad_input_is_one_line_before_anything_runs(builtin_is_tiny, tmp_path):
    student = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_student.yaml")
    with pytest.raises(SystemExit) as stop:
        certify([student, "--output", str(tmp_path / "cert"), "MODEL.WEIGHTS", ""])
    assert str(stop.value.code).startswith("error: certify needs a distillation config")
    with pytest.raises(SystemExit) as stop:
        certify([MGD, "--splits", "digitsdet_tset", "--output", str(tmp_path / "cert"), *TINY,
                 "DISTILL.TEACHER.WEIGHTS", f"['{tmp_path}/missing.pth']"])
    assert str(stop.value.code).startswith("error: ")
    assert not (tmp_path / "cert").exists()
