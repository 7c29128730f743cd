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
and trains it through the evaluator (:class:`d2kd.apps.search.proxy.ProxyEvaluator`). Stage 2
starts when every stage-1 trial has finished. A genome already evaluated in any study of the
arm is not trained again: the trial copies the earlier result (status ``cached``).

Resumption: every running trial carries its worker's host and pid and a heartbeat; a
running trial whose worker is dead (same host: the pid is gone; other hosts: no heartbeat for
``STALE_SECONDS``) is marked failed and its genome re-queued (``attempt`` + 1, at most
``MAX_ATTEMPTS``), so re-running a killed search loses nothing and trains nothing twice
(d2kd/apps/search/storage.py). What a search writes (tables, progress, best genome and config,
summary) is d2kd/apps/search/outputs.py.
"""
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from ...heads.detkds.genome import Formula, parse_genome
from .outputs import log_progress, write_tables
from .proxy import InfrastructureFailure, ReportFn, TrialOutcome
from .pruning import search_pruner
from .samplers import (
    SURPLUS,
    GeneticSampler,
    GenomeSampler,
    GridGenomeSampler,
    RandomGenomeSampler,
    fitness,
)
from .space import BASELINE, FormulaSpace, GenomeSpace, WeightSpace, genome_inputs, search_inputs
from .storage import Heartbeat, fail_and_requeue, is_stale, record_worker

logger = logging.getLogger(__name__)

#: (genome or None for the baseline, trial output directory, report callback) -> outcome
Evaluate = Callable[[Optional[str], str, ReportFn], TrialOutcome]
POLL_SECONDS = 2.0
BROKEN_AFTER = 2  # a worker stops after this many genomes in a row failed every attempt
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
        self.sampler = sampler
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
        if self.sampler == "random":
            return RandomGenomeSampler(space, self.seed)
        n = self.node
        return GeneticSampler(space, self.seed, n.POPULATION, n.ELITES, n.TOURNAMENT,
                              n.CROSSOVER_PROB, n.MUTATION_PROB)

    def _open_study(self, stage: str, space: Optional[GenomeSpace], sampler=None,
                    seeds: Sequence[Dict] = (), attrs: Optional[Dict] = None) -> optuna.Study:
        """Create the study (the creator alone enqueues ``seeds`` and sets ``attrs``) or
        load it (``attrs`` must then match)."""
        if stage in self._studies:
            return self._studies[stage][0]
        name = f"{self.arm}/{stage}"
        sampler = sampler or (self._sampler(space) if space else optuna.samplers.RandomSampler())
        kwargs = dict(study_name=name, storage=self.storage, sampler=sampler,
                      pruner=search_pruner(self.node))
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
        space = FormulaSpace(knowledge_input, self.batch_size, self.node.EXTRA_OPS)
        seeds = []
        if self.sampler == "ga":
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

    def stage_budget(self, stage: str) -> int:
        """How many trials ``stage`` runs."""
        if stage == "baseline":
            return 1
        if stage.startswith("stage1-"):
            return self.trials_per_input
        return self.stage2_space(self.survivors())[2]

    def is_surplus(self, stage: str, trial_id: int) -> bool:
        """Whether the running trial ``trial_id`` came after ``stage``'s budget was taken:
        workers choose a stage (:meth:`next_task`) and then ask for a trial, so two workers can
        both take its last open slot (at start-up both take the baseline). The trials that
        started first keep the slots."""
        mine = self.storage.get_trial(trial_id)
        first = sum(t.state in COUNTED and (t.datetime_start, t._trial_id)
                    < (mine.datetime_start, trial_id) for t in self.trials(stage))
        return first >= self.stage_budget(stage)

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

    def stage1_finished(self) -> bool:
        """Whether the baseline and every stage-1 trial budget have finished."""
        return self.baseline_ap() is not None and all(
            sum(t.state in FINISHED for t in self.trials(f"stage1-{i}")) >= self.trials_per_input
            for i in self.inputs)

    def total_trials(self) -> Optional[int]:
        """Planned trials: baseline + stage 1 + stage 2 (None until stage 2 is known; a search
        of one input has no stage 2)."""
        stage1 = 1 + self.trials_per_input * len(self.inputs)
        if len(self.inputs) < 2:
            return stage1
        if not self.stage1_finished():
            return None
        survivors = self.survivors()
        return stage1 + (self.stage2_space(survivors)[2] if len(survivors) >= 2 else 0)

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
        if self.is_surplus(stage, trial._trial_id):
            trial.set_user_attr("status", SURPLUS)
            study.tell(trial, state=TrialState.FAIL)
            return SURPLUS
        record_worker(trial, self.session)
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
            with Heartbeat(self.storage, trial._trial_id, self.node.HEARTBEAT_SECONDS):
                outcome = self.evaluate(None if genome == BASELINE else genome, out_dir, report)
        except InfrastructureFailure as e:
            logger.warning("%s trial %d (%s): infrastructure failure: %s", stage, trial.number,
                           genome, e)
            retried = attempt < self.node.MAX_ATTEMPTS
            fail_and_requeue(self.storage, study, trial._trial_id, trial.params, attempt,
                             self.node.MAX_ATTEMPTS)
            return "infra_failure" if retried else "failed"
        for key, value in (("status", outcome.status), ("seconds", outcome.seconds),
                           ("reason", outcome.reason)):
            trial.set_user_attr(key, value)
        if outcome.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, outcome.ap)
        return outcome.status

    def recover_stale_trials(self) -> int:
        """Fail and re-queue the running trials of dead workers; returns how many."""
        recovered = 0
        for stage in self.stages():
            for t in self.trials(stage):
                if t.state == TrialState.RUNNING and is_stale(t, self.node.STALE_SECONDS):
                    study = self._reopen(stage)
                    if study is not None and fail_and_requeue(
                            self.storage, study, t._trial_id, t.params,
                            t.user_attrs.get("attempt", 1), self.node.MAX_ATTEMPTS):
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
            if status not in ("infra_failure", SURPLUS):
                failures = failures + 1 if status == "failed" else 0
            if failures >= BROKEN_AFTER:
                raise RuntimeError(f"{failures} genomes in a row failed every attempt in this "
                                   "worker: the environment is broken (see their trial.log).")
            write_tables(self)
            log_progress(self)

