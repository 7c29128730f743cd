"""The teacher schedule of a distillation run (``DISTILL.SCHEDULE``), parsed and validated.

Stages are contiguous blocks of iterations; the stage of an iteration is a pure function of
it (cumulative ``STAGE_ITERS``), which is what makes ``--resume`` mid-stage exact. A stage
names its active teachers with their loss weights: ``progressive`` has one teacher per stage
(the k-th of the order), ``joint`` one stage with every teacher, ``single`` (no schedule) the
first teacher for the whole run.
"""
import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from detectron2.config import CfgNode

from .loading import ConfigError

MODES = ("single", "progressive", "joint")
ORDERS = ("given", "adaptation_cost")
# DISTILL.* keys a stage may not override: they describe the run, not the stage's heads.
_RUN_LEVEL_KEYS = ("DISTILL.SCHEDULE.", "DISTILL.TEACHER.", "DISTILL.STUDENT_META_ARCHITECTURE",
                   "DISTILL.INIT_FROM_TEACHER")


@dataclass
class TeacherSchedule:
    """Stages of a ``progressive`` or ``joint`` run.

    Attributes:
        mode: "progressive" or "joint".
        stage_iters: iterations of each stage (sum = ``SOLVER.MAX_ITER``).
        order: teacher index (into ``DISTILL.TEACHER.CONFIGS``) of each progressive stage;
            ``[0, 1, ...]`` until an ``adaptation_cost`` probe sets it.
        stage_opts: per stage, ``KEY VALUE`` overrides of ``DISTILL.*`` for its heads.
        joint_weights: joint mode's loss weight per teacher.
        order_rule: "given" or "adaptation_cost".
    """

    mode: str
    stage_iters: List[int]
    order: List[int]
    stage_opts: List[List] = field(default_factory=list)
    joint_weights: List[float] = field(default_factory=list)
    order_rule: str = "given"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Optional["TeacherSchedule"]:
        """The schedule of ``cfg``, or None for ``MODE: single``; bad input is a ConfigError."""
        sched = cfg.DISTILL.SCHEDULE
        num_teachers = len(cfg.DISTILL.TEACHER.CONFIGS)
        if sched.MODE not in MODES:
            raise ConfigError(f"DISTILL.SCHEDULE.MODE={sched.MODE!r} is not one of {MODES}.")
        if sched.ORDER not in ORDERS:
            raise ConfigError(f"DISTILL.SCHEDULE.ORDER={sched.ORDER!r} is not one of {ORDERS}.")
        if sched.MODE == "single":
            if sched.STAGE_ITERS or sched.STAGE_OPTS or sched.JOINT_WEIGHTS:
                raise ConfigError("DISTILL.SCHEDULE.STAGE_ITERS / STAGE_OPTS / JOINT_WEIGHTS are "
                                  "set but MODE is 'single'; set MODE to 'progressive' or "
                                  "'joint', or remove them.")
            return None
        if cfg.TEST.PRECISE_BN.ENABLED:
            raise ConfigError("TEST.PRECISE_BN.ENABLED is not supported with a teacher schedule "
                              "(its hook keeps the model wrapper that stage switches replace).")
        if sched.MODE == "joint":
            return cls._joint(cfg, num_teachers)
        return cls._progressive(cfg, num_teachers)

    @classmethod
    def _joint(cls, cfg: CfgNode, num_teachers: int) -> "TeacherSchedule":
        sched = cfg.DISTILL.SCHEDULE
        if sched.STAGE_ITERS or sched.STAGE_OPTS or sched.ORDER != "given":
            raise ConfigError("DISTILL.SCHEDULE.MODE 'joint' is one stage of SOLVER.MAX_ITER with "
                              "every teacher: leave STAGE_ITERS and STAGE_OPTS empty and ORDER "
                              "'given'.")
        weights = [float(w) for w in sched.JOINT_WEIGHTS] or [1.0 / num_teachers] * num_teachers
        if len(weights) != num_teachers:
            raise ConfigError(f"DISTILL.SCHEDULE.JOINT_WEIGHTS has {len(weights)} entries for "
                              f"{num_teachers} teachers; give one per teacher (or none: average).")
        return cls("joint", [cfg.SOLVER.MAX_ITER], list(range(num_teachers)),
                   joint_weights=weights)

    @classmethod
    def _progressive(cls, cfg: CfgNode, num_teachers: int) -> "TeacherSchedule":
        sched = cfg.DISTILL.SCHEDULE
        iters = [int(n) for n in sched.STAGE_ITERS]
        if len(iters) != num_teachers or any(n <= 0 for n in iters):
            raise ConfigError(f"DISTILL.SCHEDULE.STAGE_ITERS={list(sched.STAGE_ITERS)} must give "
                              f"one positive iteration count per teacher ({num_teachers} in "
                              "DISTILL.TEACHER.CONFIGS).")
        if sum(iters) != cfg.SOLVER.MAX_ITER:
            raise ConfigError(f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER} must equal the sum of "
                              f"DISTILL.SCHEDULE.STAGE_ITERS={iters} ({sum(iters)}); set "
                              f"SOLVER.MAX_ITER {sum(iters)}.")
        if sched.JOINT_WEIGHTS:
            raise ConfigError("DISTILL.SCHEDULE.JOINT_WEIGHTS is only for MODE 'joint'.")
        opts = [list(o) for o in sched.STAGE_OPTS]
        if opts and len(opts) != len(iters):
            raise ConfigError(f"DISTILL.SCHEDULE.STAGE_OPTS has {len(opts)} entries for "
                              f"{len(iters)} stages; give one KEY VALUE list per stage (or none).")
        schedule = cls("progressive", iters, list(range(num_teachers)), stage_opts=opts,
                       order_rule=sched.ORDER)
        for stage in range(len(opts)):
            schedule.head_config(cfg, stage)  # fails now on a bad override
        return schedule

    @property
    def num_stages(self) -> int:
        return len(self.stage_iters)

    @property
    def boundaries(self) -> List[int]:
        """First iteration of every stage, and the total: ``[0, n1, n1 + n2, ..., MAX_ITER]``."""
        out = [0]
        for n in self.stage_iters:
            out.append(out[-1] + n)
        return out

    def stage_of(self, iteration: int) -> int:
        """0-based stage of a 0-based iteration (iterations past the end: the last stage)."""
        return min(bisect.bisect_right(self.boundaries, iteration) - 1, self.num_stages - 1)

    def stage_teachers(self, stage: int) -> Dict[int, float]:
        """Teacher index -> loss weight of the teachers active in ``stage``."""
        if self.mode == "joint":
            return dict(enumerate(self.joint_weights))
        return {self.order[stage]: 1.0}

    def head_config(self, cfg: CfgNode, stage: int) -> CfgNode:
        """``cfg`` with ``stage``'s ``STAGE_OPTS`` merged: the config its heads are built from."""
        if not self.stage_opts or not self.stage_opts[stage]:
            return cfg
        opts = self.stage_opts[stage]
        where = f"DISTILL.SCHEDULE.STAGE_OPTS[{stage}]"
        if len(opts) % 2:
            raise ConfigError(f"{where} must be KEY VALUE pairs, got an odd number: {opts}")
        for key in opts[0::2]:
            if not str(key).startswith("DISTILL.") or str(key).startswith(_RUN_LEVEL_KEYS):
                raise ConfigError(f"{where}: {key} cannot change per stage; a stage overrides "
                                  "head options (DISTILL.HEADS, DISTILL.<HEAD>.*, "
                                  "DISTILL.IN_FEATURES, DISTILL.ADAPTER).")
        stage_cfg = cfg.clone()
        stage_cfg.defrost()
        try:
            stage_cfg.merge_from_list(opts)
        except (KeyError, AssertionError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        stage_cfg.freeze()
        return stage_cfg

