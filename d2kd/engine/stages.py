"""Staged multi-teacher distillation (MTPD) inside one :class:`DistillTrainer` run.

The stage of an iteration is a pure function of it (``TeacherSchedule.stage_of``). Switching
to a stage — at its first iteration, or on resume before the checkpoint is loaded — makes its
teacher(s) resident (the previous one is freed), builds fresh distillation heads for them,
rebuilds the optimizer over student + new heads (state reset), re-wraps the model in DDP when
there are several processes, and points the LR scheduler at the new optimizer. The LR is one
function of the global iteration: each stage runs detectron2's schedule (warm-up + cosine or
steps, ``SOLVER.STEPS`` read as stage-local iterations) over its own iterations.
"""
import gc
import json
import logging
import os
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.solver import LRMultiplier, build_lr_scheduler
from detectron2.utils import comm
from fvcore.common.param_scheduler import CompositeParamScheduler, ParamScheduler

from ..compat.cpu_distributed import create_ddp_model, unwrap_ddp
from ..compat.trainer_internals import point_lr_logging_at, scheduler_multiplier
from ..config.loading import ConfigError
from ..config.schedule import TeacherSchedule
from ..modeling.teacher import build_teacher
from ..utils.io import atomic_write_json
from .stage_report import StageReporter
from .teacher_order import adaptation_costs, greedy_order, probe_batches

logger = logging.getLogger(__name__)

ORDER_FILE = "teacher_order.json"


def stage_multiplier(cfg: CfgNode, schedule: TeacherSchedule) -> ParamScheduler:
    """LR multiplier over the whole run (``where`` = iteration / MAX_ITER): detectron2's
    schedule of ``cfg.SOLVER`` restarted in every stage over that stage's iterations."""
    parts = []
    for iters in schedule.stage_iters:
        stage_cfg = cfg.clone()
        stage_cfg.defrost()
        stage_cfg.SOLVER.MAX_ITER = iters
        scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.SOLVER.BASE_LR)
        parts.append(scheduler_multiplier(build_lr_scheduler(stage_cfg, scratch)))
    if len(parts) == 1:
        return parts[0]
    total = sum(schedule.stage_iters)
    return CompositeParamScheduler(parts, [n / total for n in schedule.stage_iters],
                                   ["rescaled"] * len(parts))


def build_stage_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer,
                             schedule: TeacherSchedule, last_iter: int = -1) -> LRMultiplier:
    """The staged schedule on ``optimizer``, positioned after step ``last_iter``."""
    if last_iter >= 0:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return LRMultiplier(optimizer, stage_multiplier(cfg, schedule), cfg.SOLVER.MAX_ITER,
                        last_iter=last_iter)


class TeacherScheduleHook(HookBase):
    """Switches stages at their first iteration and records every completed non-final stage
    (evaluation + student export, :class:`StageReporter`). Register it before the
    checkpointer, so a stage's outputs exist before a checkpoint past its end does."""

    def __init__(self, cfg: CfgNode, schedule: TeacherSchedule, reporter: StageReporter):
        self.cfg = cfg
        self.schedule = schedule
        self.reporter = reporter
        self.stage = 0  # the stage the model is built for

    # ---- set-up (called by DistillTrainer.resume_or_load) ---------------------------------
    def prepare(self, resuming: bool) -> None:
        """Fix the teacher order and build the model for the right stage: on resume, the
        stage of the checkpoint's last iteration (its heads and optimizer state are then
        loaded); on a fresh run, stage 1 of the chosen order."""
        if resuming:
            iteration = self._checkpoint_iteration()
            self.schedule.order = self._saved_order()
            self.switch(self.schedule.stage_of(iteration), last_iter=iteration)
            return
        given = list(self.schedule.order)
        if self.schedule.order_rule == "adaptation_cost":
            self.schedule.order = self._probe_order()
        else:
            self._write_order({})
        if self.schedule.order != given:
            self.switch(0, last_iter=-1)

    def _checkpoint_iteration(self) -> int:
        checkpointer = self.trainer.checkpointer
        path = checkpointer.get_checkpoint_file()
        return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])

    def _saved_order(self) -> List[int]:
        if self.schedule.order_rule == "given":
            return list(self.schedule.order)
        path = os.path.join(self.cfg.OUTPUT_DIR, ORDER_FILE)
        if not os.path.isfile(path):
            raise ConfigError(f"Cannot resume: {path} (the teacher order chosen by the "
                              "adaptation-cost probe of this run) is missing. Restore it or "
                              "start a fresh run in another OUTPUT_DIR.")
        with open(path) as f:
            return [int(i) for i in json.load(f)["order"]]

    def _probe_order(self) -> List[int]:
        """Run the adaptation-cost probe on the initial student; write and log the order."""
        model = unwrap_ddp(self.trainer.model)
        model.initialize(self.cfg.MODEL.WEIGHTS, init_from_teacher=False)
        model.release_teachers()  # one teacher at a time during the probe
        loader = self.trainer.build_test_loader(self.cfg, self.cfg.DATASETS.TRAIN[0])
        batches = probe_batches(loader, self.cfg.DISTILL.SCHEDULE.PROBE_IMAGES)
        num_teachers = len(self.cfg.DISTILL.TEACHER.CONFIGS)
        costs = adaptation_costs(model, batches, range(num_teachers),
                                 self.cfg.DISTILL.IN_FEATURES,
                                 lambda i: build_teacher(
                                     self.cfg, i, model.student.backbone.output_shape()
                                 ).to(model.device))
        order = greedy_order(costs, target=num_teachers - 1)
        self.schedule.order = order
        self._write_order(costs)
        self.switch(0, last_iter=-1)
        return order

    def _write_order(self, costs: Dict[int, float]) -> None:
        configs = list(self.cfg.DISTILL.TEACHER.CONFIGS)
        logger.info("Teacher order (%s): %s; adaptation costs: %s", self.schedule.order_rule,
                    [configs[i] for i in self.schedule.order], costs or "not measured")
        if comm.is_main_process():
            atomic_write_json(os.path.join(self.cfg.OUTPUT_DIR, ORDER_FILE), {
                "rule": self.schedule.order_rule, "order": self.schedule.order,
                "teachers": configs, "costs": {str(i): c for i, c in costs.items()},
                "stage_iters": self.schedule.stage_iters})

    # ---- switching ------------------------------------------------------------------------
    def switch(self, stage: int, last_iter: int) -> None:
        """Build model, optimizer, DDP wrapper and scheduler for ``stage``; the scheduler is
        positioned after step ``last_iter``."""
        trainer = self.trainer
        model = unwrap_ddp(trainer.model)
        trainer.model = model  # drop the old DDP wrapper (and its gradient hooks) first
        gc.collect()
        model.activate(self.schedule.stage_teachers(stage),
                       self.schedule.head_config(self.cfg, stage))
        optimizer = trainer.build_optimizer(self.cfg, model)
        trainer.model = create_ddp_model(model, broadcast_buffers=False)
        trainer.optimizer = optimizer
        trainer.scheduler = build_stage_lr_scheduler(self.cfg, optimizer, self.schedule,
                                                     last_iter)
        point_lr_logging_at(trainer, optimizer)
        self.stage = stage
        logger.info("Stage %d/%d (iterations %d-%d): teacher(s) %s, heads %s",
                    stage + 1, self.schedule.num_stages, self.schedule.boundaries[stage],
                    self.schedule.boundaries[stage + 1] - 1,
                    sorted(model.teacher_weights), list(model.heads.keys()))

    # ---- hook interface -------------------------------------------------------------------
    def before_step(self) -> None:
        stage = self.schedule.stage_of(self.trainer.iter)
        if stage != self.stage:
            self.switch(stage, last_iter=self.trainer.iter - 1)

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self.stage < self.schedule.num_stages - 1 and \
                next_iter == self.schedule.boundaries[self.stage + 1]:
            self.reporter.record(self.stage, self._evaluate(), unwrap_ddp(self.trainer.model),
                                 self.trainer.iter)

    def _evaluate(self) -> Dict:
        trainer, cfg = self.trainer, self.cfg
        folder = self.reporter.stage_dir(self.stage)
        evaluators = [trainer.build_evaluator(cfg, name, os.path.join(folder, "inference", name))
                      for name in cfg.DATASETS.TEST]
        return trainer.test(cfg, trainer.model, evaluators) if evaluators else {}


class FinalStageReportHook(HookBase):
    """Records the last stage after a completed run with the trainer's final evaluation
    (register it after detectron2's EvalHook)."""

    def __init__(self, schedule: TeacherSchedule, reporter: StageReporter):
        self.schedule = schedule
        self.reporter = reporter

    def after_train(self) -> None:
        if self.trainer.iter < self.trainer.max_iter:
            return  # the run did not complete
        results: Optional[Dict] = getattr(self.trainer, "_last_eval_results", None)
        self.reporter.record(self.schedule.num_stages - 1, results or {},
                             unwrap_ddp(self.trainer.model), self.trainer.iter - 1)


def build_schedule_hooks(cfg: CfgNode, schedule: TeacherSchedule) -> List[HookBase]:
    """(switching hook, final-stage hook) sharing one reporter."""
    reporter = StageReporter(cfg, schedule)
    return [TeacherScheduleHook(cfg, schedule, reporter), FinalStageReportHook(schedule, reporter)]


def schedule_of(cfg: CfgNode) -> Optional[TeacherSchedule]:
    """The teacher schedule of a distillation config (None: single teacher, or no distillation)."""
    if cfg.MODEL.META_ARCHITECTURE != "DistillationDetector":
        return None
    return TeacherSchedule.from_config(cfg)


def insert_schedule_hooks(hooks: List[Optional[HookBase]], cfg: CfgNode
                          ) -> Optional[TeacherScheduleHook]:
    """Insert the schedule's hooks into detectron2's default list (in place): stage switching
    before the checkpointer, the final-stage record after the final
    evaluation. Returns the switching hook (None without a schedule)."""
    schedule = schedule_of(cfg)
    if schedule is None:
        return None
    switching, final = build_schedule_hooks(cfg, schedule)
    evaluation = next(i for i, h in enumerate(hooks) if isinstance(h, EvalHook))
    hooks.insert(evaluation + 1, final)
    checkpointer = next(i for i, h in enumerate(hooks) if isinstance(h, (PeriodicCheckpointer,
                                                                         EvalHook)))
    hooks.insert(checkpointer, switching)
    return switching
