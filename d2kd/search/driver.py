"""The DetKDS search driver: divide-and-conquer search stored, scheduled and pruned by Optuna.

One *arm* (sampler ``ga`` or ``random`` + search seed) of a search is a set of Optuna studies
in one storage, named ``<arm>/<stage>``:

- ``baseline``: one trial, the proxy without the DetKDS head (no distillation);
- ``stage1-<input>``: ``trials_per_input`` trials of the formula + weight of one knowledge
  input (the GA's generation 0 starts with the seed genomes);
- ``stage2``: the weights of the inputs whose best stage-1 AP beats the baseline (only when at
  least two survive), over the whole grid when it is small, else with the stage-1 sampler.

Any number of workers (processes, machines) run :meth:`DetKDSSearch.run_worker` against the
same storage: each repeatedly picks the least advanced open study, asks Optuna for a trial,
and trains it through the evaluator (:class:`d2kd.search.proxy.ProxyEvaluator`). Stage 2
starts when every stage-1 trial has finished. A genome already evaluated in any study of the
arm is not trained again: the trial copies the earlier result (status ``cached``).

Resumption: every running trial carries its worker's host and pid and a heartbeat; a
running trial whose worker is dead (same host: the pid is gone; other hosts: no heartbeat for
``STALE_SECONDS``) is marked failed and its genome re-queued (``attempt`` + 1, at most
``MAX_ATTEMPTS``), so re-running a killed search loses nothing and trains nothing twice.
"""
import csv
import io
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..utils.io import atomic_write_json, atomic_write_text
from .genome import Formula, parse_genome
from .proxy import InfrastructureFailure, ReportFn, TrialOutcome
from .samplers import (GENERATION_KEY, GeneticSampler, GenomeSampler, GridGenomeSampler,
                       RandomGenomeSampler, fitness)
from .space import BASELINE, FormulaSpace, GenomeSpace, WeightSpace, search_inputs

logger = logging.getLogger(__name__)

#: (genome or None for the baseline, trial output directory, report callback) -> outcome
Evaluate = Callable[[Optional[str], str, ReportFn], TrialOutcome]
POLL_SECONDS = 2.0
BROKEN_AFTER = 2  # a worker stops after this many genomes in a row failed every attempt
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CSV_COLUMNS = ("study", "input", "number", "genome", "status", "ap", "seconds", "attempt",
               "generation", "completed")


def open_storage(url: Optional[str], output_dir: str) -> optuna.storages.BaseStorage:
    """No URL: a journal file ``output_dir/journal.log`` (file lock, safe across processes of
    one machine or a shared file system); ``dialect://...``: an SQL database (RDBStorage, for
    many machines); any other string: the path of a journal file."""
    if not url:
        url = os.path.join(output_dir, "journal.log")
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return True


class _Heartbeat:
    """While open, records ``time.time()`` as the trial's ``heartbeat`` every ``period`` s."""

    def __init__(self, storage, trial_id: int, period: float):
        self.storage, self.trial_id, self.period = storage, trial_id, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except UpdateFinishedTrialError:
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def markdown_cell(value) -> str:
    """A table cell; the ``|`` of genomes escaped."""
    return str(value).replace("|", "\\|")


def genome_inputs(genome: str) -> str:
    if genome == BASELINE:
        return "none"
    return "+".join(f.input for f in parse_genome(genome).formulas)


class DetKDSSearch:
    """One arm of a search in one storage (see the module docstring)."""

    def __init__(self, cfg, storage, output_dir: str, sampler: str, seed: int,
                 trials_per_input: int, evaluate: Evaluate, workers: int = 1, session: str = ""):
        if sampler not in ("ga", "random"):
            raise ValueError(f"sampler must be 'ga' or 'random', got {sampler!r}.")
        if trials_per_input < 1:
            raise ValueError(f"--trials must be >= 1, got {trials_per_input}.")
        self.cfg = cfg
        self.node = cfg.DISTILL.DETKDS.SEARCH
        self.storage = storage
        self.output_dir = output_dir
        self.sampler_kind = sampler
        self.seed = seed
        self.trials_per_input = trials_per_input
        self.evaluate = evaluate
        self.workers = workers
        self.session = session
        self.arm = f"{sampler}-seed{seed}"
        self.batch_size = cfg.SOLVER.IMS_PER_BATCH
        self.inputs, self.skipped = search_inputs(cfg)
        self._studies: Dict[str, Tuple[optuna.Study, Optional[GenomeSpace]]] = {}

    # ---- studies ---------------------------------------------------------------------------
    def _sampler(self, space: GenomeSpace, grid: bool = False) -> GenomeSampler:
        if grid:
            return GridGenomeSampler(space, self.seed)
        if self.sampler_kind == "random":
            return RandomGenomeSampler(space, self.seed)
        n = self.node
        return GeneticSampler(space, self.seed, n.POPULATION, n.ELITES, n.TOURNAMENT,
                              n.CROSSOVER_PROB, n.MUTATION_PROB)

    def _pruner(self) -> optuna.pruners.BasePruner:
        if self.node.PRUNE_AT <= 0:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=self.node.PRUNER_STARTUP_TRIALS)

    def _open_study(self, stage: str, space: Optional[GenomeSpace], sampler=None,
                    seeds: Sequence[Dict] = (), attrs: Optional[Dict] = None) -> optuna.Study:
        """Create the study (the creator alone enqueues ``seeds`` and sets ``attrs``) or
        load it (``attrs`` must then match)."""
        if stage in self._studies:
            return self._studies[stage][0]
        name = f"{self.arm}/{stage}"
        sampler = sampler or (self._sampler(space) if space else optuna.samplers.RandomSampler())
        kwargs = dict(study_name=name, storage=self.storage, sampler=sampler, pruner=self._pruner())
        try:
            study = optuna.create_study(direction="maximize", **kwargs)
            for key, value in (attrs or {}).items():
                study.set_user_attr(key, value)
            for params in seeds:
                study.enqueue_trial(params, user_attrs={"seeded": True})
        except DuplicatedStudyError:
            study = optuna.load_study(**kwargs)
            for key, value in (attrs or {}).items():
                if study.user_attrs.get(key) != value:
                    raise RuntimeError(
                        f"Study {name} of this storage was started with {key}="
                        f"{study.user_attrs.get(key)!r}, this run has {value!r}; resume with "
                        "the same settings or use another --output/--storage.") from None
        self._studies[stage] = (study, space)
        return study

    def baseline_study(self) -> optuna.Study:
        return self._open_study("baseline", None)

    def stage1_study(self, knowledge_input: str) -> optuna.Study:
        space = FormulaSpace(knowledge_input, self.batch_size)
        seeds = []
        if self.sampler_kind == "ga":
            for text in self.node.SEED_GENOMES:
                params = space.params_of(text)
                if params is not None and params not in seeds:
                    seeds.append(params)
        return self._open_study(f"stage1-{knowledge_input}", space, seeds=seeds)

    def stage2_space(self, formulas: Sequence[Formula]) -> Tuple[WeightSpace, bool, int]:
        """(space, exhaustive?, trial budget) of stage 2."""
        space = WeightSpace(formulas, self.batch_size)
        grid_size = sum(1 for _ in space.grid())
        exhaustive = grid_size <= self.node.STAGE2_MAX_GRID
        return space, exhaustive, grid_size if exhaustive else self.node.STAGE2_TRIALS

    def stage2_study(self, formulas: Sequence[Formula]) -> Tuple[optuna.Study, int]:
        space, exhaustive, budget = self.stage2_space(formulas)
        study = self._open_study("stage2", space, sampler=self._sampler(space, grid=exhaustive),
                                 attrs={"formulas": ";".join(str(f) for f in formulas)})
        return study, budget

    def trials(self, stage: str) -> List[FrozenTrial]:
        """Trials of ``<arm>/<stage>`` straight from the storage ([] if no such study)."""
        try:
            study_id = self.storage.get_study_id_from_name(f"{self.arm}/{stage}")
        except KeyError:
            return []
        return self.storage.get_all_trials(study_id, deepcopy=False)

    def stages(self) -> List[str]:
        return ["baseline"] + [f"stage1-{i}" for i in self.inputs] + ["stage2"]

    # ---- scheduling ------------------------------------------------------------------------
    def baseline_ap(self) -> Optional[float]:
        done = [t for t in self.trials("baseline") if t.state == TrialState.COMPLETE]
        return done[0].value if done else None

    def survivors(self) -> List[Formula]:
        """Best formula of every input whose best stage-1 AP beats the baseline."""
        baseline = self.baseline_ap()
        kept = []
        for knowledge_input in self.inputs:
            done = [t for t in self.trials(f"stage1-{knowledge_input}") if t.state in FINISHED
                    and t.user_attrs.get("status") in ("ok", "cached")]
            if done:
                best = max(done, key=fitness)
                if fitness(best) > baseline:
                    kept.append(parse_genome(best.user_attrs["genome"]).formulas[0])
        return kept

    def next_task(self):
        """A study to run a trial in, "wait" (other workers hold the last trials of a stage)
        or "done"."""
        baseline = self.trials("baseline")
        if not any(t.state in COUNTED for t in baseline):
            if any(t.user_attrs.get("status") == "failed" for t in baseline):
                raise RuntimeError("The no-distillation baseline trial failed "
                                   f"{self.node.MAX_ATTEMPTS} times; see its trial.log.")
            return self.baseline_study()
        used = {i: sum(t.state in COUNTED for t in self.trials(f"stage1-{i}")) for i in self.inputs}
        open_inputs = [i for i in self.inputs if used[i] < self.trials_per_input]
        if open_inputs:
            return self.stage1_study(min(open_inputs, key=lambda i: used[i]))
        if self._running(["baseline"] + [f"stage1-{i}" for i in self.inputs]):
            return "wait"
        survivors = self.survivors()
        if len(survivors) < 2:
            return "done"
        study, budget = self.stage2_study(survivors)
        if sum(t.state in COUNTED for t in self.trials("stage2")) < budget:
            return study
        return "wait" if self._running(["stage2"]) else "done"

    def _running(self, stages: Sequence[str]) -> bool:
        """Queued trials left when a budget is met (extra seeds, late retries) do not count."""
        return any(t.state == TrialState.RUNNING for s in stages for t in self.trials(s))

    # ---- trials ----------------------------------------------------------------------------
    def lookup(self, genome: str, number: int, stage: str) -> Optional[FrozenTrial]:
        """An evaluated trial of this arm with the same genome (not the asking trial)."""
        for s in self.stages():
            for t in self.trials(s):
                if (t.state in FINISHED and t.user_attrs.get("genome") == genome
                        and not (s == stage and t.number == number)):
                    return t
        return None

    def run_trial(self, study: optuna.Study) -> str:
        """Ask, evaluate (or copy a cached result) and tell one trial; returns its status."""
        stage = study.study_name.split("/", 1)[1]
        space = self._studies[stage][1]
        trial = study.ask()
        for key, value in (("host", socket.gethostname()), ("pid", os.getpid()),
                           ("heartbeat", time.time()), ("session", self.session)):
            trial.set_user_attr(key, value)
        genome = space.genome(space.suggest(trial)) if space else BASELINE
        trial.set_user_attr("genome", genome)
        attempt = trial.user_attrs.get("attempt", 1)
        cached = self.lookup(genome, trial.number, stage)
        if cached is not None:
            trial.set_user_attr("status", "cached")
            trial.set_user_attr("cached_from", f"{cached.number}")
            trial.set_user_attr("seconds", 0.0)
            if cached.state == TrialState.PRUNED:
                trial.report(fitness(cached), max(cached.intermediate_values))
            study.tell(trial, cached.value if cached.state == TrialState.COMPLETE else None,
                       state=cached.state)
            return "cached"
        out_dir = os.path.join(self.output_dir, "trials", stage, f"{trial.number:04d}")

        def report(step: int, ap: float) -> bool:
            trial.report(ap, step)
            return trial.should_prune()

        try:
            with _Heartbeat(self.storage, trial._trial_id, self.node.HEARTBEAT_SECONDS):
                outcome = self.evaluate(None if genome == BASELINE else genome, out_dir, report)
        except InfrastructureFailure as e:
            logger.warning("%s trial %d (%s): infrastructure failure: %s", stage, trial.number,
                           genome, e)
            retried = attempt < self.node.MAX_ATTEMPTS
            self._fail_and_requeue(study, trial._trial_id, trial.params, attempt)
            return "infra_failure" if retried else "failed"
        for key, value in (("status", outcome.status), ("seconds", outcome.seconds),
                           ("reason", outcome.reason)):
            trial.set_user_attr(key, value)
        if outcome.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, outcome.ap)
        return outcome.status

    def _fail_and_requeue(self, study: optuna.Study, trial_id: int, params: Dict,
                          attempt: int) -> bool:
        """Mark a running trial failed and queue its genome again (unless it used its
        attempts); False when another worker did it first."""
        retry = attempt < self.node.MAX_ATTEMPTS
        try:
            self.storage.set_trial_user_attr(trial_id, "status",
                                             "infra_failure" if retry else "failed")
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        if retry:
            study.enqueue_trial(params, user_attrs={"attempt": attempt + 1})
        return True

    def is_stale(self, trial: FrozenTrial) -> bool:
        attrs = trial.user_attrs
        if attrs.get("host") == socket.gethostname() and "pid" in attrs:
            if attrs["pid"] != os.getpid() and not _process_alive(attrs["pid"]):
                return True
        last = attrs.get("heartbeat")
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()
        return last is not None and time.time() - last > self.node.STALE_SECONDS

    def recover_stale_trials(self) -> int:
        """Fail and re-queue the running trials of dead workers; returns how many."""
        recovered = 0
        for stage in self.stages():
            for t in self.trials(stage):
                if t.state == TrialState.RUNNING and self.is_stale(t):
                    study = self._reopen(stage)
                    if study is not None and self._fail_and_requeue(
                            study, t._trial_id, t.params, t.user_attrs.get("attempt", 1)):
                        logger.warning("%s trial %d (%s): its worker is gone; re-queued.",
                                       stage, t.number, t.user_attrs.get("genome", "?"))
                        recovered += 1
        return recovered

    def _reopen(self, stage: str) -> Optional[optuna.Study]:
        if stage == "baseline":
            return self.baseline_study()
        if stage.startswith("stage1-"):
            return self.stage1_study(stage[len("stage1-"):])
        survivors = self.survivors()
        return self.stage2_study(survivors)[0] if len(survivors) >= 2 else None

    def run_worker(self) -> None:
        """Run trials until the search is done (the loop of every worker)."""
        failures = 0
        while True:
            self.recover_stale_trials()
            task = self.next_task()
            if task == "done":
                return
            if task == "wait":
                time.sleep(POLL_SECONDS)
                continue
            status = self.run_trial(task)
            if status != "infra_failure":
                failures = failures + 1 if status == "failed" else 0
            if failures >= BROKEN_AFTER:
                raise RuntimeError(f"{failures} genomes in a row failed every attempt in this "
                                   "worker: the environment is broken (see their trial.log).")
            self.write_tables()
            self.log_progress()

    # ---- outputs ---------------------------------------------------------------------------
    def rows(self) -> List[Dict]:
        rows = []
        for stage in self.stages():
            for t in self.trials(stage):
                if t.state == TrialState.WAITING:
                    continue
                status = t.user_attrs.get("status", t.state.name.lower())
                ap = fitness(t) if t.state in FINISHED else -math.inf
                genome = t.user_attrs.get("genome", "")
                rows.append({
                    "study": stage, "input": genome_inputs(genome) if genome else "",
                    "number": t.number, "genome": genome, "status": status,
                    "ap": f"{ap:.3f}" if math.isfinite(ap) else "",
                    "seconds": f"{t.user_attrs['seconds']:.3f}" if "seconds" in t.user_attrs else "",
                    "attempt": t.user_attrs.get("attempt", 1),
                    "generation": t.system_attrs.get(GENERATION_KEY, ""),
                    "completed": t.datetime_complete.isoformat() if t.datetime_complete else "",
                    "session": t.user_attrs.get("session", ""),
                })
        return rows

    def write_tables(self) -> None:
        """``trials.csv`` and ``trials.md`` (one row per trial), written atomically."""
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(os.path.join(self.output_dir, "trials.csv"), buffer.getvalue())
        lines = [f"# DetKDS search {self.arm}", "",
                 "| " + " | ".join(CSV_COLUMNS[:-1]) + " |",
                 "|" + "---|" * (len(CSV_COLUMNS) - 1)]
        lines += ["| " + " | ".join(markdown_cell(r[c]) for c in CSV_COLUMNS[:-1]) + " |"
                  for r in rows]
        atomic_write_text(os.path.join(self.output_dir, "trials.md"), "\n".join(lines) + "\n")

    def stage1_finished(self) -> bool:
        return self.baseline_ap() is not None and all(
            sum(t.state in FINISHED for t in self.trials(f"stage1-{i}")) >= self.trials_per_input
            for i in self.inputs)

    def total_trials(self) -> Optional[int]:
        """Planned trials: baseline + stage 1 + stage 2 (None until stage 2 is known)."""
        if not self.stage1_finished():
            return None
        survivors = self.survivors()
        stage2 = self.stage2_space(survivors)[2] if len(survivors) >= 2 else 0
        return 1 + self.trials_per_input * len(self.inputs) + stage2

    def log_progress(self) -> None:
        rows = self.rows()
        done = sum(r["status"] in ("ok", "rejected", "pruned", "cached") for r in rows)
        times = [float(r["seconds"]) for r in rows
                 if r["status"] in ("ok", "rejected", "pruned") and r["seconds"]]
        mean = sum(times) / len(times) if times else 0.0
        total = self.total_trials()
        planned = total or 1 + self.trials_per_input * len(self.inputs)
        eta = max(planned - done, 0) * mean / self.workers
        logger.info("[%s] %d/%s trials done, mean %.1f s per trained trial, ETA %.1f min%s "
                    "(%d worker(s))", self.arm, done, total or f"{planned}+stage 2", mean,
                    eta / 60, "" if total else " + stage 2", self.workers)

    def best(self) -> Tuple[Optional[FrozenTrial], bool]:
        """(the best evaluated distiller, whether it beats the no-distillation baseline)."""
        survivors = {f.input for f in self.survivors()}
        candidates = [t for s in self.stages()[1:] for t in self.trials(s)
                      if t.state == TrialState.COMPLETE and t.user_attrs.get("status") in
                      ("ok", "cached") and math.isfinite(t.value)]
        good = [t for t in candidates
                if set(genome_inputs(t.user_attrs["genome"]).split("+")) <= survivors]
        pool = good or candidates
        return (max(pool, key=fitness) if pool else None), bool(good)

    def finalize(self, config_file: str, opts: Sequence[str], session: Dict) -> Dict:
        """Write ``best_genome.txt``, ``best_config.yaml``, the tables, ``best_so_far.png`` and
        ``summary.json`` (with this session's wall time and trial times); returns the summary."""
        from .report import best_so_far, plot_best_so_far

        self.write_tables()
        best, beats = self.best()
        summary_path = os.path.join(self.output_dir, "summary.json")
        rows = self.rows()
        trained = [r for r in rows if r["session"] == self.session and r["seconds"]
                   and r["status"] in ("ok", "rejected", "pruned")]
        session = dict(session, trials=len(trained),
                       trial_seconds=sum(float(r["seconds"]) for r in trained))
        slots = session["wall_seconds"] * session["workers"]
        session["overhead"] = (slots - session["trial_seconds"]) / slots if slots > 0 else None
        previous = []
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                previous = json.load(f).get("sessions", [])
        summary = {
            "arm": self.arm, "config_file": os.path.abspath(config_file), "opts": list(opts),
            "inputs": self.inputs, "skipped_inputs": self.skipped,
            "trials_per_input": self.trials_per_input, "baseline_ap": self.baseline_ap(),
            "survivors": [str(f) for f in self.survivors()],
            "best_genome": best.user_attrs["genome"] if best else None,
            "best_ap": best.value if best else None, "beats_baseline": beats,
            "trials": {s: sum(r["study"] == s for r in rows) for s in self.stages()},
            "sessions": previous + [session],
        }
        if best is None:
            logger.error("[%s] no candidate finished with a finite AP; no best genome.", self.arm)
        else:
            genome = best.user_attrs["genome"]
            atomic_write_text(os.path.join(self.output_dir, "best_genome.txt"), genome + "\n")
            atomic_write_text(os.path.join(self.output_dir, "best_config.yaml"),
                              best_config_yaml(config_file, opts, genome, self.output_dir))
            if not beats:
                logger.warning("[%s] no knowledge input beat the baseline (%.2f AP); "
                               "best_genome.txt holds the best candidate anyway.", self.arm,
                               self.baseline_ap())
        plot_best_so_far({self.arm: best_so_far(rows)},
                         os.path.join(self.output_dir, "best_so_far.png"))
        atomic_write_json(summary_path, summary)
        return summary


def best_config_yaml(config_file: str, opts: Sequence[str], genome: str, output_dir: str) -> str:
    """A config that trains ``genome`` with the full schedule of ``config_file``."""
    lines = [f"# Written by tools/search_net.py: the best genome of the search in {output_dir}.",
             f'_BASE_: "{os.path.abspath(config_file)}"',
             "DISTILL:", "  DETKDS:", f'    GENOME: "{genome}"',
             f'OUTPUT_DIR: "{os.path.join(output_dir, "best_full_schedule")}"']
    if opts:
        lines.insert(1, f"# The search also had these overrides (not applied here): {' '.join(opts)}")
    return "\n".join(lines) + "\n"
