"""MTPD teacher schedules: stages inside one DistillTrainer run, exact resume, ordering, joint."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONFIGS,
    TEACHER,
    TEACHER_R34,
    distill_cfg,
    launch_two_processes,
    save_untrained_teacher,
)
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import d2kd.modeling.distillation_detector as distillation_detector
from d2kd.config import ConfigError
from d2kd.config.schedule import TeacherSchedule
from d2kd.engine import DistillTrainer
from d2kd.engine.teacher_order import AdapterFit, greedy_order, normalized_residual

MID, TARGET = TEACHER, TEACHER_R34  # the chain's order, as conftest's ``teachers``
PROGRESSIVE = "DigitsDet/retinanet_R18_from_R50_R34_mtpd_mgd.yaml"


def progressive_cfg(output_dir, weights, stage_iters=(3, 3), **schedule):
    cfg = distill_cfg(str(output_dir), weights[0], max_iter=sum(stage_iters), config=PROGRESSIVE)
    cfg.DISTILL.TEACHER.CONFIGS = [os.path.join(CONFIGS, MID), os.path.join(CONFIGS, TARGET)]
    cfg.DISTILL.TEACHER.WEIGHTS = list(weights)
    cfg.DISTILL.SCHEDULE.STAGE_ITERS = list(stage_iters)
    cfg.SOLVER.WARMUP_ITERS = 2
    for key, value in schedule.items():
        cfg.DISTILL.SCHEDULE[key] = value
    return cfg


class Recorder(HookBase):
    """Per step, after the schedule's switch: LR, optimizer identity and state, resident
    teachers, head parameters."""

    def __init__(self, stop_after: int = -1):
        self.steps, self.stop_after = [], stop_after

    def before_step(self):
        model = self.trainer.model
        self.steps.append({
            "lr": {g["lr"] for g in self.trainer.optimizer.param_groups},
            "optimizer": id(self.trainer.optimizer),
            "optimizer_state": len(self.trainer.optimizer.state),
            "resident": [i for i, t in enumerate(model.teachers) if t is not None],
            "heads": {k: v.detach().clone() for k, v in model.heads.state_dict().items()},
        })

    def after_step(self):
        if self.trainer.iter == self.stop_after:
            raise KeyboardInterrupt("simulated kill")


def run(cfg, resume=False, stop_after=-1):
    seed_all_rng(cfg.SEED)  # what default_setup does in tools/train_net.py
    trainer = DistillTrainer(cfg)
    recorder = Recorder(stop_after)
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer, recorder


@pytest.fixture(scope="module")
def uninterrupted(tiny_digitsdet, teachers, module_tmp_path_factory):
    out = module_tmp_path_factory.mktemp("uninterrupted")
    cfg = progressive_cfg(out, teachers)
    cfg.DISTILL.INIT_FROM_TEACHER = True
    calls = []
    original = distillation_detector.copy_neck_and_heads
    distillation_detector.copy_neck_and_heads = lambda t, s: calls.append(t) or original(t, s)
    try:
        trainer, recorder = run(cfg)
    finally:
        distillation_detector.copy_neck_and_heads = original
    return out, trainer, recorder, calls


@pytest.mark.slow
def test_stages_switch_teacher_heads_optimizer_and_restart_the_lr(uninterrupted):
    out, trainer, recorder, calls = uninterrupted
    steps = recorder.steps
    # one teacher resident at a time: R-34 (index 0) in stage 1, R-50 (index 1) in stage 2
    assert [s["resident"] for s in steps] == [[0], [0], [0], [1], [1], [1]]
    # a fresh optimizer (no state) at the start of each stage, the same one within a stage
    assert [s["optimizer_state"] for s in steps][3] == 0 and steps[2]["optimizer_state"] > 0
    assert steps[0]["optimizer"] == steps[2]["optimizer"] != steps[3]["optimizer"]
    # heads rebuilt for the new teacher: MGD generators 128 -> 96 channels, new values
    gen = "MGDHead.generators.p3.0.weight"
    assert steps[2]["heads"][gen].shape[0] == 128 and steps[3]["heads"][gen].shape[0] == 96
    # hand-computed: per stage of 3 iterations, warm-up 2 iterations (linear from
    # WARMUP_FACTOR x, over 2/3 of the stage) into a cosine over the stage.
    base, factor = trainer.cfg.SOLVER.BASE_LR, trainer.cfg.SOLVER.WARMUP_FACTOR
    cosine = [0.5 * (1 + math.cos(math.pi * j / 3)) for j in range(3)]
    stage = [factor * cosine[0], factor + 0.5 * (cosine[2] - factor), cosine[2]]
    expected = [base * m for m in stage + stage]
    for got, want in zip([s["lr"] for s in steps], expected):
        assert len(got) == 1 and got.pop() == pytest.approx(want, rel=1e-9)
    # INIT_FROM_TEACHER: applied once, from the stage-1 teacher (FPN 128), never at stage 2
    assert len(calls) == 1 and calls[0].backbone.output_shape()["p3"].channels == 128


@pytest.mark.slow
def test_stage_outputs(uninterrupted):
    out = uninterrupted[0]
    summary = json.loads((out / "stages.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == [1, 2]
    assert [r["teachers"] for r in summary["stages"]] == [[0], [1]]
    assert [r["iterations"] for r in summary["stages"]] == [[0, 3], [3, 6]]
    for k in (1, 2):
        assert "bbox" in json.loads((out / f"stage{k}" / "results.json").read_text())
        student = torch.load(out / f"stage{k}" / "model_student.pth", weights_only=True)
        assert student["model"] and not any(n.startswith(("heads.", "student.")) for n in
                                            student["model"])
    assert (out / "stages_ap.png").read_bytes()[:4] == b"\x89PNG"
    order = json.loads((out / "teacher_order.json").read_text())
    assert order["order"] == [0, 1] and order["rule"] == "given"
    final = torch.load(out / "model_final_student.pth", weights_only=True)["model"]
    stage2 = torch.load(out / "stage2" / "model_student.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], stage2[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_period", [3, 4], ids=["at_boundary", "mid_stage_2"])
def test_resume_in_stage_2_is_bit_identical(uninterrupted, teachers, tmp_path, checkpoint_period):
    """Killed after iteration 4 (stage 2); the last checkpoint is after iteration 2 (end of
    stage 1) or 3 (in stage 2). Resuming ends with the uninterrupted run's student."""
    cfg = progressive_cfg(tmp_path, teachers)
    cfg.DISTILL.INIT_FROM_TEACHER = True
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    killed, _ = run(cfg, stop_after=4)
    assert killed.iter == 4 and not (tmp_path / "model_final.pth").exists()
    calls = []
    original = distillation_detector.copy_neck_and_heads
    distillation_detector.copy_neck_and_heads = lambda t, s: calls.append(t) or original(t, s)
    try:
        resumed, recorder = run(cfg, resume=True)
    finally:
        distillation_detector.copy_neck_and_heads = original
    assert resumed.start_iter == checkpoint_period and not calls, "no re-initialisation"
    assert [s["resident"] for s in recorder.steps] == [[1]] * (6 - checkpoint_period)
    reference = torch.load(uninterrupted[0] / "model_final.pth", weights_only=True)["model"]
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert reference.keys() == final.keys()
    different = [k for k in reference if not torch.equal(reference[k], final[k])]
    assert not different, different[:5]


def test_schedule_errors_name_the_fix(tiny_digitsdet, teachers, tmp_path):
    cfg = progressive_cfg(tmp_path, teachers)
    cfg.SOLVER.MAX_ITER = 7
    with pytest.raises(ConfigError, match=r"MAX_ITER=7 must equal the sum .*\[3, 3\].*MAX_ITER 6"):
        TeacherSchedule.from_config(cfg)
    cfg = progressive_cfg(tmp_path, teachers, STAGE_ITERS=[6])
    with pytest.raises(ConfigError, match="one positive iteration count per teacher"):
        TeacherSchedule.from_config(cfg)
    cfg = progressive_cfg(tmp_path, teachers, STAGE_OPTS=[["DISTILL.TEACHER.OPTS", "[]"], []])
    with pytest.raises(ConfigError, match=r"STAGE_OPTS\[0\]: DISTILL.TEACHER.OPTS cannot change"):
        TeacherSchedule.from_config(cfg)
    cfg = progressive_cfg(tmp_path, teachers, STAGE_OPTS=[["DISTILL.MGD.ALPA", "1e-5"], []])
    with pytest.raises(ConfigError, match=r"STAGE_OPTS\[0\]"):
        TeacherSchedule.from_config(cfg)
    cfg = progressive_cfg(tmp_path, teachers, MODE="joint", STAGE_ITERS=[], JOINT_WEIGHTS=[1.0])
    with pytest.raises(ConfigError, match="JOINT_WEIGHTS has 1 entries for 2 teachers"):
        TeacherSchedule.from_config(cfg)


def test_stage_opts_override_head_options_per_stage(tiny_digitsdet, teachers, tmp_path):
    cfg = progressive_cfg(tmp_path, teachers, STAGE_OPTS=[
        [], ["DISTILL.MGD.ALPHA", "4e-5", "DISTILL.HEADS", "['FitNetHead']"]])
    schedule = TeacherSchedule.from_config(cfg)
    assert schedule.head_config(cfg, 0) is cfg
    stage2 = schedule.head_config(cfg, 1)
    assert stage2.DISTILL.MGD.ALPHA == 4e-5 and list(stage2.DISTILL.HEADS) == ["FitNetHead"]
    model = build_model(cfg)
    model.activate(schedule.stage_teachers(1), stage2)
    assert list(model.heads) == ["FitNetHead"]
    assert [i for i, t in enumerate(model.teachers) if t is not None] == [1]


@pytest.mark.slow
def test_joint_mode_weights_every_teachers_losses(tiny_digitsdet, teachers, tmp_path):
    cfg = progressive_cfg(tmp_path, teachers, MODE="joint", STAGE_ITERS=[],
                          JOINT_WEIGHTS=[1.0, 1.0])
    cfg.SOLVER.MAX_ITER = 2
    unit = build_model(cfg)
    cfg.DISTILL.SCHEDULE.JOINT_WEIGHTS = [0.25, 0.75]
    weighted = build_model(cfg)
    weighted.load_state_dict(unit.state_dict())
    assert sorted(weighted.heads) == ["MGDHead_t0", "MGDHead_t1"]
    assert [t is not None for t in weighted.teachers] == [True, True]
    trainer = DistillTrainer(cfg)
    batch = next(trainer._trainer._data_loader_iter)
    losses = {}
    for name, model in (("unit", unit), ("weighted", weighted)):
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):
            losses[name] = model(batch)
    for index, weight in ((0, 0.25), (1, 0.75)):
        key = f"loss_kd_mgd_feat_t{index}"
        assert losses["weighted"][key].item() == pytest.approx(weight * losses["unit"][key].item(),
                                                               rel=1e-5)
    trainer.train()
    records = (tmp_path / "metrics.json").read_text()
    assert "loss_kd_mgd_feat_t0" in records and "kd/mgd_t1/loss/p3" in records
    assert json.loads((tmp_path / "stages.json").read_text())["stages"][0]["teachers"] == [0, 1]


# ---- adaptation-cost ordering ---------------------------------------------------------------
def brute_force_cost(pairs):
    """sum ||[x,1] W - y||^2 / sum ||y - mean y||^2 with W from lstsq on the explicit design
    matrix, per level; student maps resized bilinearly to the teacher's size."""
    residual = total = 0.0
    for student, teacher in pairs:
        s = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        x = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        y = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).double()
        w = torch.linalg.lstsq(x, y).solution
        residual += (x @ w - y).pow(2).sum().item()
        total += (y - y.mean(0)).pow(2).sum().item()
    return residual / total


def fitted_cost(pairs, batches=2):
    fits = []
    for student, teacher in pairs:
        fit = AdapterFit(student.shape[1], teacher.shape[1])
        for s, t in zip(student.chunk(batches), teacher.chunk(batches)):
            fit.add(s, t)
        fits.append(fit)
    return normalized_residual(fits)


def test_adaptation_cost_matches_brute_force_least_squares():
    g = torch.Generator().manual_seed(0)
    s3, s4 = torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 6, 4, 4, generator=g)
    w, b = torch.randn(9, 6, generator=g), torch.randn(9, generator=g)

    def linear(s):
        return torch.einsum("dc,nchw->ndhw", w, s) + b[None, :, None, None]

    exact = [(s3, linear(s3)), (s4, linear(s4))]
    assert fitted_cost(exact) < 1e-8 and brute_force_cost(exact) < 1e-8
    noisy = [(s3, linear(s3) + 3 * torch.randn(4, 9, 8, 8, generator=g)),
             (s4, torch.randn(4, 9, 8, 8, generator=g))]  # other resolution: resized student
    assert fitted_cost(noisy) == pytest.approx(brute_force_cost(noisy), rel=1e-6)
    assert 0.05 < fitted_cost(noisy) < 1.0
    assert greedy_order({0: 0.5, 1: 0.2, 2: 0.9, 3: 0.1}, target=2) == [3, 1, 0, 2]


@pytest.mark.slow
def test_adaptation_cost_order_is_probed_written_and_used(tiny_digitsdet, teachers, tmp_path):
    third = save_untrained_teacher(MID, tmp_path / "r50b")
    cfg = progressive_cfg(tmp_path / "run", teachers + [third], stage_iters=(1, 1, 1),
                          ORDER="adaptation_cost", PROBE_IMAGES=2)
    cfg.DISTILL.TEACHER.CONFIGS = [os.path.join(CONFIGS, c) for c in (TARGET, MID, MID)]
    cfg.DISTILL.TEACHER.WEIGHTS = [teachers[1], teachers[0], third]
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    written = json.loads((tmp_path / "run" / "teacher_order.json").read_text())
    costs = {int(k): v for k, v in written["costs"].items()}
    assert sorted(costs) == [0, 1, 2] and all(0 <= c <= 1 for c in costs.values())
    assert written["order"][-1] == 2 and written["order"] == greedy_order(costs, 2)
    model = trainer.model
    assert [i for i, t in enumerate(model.teachers) if t is not None] == [written["order"][0]]


@pytest.mark.slow
@pytest.mark.long
def test_two_process_progressive_run_switches_stages_under_ddp(tiny_digitsdet, teachers, tmp_path):
    """tools/train_net.py --num-gpus 2 (gloo): the DDP wrapper is rebuilt at the boundary."""
    launch_two_processes("retinanet_R18_from_R50_R34_mtpd_mgd.yaml", tmp_path, tiny_digitsdet,
                         "DISTILL.TEACHER.WEIGHTS", str(list(teachers)), "SOLVER.MAX_ITER", "4",
                         "DISTILL.SCHEDULE.STAGE_ITERS", "[2, 2]")
    summary = json.loads((tmp_path / "stages.json").read_text())
    assert [r["teachers"] for r in summary["stages"]] == [[0], [1]]
    assert (tmp_path / "model_final_student.pth").is_file()
    assert all((tmp_path / f"stage{k}" / "model_student.pth").is_file() for k in (1, 2))


@pytest.mark.slow
def test_each_stage_builds_its_prototype_bank_before_its_first_step(tiny_digitsdet, teachers,
                                                                   tmp_path):
    from d2kd.prototypes.refresh import PrototypeRefresher

    cfg = progressive_cfg(tmp_path, teachers, stage_iters=(2, 2))
    cfg.DISTILL.HEADS = ["GlobalKnowledgeHead"]
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 4.0
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 2
    cfg.DISTILL.PROTOTYPES.REFRESH = False  # only the builds of new banks
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    calls = []
    original = PrototypeRefresher.refresh

    def spy(refresher):
        calls.append((trainer.iter, refresher.model.teachers[refresher.model.active_teacher]
                      .backbone_shapes["p3"].channels))
        return original(refresher)

    PrototypeRefresher.refresh = spy
    try:
        trainer.train()
    finally:
        PrototypeRefresher.refresh = original
    # stage 1 (R-50/2 teacher, FPN 128) at step 0; stage 2's new heads (R-34/2, 96) at step 2
    assert calls == [(0, 128), (2, 96)]
    bank = trainer.model.heads["GlobalKnowledgeHead"].bank
    assert bank.teacher.shape[-1] == 96 and int(bank.version) == 1
