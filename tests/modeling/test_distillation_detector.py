"""DistillationDetector: frozen teachers, one student forward, heads, build-time checks."""
import os

import pytest
import torch
from conftest import (
    CONFIGS,
    DISTILL,
    TEACHER,
    distill_cfg,
    save_untrained_teacher,
    tiny_training_cfg,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd.config import ConfigError, load_config
from d2kd.engine import DistillTrainer


def test_teacher_is_frozen_locked_and_outside_the_state_dict(tiny_digitsdet, tmp_path,
                                                             teacher_weights):
    model = build_model(distill_cfg(str(tmp_path), teacher_weights))
    teacher = model.teachers[0].model
    model.train()
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(k.startswith(("student.", "heads.")) for k in model.state_dict())


@pytest.mark.slow
def test_training_runs_student_backbone_once_and_never_changes_the_teacher(
        tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path), teacher_weights, heads=("MGDHead", "FitNetHead"),
                      max_iter=3)
    trainer = DistillTrainer(cfg)
    model = trainer.model
    before = {k: v.clone() for k, v in model.teachers[0].model.state_dict().items()}
    calls = []
    model.student.backbone.register_forward_hook(lambda *args: calls.append(1))
    trainer.train()
    assert len(calls) == cfg.SOLVER.MAX_ITER + len(trainer.build_test_loader(
        cfg, cfg.DATASETS.TEST[0]).dataset), "one student backbone pass per step (+ evaluation)"
    after = model.teachers[0].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.teachers[0].model.parameters())
    checkpoint = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["model"] and not any("teacher" in k for k in checkpoint["model"])
    records = (tmp_path / "metrics.json").read_text()
    assert "loss_kd_mgd_feat" in records and "kd/fitnet/loss/p3" in records


def test_teacher_weights_that_do_not_match_are_a_hard_error(tiny_digitsdet, tmp_path):
    student_cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_R18_student.yaml"),
                              ["MODEL.WEIGHTS", ""])
    DetectionCheckpointer(build_model(student_cfg), save_dir=str(tmp_path)).save("wrong")
    cfg = distill_cfg(str(tmp_path), str(tmp_path / "wrong.pth"))
    with pytest.raises(ConfigError, match="do not match the teacher config: .*shape mismatches"):
        build_model(cfg)
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "missing.pth")]
    with pytest.raises(ConfigError, match="missing.pth do not exist"):
        build_model(cfg)


def test_impossible_pairings_fail_at_build_time_naming_both_shapes(tiny_digitsdet, tmp_path,
                                                                  teacher_weights):
    cfg = distill_cfg(str(tmp_path), teacher_weights)
    cfg.DISTILL.ADAPTER = False
    with pytest.raises(ValueError, match="student has 64 channels, teacher 128"):
        build_model(cfg)
    cfg = distill_cfg(str(tmp_path), teacher_weights)
    cfg.DISTILL.IN_FEATURES = ["p2", "p3"]
    with pytest.raises(ValueError, match=r"'p2' must exist in student and teacher.*p3: 64ch"):
        build_model(cfg)


def test_unknown_head_name_lists_registered_heads(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path), teacher_weights, heads=("MDGHead",))
    with pytest.raises(KeyError, match="Unknown distillation head 'MDGHead'.*MGDHead"):
        build_model(cfg)


def test_inference_is_the_student_alone(tiny_digitsdet, tmp_path, teacher_weights):
    model = build_model(distill_cfg(str(tmp_path), teacher_weights))
    model.eval()
    image = {"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}
    torch.manual_seed(0)
    with torch.no_grad():
        ours = model([image])[0]["instances"]
        alone = model.student([image])[0]["instances"]
    assert torch.equal(ours.pred_boxes.tensor, alone.pred_boxes.tensor)


@pytest.mark.slow
def test_student_export_loads_into_a_vanilla_student_with_identical_outputs(
        tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path), teacher_weights, max_iter=2)
    trainer = DistillTrainer(cfg)
    trainer.train()
    exported = tmp_path / "model_final_student.pth"
    assert exported.is_file()
    vanilla_cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path))
    vanilla = build_model(vanilla_cfg)
    incompatible = DetectionCheckpointer(vanilla)._load_model(
        torch.load(exported, map_location="cpu", weights_only=True))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    distilled = trainer.model
    distilled.eval(), vanilla.eval()
    distilled.student.test_score_thresh = vanilla.test_score_thresh = 0.0  # keep detections
    image = {"image": torch.rand(3, 144, 192) * 255, "height": 144, "width": 192}
    with torch.no_grad():
        a = distilled([image])[0]["instances"]
        b = vanilla([image])[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    # tools/export_student.py gives the same tensors from the training checkpoint
    from d2kd.engine.export import export_student

    again = export_student(str(tmp_path / "model_final.pth"), str(tmp_path / "again.pth"))
    saved = torch.load(exported, map_location="cpu", weights_only=True)["model"]
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("config, teacher, heads", [
    (DISTILL, TEACHER, ("FGFIHead", "FgBgHead", "LogitKDHead", "LocKDHead", "DFDHead")),
    ("DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml", "DigitsDet/faster_rcnn_R50_teacher.yaml",
     ("MGDHead", "FitNetHead", "FGFIHead", "FgBgHead", "LogitKDHead", "LocKDHead")),
])
def test_every_baseline_head_trains_in_combination(tiny_digitsdet, tmp_path, config, teacher,
                                                    heads):
    weights = save_untrained_teacher(teacher, tmp_path / "teacher")
    cfg = distill_cfg(str(tmp_path / "run"), weights, heads=heads, config=config)
    trainer = DistillTrainer(cfg)
    trainer.train()
    records = (tmp_path / "run" / "metrics.json").read_text()
    for name in ("fgfi_feat", "fgbg_fg", "fgbg_bg", "logit_cls", "loc_box"):
        assert f"loss_kd_{name}" in records, name


GENOME_ALL_INPUTS = ("global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2;"
                     "instance:catt|scale_r1|norm_C|l1|w=50;logit:no|no|softmax_C|kl|w=1;"
                     "loc:no|no|no|smooth_l1|w=1")


@pytest.mark.slow
@pytest.mark.parametrize("config, teacher", [
    (DISTILL, TEACHER),
    ("DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml", "DigitsDet/faster_rcnn_R50_teacher.yaml"),
    ("DigitsDet/fcos_R18_from_R50_mgd.yaml", "DigitsDet/fcos_R50_teacher.yaml"),
])
def test_searched_distiller_trains_with_every_knowledge_input(tiny_digitsdet, tmp_path, config,
                                                              teacher):
    weights = save_untrained_teacher(teacher, tmp_path / "teacher")
    cfg = distill_cfg(str(tmp_path / "run"), weights, heads=("DetKDSHead",), config=config)
    cfg.DISTILL.DETKDS.GENOME = GENOME_ALL_INPUTS
    cfg.DISTILL.INIT_FROM_TEACHER = True
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    records = (tmp_path / "run" / "metrics.json").read_text()
    for name in ("global", "fgbg", "instance", "logit", "loc"):
        assert f"loss_kd_detkds_{name}" in records, name


def test_dense_response_heads_need_the_same_head_layout(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/fcos_R50_teacher.yaml", tmp_path / "teacher")
    cfg = distill_cfg(str(tmp_path), weights, heads=("LogitKDHead",))
    cfg.DISTILL.TEACHER.CONFIGS = [os.path.join(CONFIGS, "DigitsDet/fcos_R50_teacher.yaml")]
    with pytest.raises(ValueError, match=r"student \('RetinaNet', 10.*teacher \('FCOS', 10"):
        build_model(cfg)


def test_fresh_run_loads_student_weights_and_optionally_teacher_neck_and_heads(
        tiny_digitsdet, tmp_path, teacher_weights):
    student_cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path))
    torch.manual_seed(1)
    donor = build_model(student_cfg)
    DetectionCheckpointer(donor, save_dir=str(tmp_path)).save("student_init")
    cfg = distill_cfg(str(tmp_path / "run"), teacher_weights)
    cfg.MODEL.WEIGHTS = str(tmp_path / "student_init.pth")
    cfg.DISTILL.INIT_FROM_TEACHER = True
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    student = trainer.model.student.state_dict()
    teacher = trainer.model.teachers[0].model.state_dict()
    donor_state = donor.state_dict()
    # bottom-up backbone from MODEL.WEIGHTS; neck/head tensors from the teacher where the
    # shapes match (64- vs 128-channel convs do not; e.g. the class-score bias does)
    for name, value in student.items():
        if ".bottom_up." in name:
            assert torch.equal(value, donor_state[name]), name
        elif (name in teacher and teacher[name].shape == value.shape
              and not name.startswith("pixel")):
            assert torch.equal(value, teacher[name]), name
    copied = [n for n in student if n in teacher and teacher[n].shape == student[n].shape
              and ".bottom_up." not in n and not n.startswith("pixel")]
    assert copied, "some neck/head tensors match in shape (e.g. the class-score bias)"


@pytest.mark.slow
def test_resume_restores_student_heads_optimizer_scheduler_and_iteration(
        tiny_digitsdet, tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path), teacher_weights, max_iter=2)
    first = DistillTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    cfg.SOLVER.MAX_ITER = 3
    second = DistillTrainer(cfg)
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    state = second.model.state_dict()
    assert any(k.startswith("heads.MGDHead.generators") for k in saved["model"])
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert second.optimizer.state_dict()["state"], "AdamW moments restored"
    assert second.scheduler.last_epoch == first.scheduler.last_epoch == 2
    second.train()
    assert second.iter == cfg.SOLVER.MAX_ITER  # detectron2: iter == max_iter after success


@pytest.mark.slow
def test_teacher_of_another_family_and_normalisation_for_feature_heads(tiny_digitsdet, tmp_path):
    """Faster R-CNN teacher (P2-P6, 128 channels, BGR with other pixel statistics) for a
    RetinaNet student (P3-P7, 64 channels) on the shared levels."""
    weights = save_untrained_teacher("DigitsDet/faster_rcnn_R50_teacher.yaml", tmp_path / "t")
    cfg = distill_cfg(str(tmp_path / "run"), weights, heads=("FitNetHead", "MGDHead"))
    cfg.DISTILL.TEACHER.CONFIGS = [os.path.join(CONFIGS, "DigitsDet/faster_rcnn_R50_teacher.yaml")]
    cfg.DISTILL.TEACHER.OPTS = ["INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[103.5, 116.3, 123.7]",
                                "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    trainer = DistillTrainer(cfg)
    trainer.train()
    assert type(trainer.model.teachers[0].model).__name__ == "GeneralizedRCNN"
    assert "kd/fitnet/loss/p6" in (tmp_path / "run" / "metrics.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family, arch", [("fcos", "FCOS"), ("mask_rcnn", "GeneralizedRCNN")])
def test_fcos_and_mask_rcnn_students_distil(tiny_digitsdet, tmp_path, family, arch):
    weights = save_untrained_teacher(f"DigitsDet/{family}_R50_teacher.yaml", tmp_path / "t")
    cfg = distill_cfg(str(tmp_path / "run"), weights,
                      config=f"DigitsDet/{family}_R18_from_R50_mgd.yaml")
    assert cfg.DISTILL.STUDENT_META_ARCHITECTURE == arch
    DistillTrainer(cfg).train()
    assert (tmp_path / "run" / "model_final_student.pth").is_file()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("config", [
    DISTILL,
    "DigitsDet/faster_rcnn_R18_from_R50_logit.yaml",  # the teacher runs on the student's RoIs
])
def test_overhead_benchmark_reports_the_fixed_fields(tiny_digitsdet, tmp_path, config):
    import json
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digitsdet), OMP_NUM_THREADS="1")
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "overhead",
                    "--config-file", os.path.join(CONFIGS, config), "--json", str(out),
                    "--iters", "2", "--warmup", "1", "--random-teacher", "MODEL.WEIGHTS", "",
                    "SOLVER.IMS_PER_BATCH", "2"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    result = json.loads(out.read_text())
    for key in ("t_student", "t_teacher_forward", "t_heads", "t_distill", "peak_rss_student_mb",
                "peak_rss_distill_mb"):
        assert result[key] > 0, key
    base = result["t_student"] + result["t_teacher_forward"]
    assert result["ratio"] == pytest.approx(result["t_distill"] / base)
    assert result["ratio_without_heads"] == pytest.approx(
        (result["t_distill"] - result["t_heads"]) / base)
    assert all(len(times) == 2 for times in result["step_times"].values())
    low, high = result["ratio_ci95"]
    assert low <= result["ratio"] <= high


def test_overhead_ratio_interval_brackets_the_ratio_of_medians():
    from dev.benchmark.overhead import ratio_interval

    constant = {"student": [0.5] * 9, "teacher_forward": [0.25] * 9, "distill": [0.9] * 9}
    assert ratio_interval(constant) == pytest.approx((1.2, 1.2))
    # distillation steps 0.8 or 1.0 s: every resample's median is one of them (9 steps, odd)
    mixed = dict(constant, distill=[0.8] * 4 + [1.0] * 5)
    assert ratio_interval(mixed) == pytest.approx((0.8 / 0.75, 1.0 / 0.75))


@pytest.mark.slow
@pytest.mark.parametrize("config, teacher", [
    ("DigitsDet/retinanet_R18_from_R50_gk.yaml", TEACHER),
    ("DigitsDet/faster_rcnn_R18_from_R50_gk.yaml", "DigitsDet/faster_rcnn_R50_teacher.yaml"),
])
def test_global_knowledge_head_trains_and_weights_instances_with_the_bank(
        tiny_digitsdet, tmp_path, config, teacher):
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    weights = save_untrained_teacher(teacher, tmp_path / "teacher")
    cfg = distill_cfg(str(tmp_path / "run"), weights, heads=("GlobalKnowledgeHead",),
                      config=config)
    batch = next(iter(build_detection_train_loader(cfg)))
    model = build_model(cfg)
    model.train()
    with EventStorage(0) as storage:  # an empty bank: every weight 1, no global loss
        losses = model(batch)
        assert storage.latest()["kd/global_knowledge/weight_mean"][0] == 1.0
        assert losses["loss_kd_global_knowledge_global"].item() == 0.0
    assert any(k.startswith("heads.GlobalKnowledgeHead.bank.") for k in model.state_dict())
    trainer = DistillTrainer(cfg)
    trainer.train()  # the refresh hook builds the bank before the first step
    records = (tmp_path / "run" / "metrics.json").read_text()
    assert "prototypes/refresh_seconds" in records and "loss_kd_global_knowledge_global" in records
    # fill the bank with random prototypes: weights leave 1 and the global loss turns on
    g = torch.Generator().manual_seed(0)
    bank = model.heads["GlobalKnowledgeHead"].bank
    for level in range(len(bank.levels)):
        for cls in range(bank.num_classes):
            bank.set_prototypes(level, cls, torch.randn(bank.teacher.shape[2:], generator=g),
                                torch.randn(bank.student.shape[2:], generator=g))
    with EventStorage(0) as storage:
        losses = model(batch)
        assert losses["loss_kd_global_knowledge_global"].item() > 0
        assert storage.latest()["kd/global_knowledge/weight_mean"][0] < 1.0
