"""DetKDS search's driver (d2kd/apps/search/driver.py) with a fake evaluator: dedupe, stage 2,
planned trials, retry of infrastructure failures, stale recovery of dead workers' trials, seeds,
racing workers, a second machine on SQL storage, rejected candidates and the random arm."""
import datetime
import math
import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import assert_valid_genome, search_cfg
from optuna.trial import TrialState

from d2kd.apps.search.driver import DetKDSSearch
from d2kd.apps.search.outputs import idle_at_end_seconds, trial_rows
from d2kd.apps.search.proxy import InfrastructureFailure, TrialOutcome
from d2kd.apps.search.space import FormulaSpace
from d2kd.apps.search.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)



class FakeEvaluator:
    """AP from a fixed table by genome (default 10 + a per-genome hash); records calls."""

    def __init__(self, baseline=10.0, fail=()):
        self.calls, self.baseline, self.fail = [], baseline, dict.fromkeys(fail, 0)

    def __call__(self, genome, output_dir, report):
        self.calls.append(genome)
        if genome in self.fail and self.fail[genome] < 1:
            self.fail[genome] += 1
            raise InfrastructureFailure("worker killed")
        if genome is None:
            return TrialOutcome("ok", self.baseline, 0.01)
        return TrialOutcome("ok", 10.0 + sum(map(ord, genome)) % 7, 0.01)


def fake_search(tmp_path, evaluator, trials=4, inputs="['logit']", *opts, sampler="ga"):
    cfg = search_cfg("DISTILL.DETKDS.SEARCH.INPUTS", inputs, *opts)
    return DetKDSSearch(cfg, optuna.storages.InMemoryStorage(), str(tmp_path), sampler, 0, trials,
                        evaluator)


def test_an_evaluated_genome_is_never_trained_twice(tmp_path):
    evaluator = FakeEvaluator()
    search = fake_search(tmp_path, evaluator, 3)
    study = search.stage1_study("logit")
    repeat = {"slot3": "softmax_C", "distance": "kl", "weight": 1}
    study.enqueue_trial(repeat)
    study.enqueue_trial(repeat)
    search.run_worker()
    trials = search.trials("stage1-logit")
    statuses = [t.user_attrs["status"] for t in trials]
    assert statuses.count("cached") == 1 and len(trials) == 3
    cached = next(t for t in trials if t.user_attrs["status"] == "cached")
    first = trials[int(cached.user_attrs["cached_from"])]
    assert cached.value == first.value and cached.user_attrs["genome"] == first.user_attrs["genome"]
    assert evaluator.calls.count("logit:no|no|softmax_C|kl|w=1") == 1
    assert len(evaluator.calls) == len(set(evaluator.calls)) == 3  # baseline + 2 genomes


@pytest.mark.slow
def test_stage2_combines_the_inputs_that_beat_the_baseline(tmp_path):
    evaluator = FakeEvaluator(baseline=-1.0)  # every input survives
    search = fake_search(tmp_path, evaluator, 2, "['logit', 'loc']",
                         "DISTILL.DETKDS.SEARCH.STAGE2_MAX_GRID", "80")
    search.run_worker()
    stage2 = search.trials("stage2")
    assert len(stage2) == 80 and len(search.survivors()) == 2
    # single-input points of stage 2 that equal stage-1 genomes are cached, not retrained
    assert len(evaluator.calls) == len(set(evaluator.calls))
    best, beats = search.best()
    assert beats and best.value == max(t.value for s in search.stages()[1:]
                                       for t in search.trials(s))


@pytest.mark.slow
def test_planned_trials_are_known_up_front_for_one_input_and_after_stage1_for_several(tmp_path):
    single = fake_search(tmp_path / "one", FakeEvaluator(), 3)
    assert single.total_trials() == 1 + 3  # baseline + stage 1; one input never has a stage 2
    several = fake_search(tmp_path / "two", FakeEvaluator(baseline=-1.0), 2, "['logit', 'loc']",
                          "DISTILL.DETKDS.SEARCH.STAGE2_MAX_GRID", "80")
    assert several.total_trials() is None  # stage 2 depends on which inputs survive
    several.run_worker()
    assert several.total_trials() == 1 + 2 * 2 + 80 == len(several.trials("stage2")) + 5


def test_infrastructure_failure_is_retried_not_scored(tmp_path):
    seed = "logit:no|no|softmax_C|kl|w=1"
    evaluator = FakeEvaluator(fail=[seed])
    search = fake_search(tmp_path, evaluator, 2)
    search.stage1_study("logit").enqueue_trial(
        {"slot3": "softmax_C", "distance": "kl", "weight": 1})
    search.run_worker()
    trials = search.trials("stage1-logit")
    assert [t.state for t in trials][:2] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["status"] == "infra_failure"
    retry = next(t for t in trials if t.user_attrs.get("attempt") == 2)
    assert retry.user_attrs["genome"] == seed and retry.user_attrs["status"] == "ok"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2  # the budget, unchanged


def test_a_genome_failing_every_attempt_is_recorded_failed(tmp_path):
    class AlwaysFails(FakeEvaluator):
        def __call__(self, genome, output_dir, report):
            if genome is not None and "softmax_C|kl" in genome:
                self.calls.append(genome)
                raise InfrastructureFailure("OOM")
            return super().__call__(genome, output_dir, report)

    evaluator = AlwaysFails()
    search = fake_search(tmp_path, evaluator, 2, "['logit']",
                         "DISTILL.DETKDS.SEARCH.MAX_ATTEMPTS", "2")
    search.stage1_study("logit").enqueue_trial(
        {"slot3": "softmax_C", "distance": "kl", "weight": 1})
    search.run_worker()
    statuses = [t.user_attrs["status"] for t in search.trials("stage1-logit")]
    assert statuses[:2] == ["infra_failure", "failed"] and statuses.count("ok") == 2


def test_running_trials_of_dead_workers_are_requeued(tmp_path):
    search = fake_search(tmp_path, FakeEvaluator(), 2)
    study = search.stage1_study("logit")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    attrs = [{"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()},
             {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 10_000},
             {"host": "elsewhere", "pid": 1, "heartbeat": time.time()},
             {"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time()}]
    for a in attrs:
        trial = study.ask()
        FormulaSpace("logit", 2).suggest(trial)
        for k, v in a.items():
            trial.set_user_attr(k, v)
    assert search.recover_stale_trials() == 2
    trials = search.trials("stage1-logit")
    assert [t.state for t in trials[:4]] == [TrialState.FAIL, TrialState.FAIL,
                                             TrialState.RUNNING, TrialState.RUNNING]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["attempt"] for t in waiting] == [2, 2]
    assert search.recover_stale_trials() == 0  # nothing twice


def test_more_seed_genomes_than_trials_do_not_stall_the_search(tmp_path):
    evaluator = FakeEvaluator()
    search = fake_search(tmp_path, evaluator, 1, "['fgbg']")  # the default seeds: 2 for fgbg
    search.run_worker()
    assert [t.state for t in search.trials("stage1-fgbg")] == [TrialState.COMPLETE,
                                                               TrialState.WAITING]
    assert search.trials("stage1-fgbg")[0].user_attrs["genome"] == \
        "fgbg:no|local_s4|norm_HW|l1|w=2"


def test_workers_racing_for_a_stage_s_last_slot_train_it_once(tmp_path):
    # Two workers choose a stage before either asks for its trial: at start-up both choose the
    # baseline; at the end of stage 1 both choose its last open slot.
    storage = optuna.storages.InMemoryStorage()
    cfg = search_cfg("DISTILL.DETKDS.SEARCH.INPUTS", "['logit']")
    evaluators = [FakeEvaluator(), FakeEvaluator()]
    workers = [DetKDSSearch(cfg, storage, str(tmp_path / f"w{i}"), "ga", 0, 2, evaluators[i])
               for i in range(2)]
    tasks = [w.next_task() for w in workers]
    assert [t.study_name for t in tasks] == ["ga-seed0/baseline"] * 2
    assert sorted(w.run_trial(t) for w, t in zip(workers, tasks)) == ["ok", "surplus"]
    assert workers[0].run_trial(workers[0].next_task()) == "ok"  # stage 1: one of two slots
    tasks = [w.next_task() for w in workers]
    assert [t.study_name for t in tasks] == ["ga-seed0/stage1-logit"] * 2
    assert sorted(w.run_trial(t) for w, t in zip(workers, tasks)) == ["ok", "surplus"]
    assert [w.next_task() for w in workers] == ["done", "done"]
    calls = evaluators[0].calls + evaluators[1].calls
    assert calls.count(None) == 1 and len(calls) == 3  # baseline + the two stage-1 slots
    rows = trial_rows(workers[0])
    assert [r["study"] for r in rows] == ["baseline", "stage1-logit", "stage1-logit"]
    assert all(r["status"] == "ok" for r in rows)


def test_idle_at_end_sums_each_worker_s_wait_for_the_session_s_last_trial(tmp_path):
    search = fake_search(tmp_path, FakeEvaluator(), 2)
    search.session = "this"
    study = search.stage1_study("logit")
    start = datetime.datetime(2026, 1, 1)
    for session, pid, end in (("this", 1, 100), ("this", 2, 160), ("this", 1, 130),
                              ("earlier", 3, 40)):
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=1.0,
            user_attrs={"session": session, "host": "h", "pid": pid})
        trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(0, end)
        study.add_trial(trial)
    assert idle_at_end_seconds(search) == 160 - 130  # worker 1 waited for worker 2


@pytest.mark.slow
def test_a_second_machine_on_the_same_sql_storage_joins_and_trains_nothing_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    cfg = search_cfg("DISTILL.DETKDS.SEARCH.INPUTS", "['logit']")
    first, second = FakeEvaluator(), FakeEvaluator()
    DetKDSSearch(cfg, open_storage(url, ""), str(tmp_path / "a"), "ga", 0, 2, first).run_worker()
    joined = DetKDSSearch(cfg, open_storage(url, ""), str(tmp_path / "b"), "ga", 0, 3, second)
    joined.run_worker()  # one more trial per input: only that one is trained
    assert len(first.calls) == 3 and len(second.calls) == 1
    assert len(joined.trials("stage1-logit")) == 3


def test_rejected_candidates_count_against_the_budget_with_fitness_minus_inf(tmp_path):
    class Explodes(FakeEvaluator):
        def __call__(self, genome, output_dir, report):
            if genome is not None and "w=50" in genome:
                self.calls.append(genome)
                return TrialOutcome("rejected", -math.inf, 0.01, "KD loss 1e+09")
            return super().__call__(genome, output_dir, report)

    search = fake_search(tmp_path, Explodes(baseline=-1.0), 3)
    search.stage1_study("logit").enqueue_trial({"slot3": "norm_C", "distance": "l1", "weight": 50})
    search.run_worker()
    first = search.trials("stage1-logit")[0]
    assert first.user_attrs["status"] == "rejected" and first.value == -math.inf
    assert len(search.trials("stage1-logit")) == 3
    assert "w=50" not in str(search.survivors()[0])


def test_the_random_arm_has_no_seeds_and_proposes_valid_new_genomes(tmp_path):
    search = fake_search(tmp_path, FakeEvaluator(), 12, "['fgbg']", sampler="random")
    search.run_worker()
    space = FormulaSpace("fgbg", batch_size=2)
    trials = search.trials("stage1-fgbg")
    genomes = [t.user_attrs["genome"] for t in trials]
    assert len(set(genomes)) == 12 and not any(t.user_attrs.get("seeded") for t in trials)
    for t in trials:
        assert_valid_genome(space, t.params)
