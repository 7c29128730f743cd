"""The runs behind a certificate: the distilled student, its matched control and the teachers,
over seeds, each evaluated on every split (docs/certify.md).

Every run is an ordinary ``train_net`` output folder made by the command a user types
(:func:`d2kd.apps.launch.process.run_train_net`), with the launch options given to ``certify``
(``--num-gpus``, ``--num-machines``, ...). A finished run (``certify_run.json``) is reused
unless its saved config differs from what the config gives now (then it is an error); an
interrupted one is resumed (``--resume``); an evaluation whose ``results.json`` exists is
reused. So running ``certify`` again after a kill goes on where it stopped.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

from detectron2.config import CfgNode

from ...config import ConfigError, load_config
from ...config.saved import config_mismatches
from ...config.teachers import YACS, load_teacher_config, teacher_specs, teacher_weights
from ...modeling.distillation_detector import student_config
from ...utils.io import atomic_write_json, atomic_write_text
from ..launch.process import run_options, run_train_net
from .provenance import record_start, run_provenance

logger = logging.getLogger(__name__)

RECORD = "certify_run.json"
CONTROL_CONFIG = "control.yaml"


def control_overrides(cfg: CfgNode) -> List[str]:
    """The overrides that turn a distillation config into its matched control: the same
    student (architecture and initialisation), schedule, data, input and seeds, without any
    teacher or head."""
    if cfg.MODEL.META_ARCHITECTURE != "DistillationDetector":
        raise ConfigError(f"certify needs a distillation config (MODEL.META_ARCHITECTURE: "
                          f"DistillationDetector), got {cfg.MODEL.META_ARCHITECTURE}.")
    return ["MODEL.META_ARCHITECTURE", cfg.DISTILL.STUDENT_META_ARCHITECTURE, "DISTILL.HEADS",
            "[]", "DISTILL.TEACHER.CONFIGS", "[]", "DISTILL.TEACHER.WEIGHTS", "[]"]


def control_config(cfg: CfgNode) -> CfgNode:
    """The matched control of a distillation config (:func:`control_overrides` applied)."""
    control = student_config(cfg)
    control.merge_from_list(control_overrides(cfg))
    return control


def control_identity(control: CfgNode) -> str:
    """What a control run trains, as text: its config without ``DISTILL`` (no distillation
    runs) and ``OUTPUT_DIR`` — equal for every method on the same student and schedule."""
    identity = control.clone()
    identity.defrost()
    del identity["DISTILL"]
    identity.OUTPUT_DIR = ""
    return identity.dump()


@dataclass
class Arm:
    """One row of the certificate: a config trained over seeds (or fixed weights)."""

    name: str  # "distilled", "control", "teacher_<i>", "teacher_<i>_used"
    config_file: str
    opts: List[str]
    seeds: List[int]
    folder: str  # its runs (or, for given weights, their evaluations): FOLDER/seed<k>
    ignored: Sequence[str] = ()  # settings its finished runs need not match (control: DISTILL)
    weights: Dict[int, str] = field(default_factory=dict)  # seed -> given weights: no training
    aps: Dict[str, Dict[int, float]] = field(default_factory=dict)  # split -> seed -> AP


@dataclass
class CertifyPlan:
    """What ``certify`` trains and evaluates, where."""

    config_file: str
    opts: List[str]
    seeds: List[int]
    splits: List[str]
    output: str
    teacher_seeds: List[int] = field(default_factory=list)
    launch_args: List[str] = field(default_factory=list)  # --num-gpus N ... for train_net
    threads: int = 0
    shared: str = ""  # where control and teacher runs are shared by content (OUTPUT/..)
    teacher_runs: List[str] = field(default_factory=list)  # finished runs of teacher 0

    def _shared_folder(self, kind: str, config_text: str) -> str:
        """``SHARED/<kind>/<hash of the config>``: runs of the same config, seeds and data,
        whichever certificate asks for them."""
        shared = self.shared or os.path.dirname(os.path.abspath(self.output))
        digest = hashlib.sha256(config_text.encode()).hexdigest()[:16]
        return os.path.join(shared, kind, digest)

    def arms(self) -> List[Arm]:
        """The control and the distilled student, then per teacher the weights the runs
        distilled from and (``teacher_seeds``) the teacher config trained over seeds.

        Control runs live in ``SHARED/controls/<hash of the control config>`` and teacher runs
        in ``SHARED/teachers/<hash>``: certificates of several methods for the same student,
        schedule and data (or the same teacher) share them. ``teacher_runs``: finished runs
        of teacher 0 evaluated instead of training it."""
        cfg = load_config(self.config_file, self.opts)
        control = control_identity(control_config(cfg))
        control_folder = self._shared_folder("controls", control)
        control_file = os.path.join(control_folder, CONTROL_CONFIG)
        if not os.path.isfile(control_file):
            atomic_write_text(control_file, control)  # a record: what its runs train
        out = self.output
        arms = [Arm("control", self.config_file, [*self.opts, *control_overrides(cfg)],
                    list(self.seeds), control_folder, ignored=("DISTILL.",)),
                Arm("distilled", self.config_file, list(self.opts), list(self.seeds),
                    os.path.join(out, "distilled"))]
        plain_opts = _without_distill_keys(self.opts)
        for spec in teacher_specs(cfg):
            if spec.kind != YACS:
                continue  # a LazyConfig teacher is evaluated by its own tools
            teacher_cfg = load_teacher_config(spec, cfg)
            name = f"teacher_{spec.index}"
            arms.append(Arm(f"{name}_used", spec.config_file, plain_opts, [0],
                            os.path.join(out, f"{name}_used"),
                            weights={0: teacher_weights(spec, teacher_cfg)}))
            if spec.index == 0 and self.teacher_runs:
                runs = dict(enumerate(self.teacher_runs))
                arms.append(Arm(name, spec.config_file, plain_opts, list(runs),
                                os.path.join(out, name),
                                weights={k: os.path.join(r, "model_final.pth")
                                         for k, r in runs.items()}))
            elif self.teacher_seeds:
                text = load_config(spec.config_file, plain_opts).dump()
                arms.append(Arm(name, spec.config_file, plain_opts, list(self.teacher_seeds),
                                self._shared_folder("teachers", text)))
        return arms


def _without_distill_keys(opts: Sequence[str]) -> List[str]:
    """The ``KEY VALUE`` overrides that apply to any detector config (not ``DISTILL.*``)."""
    pairs = zip(list(opts)[0::2], list(opts)[1::2])
    return [x for key, value in pairs if not key.startswith("DISTILL.") for x in (key, value)]


def run_dir(arm: Arm, seed: int) -> str:
    return os.path.join(arm.folder, f"seed{seed}")


@contextlib.contextmanager
def _run_lock(folder: str) -> Iterator[None]:
    """Hold ``folder``'s lock: certificates run at once (lanes, machines sharing the folder)
    train a shared control or teacher run once, the others wait and reuse it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".certify.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def train(plan: CertifyPlan, arm: Arm, seed: int) -> str:
    """Train (or reuse, or resume) ``arm`` at ``seed``; returns the weights to evaluate."""
    if arm.weights:
        return arm.weights[seed]
    out = run_dir(arm, seed)
    record = os.path.join(out, RECORD)
    opts = [*arm.opts, *run_options(arm.config_file, seed, out)]
    with _run_lock(out):
        if os.path.isfile(record):
            stale = config_mismatches(out, arm.config_file, opts, arm.ignored)
            if stale:
                raise ConfigError(f"The finished run {out} was trained with other settings than "
                                  f"{arm.config_file} gives now: {'; '.join(stale)}. Move it "
                                  "away or certify into another --output.")
            return os.path.join(out, "model_final.pth")
        logger.info("certify: training %s seed %d in %s", arm.name, seed, out)
        record_start(load_config(arm.config_file, opts), out, plan.threads)
        seconds = run_train_net(arm.config_file, ["--resume", *plan.launch_args, *opts],
                                threads=plan.threads)
        atomic_write_json(record, {"config": arm.config_file, "seed": seed, "opts": arm.opts,
                                   "wall_seconds": round(seconds, 1),
                                   "provenance": run_provenance(out)})
    return os.path.join(out, "model_final.pth")


def evaluate(plan: CertifyPlan, arm: Arm, seed: int, weights: str, split: str) -> float:
    """Box AP of ``weights`` on ``split`` (``--eval-only``, reused when done)."""
    folder = os.path.join(run_dir(arm, seed), "eval", split)
    results_file = os.path.join(folder, "inference", "results.json")
    with _run_lock(folder):
        if not os.path.isfile(results_file):
            logger.info("certify: evaluating %s seed %d on %s", arm.name, seed, split)
            run_train_net(arm.config_file, ["--eval-only", *plan.launch_args, *arm.opts,
                                            "MODEL.WEIGHTS", weights, "DATASETS.TEST",
                                            f"('{split}',)", "OUTPUT_DIR", folder],
                          threads=plan.threads)
    with open(results_file) as f:
        return float(json.load(f)["bbox"]["AP"])


def run_plan(plan: CertifyPlan, on_progress=lambda arms, done, total: None) -> List[Arm]:
    """Train and evaluate every arm at every seed on every split, in the order that makes
    the paired comparison available first (control and distilled seed by seed);
    ``on_progress(arms, done, total)`` after every finished (run, split)."""
    arms = plan.arms()
    steps = [(arm, seed) for seed in plan.seeds for arm in arms[:2]]
    steps += [(arm, seed) for arm in arms[2:] for seed in arm.seeds]
    total, done = len(steps) * len(plan.splits), 0
    for arm, seed in steps:
        weights = train(plan, arm, seed)
        for split in plan.splits:
            arm.aps.setdefault(split, {})[seed] = evaluate(plan, arm, seed, weights, split)
            done += 1
            on_progress(arms, done, total)
    return arms

