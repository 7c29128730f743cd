"""The proxy evaluator of DetKDS: one candidate genome -> box AP after a short training.

A trial trains with :class:`ProxyTrainer` (the same :class:`DistillTrainer` as normal
training, without checkpoints) for ``DISTILL.DETKDS.SEARCH.PROXY_ITERS`` iterations on a fixed,
seeded subset of ``DATASETS.TRAIN[0]`` and is evaluated with ``COCOEvaluator`` on a fixed set of
validation images: by default (``VAL_SOURCE: train_holdout``) training images held out of the
proxy's training subset, so that the split every reported AP uses (``DATASETS.TEST``) takes no
part in the search; with ``VAL_SOURCE: test`` a subset of ``DATASETS.TEST[0]`` (see
:func:`register_proxy_datasets`).

Every trial runs in its own process, forked from a per-worker fork server that has torch and
detectron2 already imported (a start costs well under a second instead of ~5 s of imports), so
a crash, an OOM kill or a ``kill -9`` of the trial cannot corrupt the worker or the Optuna
storage: the trial process never touches the storage. It talks to the worker over a pipe:
``("report", iteration, ap)`` (answered with True to prune) and ``("done", outcome)``. A
trial process kills itself when its worker dies (EOF on a lifeline pipe only the worker
holds), so a killed worker leaves no orphan training.

Outcomes: ``ok`` (final AP), ``rejected`` (a KD loss non-finite or above
``REJECT_THRESHOLD`` after warm-up: the candidate's fault, fitness -inf), ``pruned`` (the
pruner stopped it at the intermediate evaluation). A trial process that dies without an
outcome is an :class:`InfrastructureFailure`, which the driver retries instead of scoring.
"""
import ctypes
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ...config import load_config
from ...data import register_builtin_datasets
from ...engine import DistillTrainer
from ...engine.export import StudentExportHook
from .pruning import report_iterations
from .space import BASELINE

logger = logging.getLogger(__name__)

HEAD = "DetKDSHead"
#: Report callback of a trial: (iteration, box AP) -> prune?
ReportFn = Callable[[int, float], bool]


class CandidateRejected(RuntimeError):
    """The candidate's KD loss exploded: its own fault, recorded as ``rejected``."""


class PruneRequested(RuntimeError):
    """The pruner stopped the trial at its intermediate evaluation."""

    def __init__(self, ap: float):
        super().__init__(f"pruned at AP {ap:.2f}")
        self.ap = ap


class InfrastructureFailure(RuntimeError):
    """The trial process died without an outcome (killed, OOM, an error not caused by the
    candidate): the driver retries the trial."""


@dataclass
class TrialOutcome:
    status: str  # "ok" | "rejected" | "pruned"
    ap: float  # box AP (percent); -inf when rejected; the intermediate AP when pruned
    seconds: float  # config loading + model building + training + evaluation, in the trial process
    reason: str = ""


# ---- datasets ----------------------------------------------------------------------------
def _register_selection(name: str, source: str, select: Callable[[int], List[int]]) -> str:
    """Register ``name``: the images ``select(len(source))`` (indices) of ``source``, in
    dataset order. It has no ``json_file`` metadata, so ``COCOEvaluator`` builds its ground
    truth from these images alone (the full file would count the left-out ones as misses)."""
    if name in DatasetCatalog.list():
        return name

    def load() -> List[Dict]:
        dicts = DatasetCatalog.get(source)
        return [dicts[i] for i in sorted(select(len(dicts)))]

    DatasetCatalog.register(name, load)
    metadata = {k: v for k, v in MetadataCatalog.get(source).as_dict().items()
                if k not in ("name", "json_file")}
    MetadataCatalog.get(name).set(**metadata)
    return name


def register_subset(source: str, size: int, seed: int) -> str:
    """Register ``<source>_proxy_subset_<size>_<seed>``: ``size`` images of ``source`` drawn
    with ``seed`` (kept in dataset order). ``size <= 0`` returns ``source`` itself."""
    if size <= 0:
        return source
    return _register_selection(
        f"{source}_proxy_subset_{size}_{seed}", source,
        lambda n: range(n) if size >= n else random.Random(seed).sample(range(n), size))


def register_holdout_split(source: str, train_size: int, val_size: int,
                           seed: int) -> Tuple[str, str]:
    """Register two disjoint selections of ``source`` from one permutation drawn with
    ``seed``: ``<source>_proxy_holdout_<val_size>_<seed>`` (its first ``val_size`` images)
    and ``<source>_proxy_train_<train_size>_<val_size>_<seed>`` (the next ``train_size``;
    ``train_size <= 0``: all the others). Returns (train name, holdout name)."""
    if val_size <= 0:
        raise ValueError("DISTILL.DETKDS.SEARCH.VAL_SOURCE 'train_holdout' needs VAL_IMAGES > 0 "
                         "(the held-out images the proxy is evaluated on).")

    def order(n: int) -> List[int]:
        if val_size >= n:
            raise ValueError(f"DISTILL.DETKDS.SEARCH.VAL_IMAGES={val_size} leaves no training "
                             f"image of {source} ({n} images) for the proxy.")
        return random.Random(seed).sample(range(n), n)

    holdout = _register_selection(f"{source}_proxy_holdout_{val_size}_{seed}", source,
                                  lambda n: order(n)[:val_size])
    train = _register_selection(
        f"{source}_proxy_train_{train_size}_{val_size}_{seed}", source,
        lambda n: order(n)[val_size:val_size + train_size if train_size > 0 else n])
    return train, holdout


def register_proxy_datasets(cfg) -> Tuple[str, str]:
    """(training, validation) datasets of a proxy trial of ``cfg`` (see module docstring)."""
    search = cfg.DISTILL.DETKDS.SEARCH
    if search.VAL_SOURCE == "train_holdout":
        return register_holdout_split(cfg.DATASETS.TRAIN[0], search.TRAIN_IMAGES,
                                      search.VAL_IMAGES, search.SUBSET_SEED)
    if search.VAL_SOURCE == "test":
        return (register_subset(cfg.DATASETS.TRAIN[0], search.TRAIN_IMAGES, search.SUBSET_SEED),
                register_subset(cfg.DATASETS.TEST[0], search.VAL_IMAGES, search.SUBSET_SEED))
    raise ValueError(f"DISTILL.DETKDS.SEARCH.VAL_SOURCE={search.VAL_SOURCE!r} is not one of "
                     "'train_holdout', 'test'.")


def proxy_config(cfg, genome: Optional[str], output_dir: str):
    """``cfg`` (a DetKDS distillation config) turned into the proxy training of ``genome``
    (:data:`BASELINE` / None: the same run without the DetKDS head). Registers the subsets."""
    search = cfg.DISTILL.DETKDS.SEARCH
    if HEAD not in cfg.DISTILL.HEADS:
        raise ValueError(f"The search config must distil with {HEAD} (DISTILL.HEADS = "
                         f"{list(cfg.DISTILL.HEADS)}); start from a configs/*/*_detkds.yaml.")
    if len(cfg.DATASETS.TRAIN) != 1 or len(cfg.DATASETS.TEST) != 1:
        raise ValueError("The proxy subsamples one training and one test dataset; got "
                         f"DATASETS.TRAIN={cfg.DATASETS.TRAIN}, DATASETS.TEST={cfg.DATASETS.TEST}.")
    cfg = cfg.clone()
    cfg.defrost()
    if genome in (None, BASELINE):
        cfg.DISTILL.HEADS = [h for h in cfg.DISTILL.HEADS if h != HEAD]
    else:
        cfg.DISTILL.DETKDS.GENOME = genome
    cfg.SOLVER.MAX_ITER = search.PROXY_ITERS
    cfg.SOLVER.WARMUP_ITERS = min(search.PROXY_WARMUP_ITERS, search.PROXY_ITERS)
    if search.PROXY_IMS_PER_BATCH > 0:
        cfg.SOLVER.IMS_PER_BATCH = search.PROXY_IMS_PER_BATCH
    if search.PROXY_WEIGHTS:
        cfg.MODEL.WEIGHTS = search.PROXY_WEIGHTS
    train, val = register_proxy_datasets(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = output_dir
    return cfg


def box_ap(results: Dict) -> float:
    """Box AP of COCOEvaluator results; NaN (no detection at all) counts as 0."""
    ap = results["bbox"]["AP"]
    return 0.0 if math.isnan(ap) else float(ap)


# ---- the trainer of a trial --------------------------------------------------------------
class KDGuardHook(HookBase):
    """Raise :class:`CandidateRejected` when the step's summed ``loss_kd_*`` is non-finite,
    or above ``threshold`` from iteration ``warmup`` on."""

    def __init__(self, threshold: float, warmup: int):
        self.threshold = threshold
        self.warmup = warmup

    def after_step(self):
        storage = self.trainer.storage
        kd = [v for k, (v, it) in storage.latest().items()
              if k.startswith("loss_kd_") and it == storage.iter]
        total = float(sum(kd))
        if not math.isfinite(total) or (self.trainer.iter >= self.warmup
                                        and total > self.threshold):
            raise CandidateRejected(f"KD loss {total:.4g} at iteration {self.trainer.iter} "
                                    f"(threshold {self.threshold:g} after {self.warmup}).")


class IntermediateEvalHook(HookBase):
    """After each of ``at_iters`` iterations, evaluate and report box AP; raise
    :class:`PruneRequested` when a report answers True."""

    def __init__(self, at_iters: List[int], report: ReportFn):
        self.at_iters = set(at_iters)
        self.report = report

    def after_step(self):
        done = self.trainer.iter + 1
        if done not in self.at_iters:
            return
        ap = box_ap(self.trainer.test(self.trainer.cfg, self.trainer.model))
        if self.report(done, ap):
            raise PruneRequested(ap)


class ProxyTrainer(DistillTrainer):
    """:class:`DistillTrainer` for one trial: no checkpoints or student export, the KD-loss
    guard, and the intermediate evaluations for pruning (:func:`report_iterations`)."""

    def __init__(self, cfg, report: ReportFn):
        self._report = report
        super().__init__(cfg)

    def train(self) -> Dict:
        """Train; returns the final evaluation (detectron2 returns it only when
        ``TEST.EXPECTED_RESULTS`` is set; its EvalHook keeps it in ``_last_eval_results``)."""
        super().train()
        return self._last_eval_results

    def build_hooks(self):
        search = self.cfg.DISTILL.DETKDS.SEARCH
        kept = [h for h in super().build_hooks()
                if not isinstance(h, (hooks.PeriodicCheckpointer, StudentExportHook))]
        kept.insert(-1, KDGuardHook(search.REJECT_THRESHOLD, self.cfg.SOLVER.WARMUP_ITERS))
        at_iters = report_iterations(search)
        if at_iters:
            kept.insert(-1, IntermediateEvalHook(at_iters, self._report))
        return kept


# ---- the trial process -------------------------------------------------------------------
@dataclass
class ProxyRequest:
    config_file: str
    opts: List[str]
    genome: Optional[str]  # None / BASELINE: no DetKDS head
    output_dir: str
    threads: int
    env: Dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process dies (worker processes of the driver)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def exit_with_worker(lifeline) -> None:
    """SIGKILL this process once ``lifeline`` (the reading end of a pipe whose only writer is
    the worker) reaches EOF, i.e. when the worker dies. (The parent of a trial process is the
    fork server, which outlives a killed worker while it has children, so
    :func:`die_with_parent` would not fire.)"""
    def watch():
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def run_proxy_trial(request: ProxyRequest, conn, lifeline) -> None:
    """Entry point of a trial process; stdout/stderr go to ``OUTPUT_DIR/trial.log``."""
    exit_with_worker(lifeline)
    start = time.perf_counter()
    os.environ.update(request.env)
    # The fork server imported d2kd (which registers DigitsDet under $DETECTRON2_DATASETS)
    # before this trial's environment applied: register it again where the worker has it.
    register_builtin_datasets()
    os.makedirs(request.output_dir, exist_ok=True)
    log = open(os.path.join(request.output_dir, "trial.log"), "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import torch

    torch.set_num_threads(request.threads)

    def report(iteration: int, ap: float) -> bool:
        conn.send(("report", iteration, ap))
        return bool(conn.recv())

    cfg = proxy_config(load_config(request.config_file, request.opts), request.genome,
                       request.output_dir)
    cfg.freeze()
    setup_logger(cfg.OUTPUT_DIR)
    setup_logger(cfg.OUTPUT_DIR, name="d2kd")
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    try:
        trainer = ProxyTrainer(cfg, report)
        trainer.resume_or_load(resume=False)
        outcome = TrialOutcome("ok", box_ap(trainer.train()), 0.0)
    except (CandidateRejected, FloatingPointError) as e:
        outcome = TrialOutcome("rejected", -math.inf, 0.0, str(e).splitlines()[0])
    except PruneRequested as e:
        outcome = TrialOutcome("pruned", e.ap, 0.0, str(e))
    outcome.seconds = time.perf_counter() - start
    conn.send(("done", asdict(outcome)))


_CONTEXT = None


def trial_context() -> mp.context.BaseContext:
    """This process's fork-server context (torch, detectron2 and d2kd preloaded)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload([__name__])
    return _CONTEXT


class ProxyEvaluator:
    """Runs one trial per call in a fresh trial process (see the module docstring)."""

    def __init__(self, config_file: str, opts: List[str], threads: int):
        self.config_file = os.path.abspath(config_file)
        self.opts = list(opts)
        self.threads = threads

    def __call__(self, genome: Optional[str], output_dir: str, report: ReportFn) -> TrialOutcome:
        ctx = trial_context()
        request = ProxyRequest(self.config_file, self.opts, genome, output_dir, self.threads,
                               {k: v for k, v in os.environ.items()
                                if k in ("CUDA_VISIBLE_DEVICES", "DETECTRON2_DATASETS")})
        parent, child = ctx.Pipe()
        lifeline, lifeline_writer = ctx.Pipe(duplex=False)  # never written: EOF = worker gone
        process = ctx.Process(target=run_proxy_trial, args=(request, child, lifeline),
                              name=f"trial:{os.path.basename(output_dir)}")
        process.start()
        child.close()
        lifeline.close()
        outcome = None
        try:
            while outcome is None:
                if not parent.poll(1.0):
                    if not process.is_alive() and not parent.poll(0):
                        break
                    continue
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if message[0] == "report":
                    parent.send(bool(report(message[1], message[2])))
                else:
                    outcome = TrialOutcome(**message[1])
        finally:
            process.join(timeout=None if outcome else 10)
            if process.is_alive():
                process.kill()
                process.join()
            parent.close()
            lifeline_writer.close()
        if outcome is None:
            raise InfrastructureFailure(
                f"the trial process exited with code {process.exitcode} without an outcome; "
                f"see {os.path.join(output_dir, 'trial.log')}:\n{_tail(output_dir)}")
        return outcome


def _tail(output_dir: str, lines: int = 5) -> str:
    path = os.path.join(output_dir, "trial.log")
    if not os.path.isfile(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
