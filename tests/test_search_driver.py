"""DetKDS search: GA operators, samplers, the driver's dedupe / retry / stale recovery (with a
fake evaluator), the real proxy evaluator (rejection, pruning, infrastructure failure) and a
tiny end-to-end search with kill -9 and resume."""
import csv
import datetime
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import CONFIGS, REPO, TEACHER, save_untrained_teacher
from optuna.trial import TrialState

from d2kd.apps.search.driver import DetKDSSearch
from d2kd.apps.search.outputs import idle_at_end_seconds, trial_rows
from d2kd.apps.search.proxy import InfrastructureFailure, ProxyEvaluator, TrialOutcome
from d2kd.apps.search.report import best_so_far, breeding, compare, full_schedule_aps
from d2kd.apps.search.samplers import (
    GENERATION_KEY,
    GeneticSampler,
    mutate,
    tournament,
    uniform_crossover,
)
from d2kd.apps.search.space import FormulaSpace, WeightSpace
from d2kd.apps.search.storage import open_storage
from d2kd.config import load_config
from d2kd.search import dry_run, parse_genome

optuna.logging.set_verbosity(optuna.logging.WARNING)
DETKDS = os.path.join(CONFIGS, "DigitsDet/retinanet_R18_from_R50_detkds.yaml")


def search_cfg(*opts):
    return load_config(DETKDS, ["MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "2", *opts])


def assert_valid(space, params):
    """Independent check: the genome string parses and its dry run gives a finite scalar."""
    dry_run(parse_genome(space.genome(params)), batch_size=space.batch_size)


# ---- GA operators and samplers ------------------------------------------------------------
def test_tournament_returns_the_fittest_of_the_drawn():
    candidates = [({"g": i}, float(f)) for i, f in enumerate([3, 9, 1, 7])]
    rng = random.Random(0)
    assert tournament(rng, candidates, size=4) == {"g": 1}  # everyone drawn: the best
    assert {tournament(rng, candidates, 1)["g"] for _ in range(200)} == {0, 1, 2, 3}
    # size 2: the worst (fitness 1) can never win a pair
    assert 2 not in {tournament(rng, candidates, 2)["g"] for _ in range(200)}


def test_crossover_and_mutation_respect_parents_and_choices():
    space = FormulaSpace("global", batch_size=2)
    rng = random.Random(1)
    a = {"slot1": "catt", "slot2": "scale_r2", "slot3": "norm_N", "distance": "l1", "weight": 5}
    b = {"slot1": "satt", "slot2": "local_s4", "slot3": "norm_HW", "distance": "l2", "weight": 2}
    assert uniform_crossover(rng, a, b, prob=0.0) == a
    children = [uniform_crossover(rng, a, b, prob=1.0) for _ in range(100)]
    assert all(c[g] in (a[g], b[g]) for c in children for g in a)
    assert {c["slot1"] for c in children} == {"catt", "satt"}
    assert mutate(rng, a, space, prob=0.0) == a
    changed = mutate(rng, a, space, prob=1.0)
    assert all(changed[g] != a[g] and changed[g] in space.genes[g] for g in a)


@pytest.mark.parametrize("knowledge_input", ["global", "instance", "logit"])
def test_bred_genomes_are_valid_and_new(knowledge_input):
    space = FormulaSpace(knowledge_input, batch_size=2)
    sampler = GeneticSampler(space, seed=0, population=4, mutation_prob=0.5)
    rng = random.Random(0)
    parents = [(space.random_params(rng), float(i)) for i in range(6)]
    seen = {space.genome(p) for p, _ in parents}
    for _ in range(30):
        child = sampler.novel(rng, seen, breed=lambda: sampler.breed(rng, parents))
        assert_valid(space, child)
        assert space.genome(child) not in seen
        seen.add(space.genome(child))
    # instance keeps the spatial layout; logit has slot 3 only
    assert "slot2" not in space.genes or "scale_r2" not in space.genes["slot2"] or \
        knowledge_input != "instance"
    assert ("slot1" in space.genes) == (knowledge_input != "logit")


def test_ga_generations_fill_up_to_the_population_and_seeds_come_first():
    space = FormulaSpace("global", batch_size=2)
    study = optuna.create_study(direction="maximize",
                                sampler=GeneticSampler(space, seed=0, population=3, elites=1))
    seed = {"slot1": "catt", "slot2": "scale_r2", "slot3": "norm_N", "distance": "l1", "weight": 5}
    study.enqueue_trial(seed)
    genomes = []
    for i in range(9):
        trial = study.ask()
        params = space.suggest(trial)
        assert_valid(space, params)
        genomes.append(space.genome(params))
        study.tell(trial, float(i % 4))
    assert genomes[0] == "global:catt|scale_r2|norm_N|l1|w=5"
    assert len(set(genomes)) == len(genomes)
    generations = [t.system_attrs.get(GENERATION_KEY, 0) for t in study.trials]
    assert generations == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_weight_space_drops_zero_weights_and_forbids_all_zero():
    f = parse_genome("global:catt|scale_r2|norm_N|l1|w=5;fgbg:no|local_s4|norm_HW|l1|w=2").formulas
    space = WeightSpace(f, batch_size=2)
    assert space.genome({"w_global": 10, "w_fgbg": 0}) == "global:catt|scale_r2|norm_N|l1|w=10"
    assert not space.is_valid({"w_global": 0, "w_fgbg": 0})
    assert sum(1 for _ in space.grid()) == 9 * 9 - 1


# ---- the driver with a fake evaluator ----------------------------------------------------
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


# ---- the real proxy evaluator and the tool --------------------------------------------------
@pytest.fixture(scope="module")
def proxy_config_file(module_tmp_path_factory, tiny_digitsdet):
    out = module_tmp_path_factory.mktemp("proxy")
    teacher = save_untrained_teacher(TEACHER, out / "teacher")
    path = out / "search.yaml"
    path.write_text(f"""_BASE_: "{DETKDS}"
MODEL: {{WEIGHTS: ""}}
DISTILL:
  TEACHER: {{WEIGHTS: ["{teacher}"]}}
  DETKDS:
    SEARCH:
      INPUTS: ["global"]
      PROXY_ITERS: 2
      PROXY_WARMUP_ITERS: 1
      TRAIN_IMAGES: 6
      VAL_IMAGES: 3
      PRUNE_AT: 0.0
      POPULATION: 2
      SEED_GENOMES: []
SOLVER: {{IMS_PER_BATCH: 2}}
DATALOADER: {{NUM_WORKERS: 0}}
""")
    return str(path)


@pytest.fixture
def tiny_env(monkeypatch, tiny_digitsdet):
    """Trial processes find the tiny DigitsDet as digitsdet_{train,val}."""
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(tiny_digitsdet))


@pytest.mark.slow
def test_proxy_rejects_an_exploding_candidate_and_prunes_on_request(proxy_config_file, tiny_env,
                                                                   tmp_path):
    evaluator = ProxyEvaluator(proxy_config_file, [], threads=1)
    exploding = evaluator("global:no|no|no|l2|w=1e+09", str(tmp_path / "a"), lambda s, ap: False)
    assert exploding.status == "rejected" and exploding.ap == -math.inf
    assert "KD loss" in exploding.reason or "infinite" in exploding.reason
    reports = []
    evaluator.opts = ["DISTILL.DETKDS.SEARCH.PRUNE_AT", "0.5"]
    pruned = evaluator("global:catt|scale_r2|norm_N|l1|w=5", str(tmp_path / "b"),
                       lambda step, ap: reports.append((step, ap)) or True)
    assert pruned.status == "pruned" and reports == [(1, pruned.ap)] and pruned.seconds > 0
    assert (tmp_path / "b" / "config.yaml").is_file()


@pytest.mark.slow
def test_proxy_reports_a_dead_trial_process_as_infrastructure_failure(tmp_path, tiny_env):
    evaluator = ProxyEvaluator(str(tmp_path / "missing.yaml"), [], threads=1)
    with pytest.raises(InfrastructureFailure, match="exited with code 1"):
        evaluator(None, str(tmp_path / "t"), lambda s, ap: False)


def _rows(output):
    with open(os.path.join(output, "trials.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_search_net_killed_and_resumed_keeps_finished_trials(proxy_config_file, tiny_env,
                                                             tmp_path):
    output = str(tmp_path / "search")
    command = [sys.executable, os.path.join(REPO, "tools", "search_net.py"), "--config-file",
               proxy_config_file, "--output", output, "--trials", "3", "--sampler", "ga",
               "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 the whole group once a trial is done and one runs
        running = os.path.join(output, "trials", "stage1-global", "0000", "config.yaml")
        if os.path.isfile(running) or first.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished_before = [r for r in _rows(output) if r["status"] == "ok"]
    assert finished_before, "the first run finished no trial before the kill"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(output)
    for row in finished_before:  # kept, not re-trained
        assert [(r["study"], r["genome"]) for r in rows if r["status"] == "ok"].count(
            (row["study"], row["genome"])) == 1
    ok = [r for r in rows if r["study"] == "stage1-global" and r["status"] in ("ok", "rejected")]
    assert len(ok) == 3 and [r["status"] for r in rows if r["study"] == "baseline"] == ["ok"]
    trained = sum(len(os.listdir(os.path.join(output, "trials", s)))
                  for s in os.listdir(os.path.join(output, "trials")))
    killed = [r for r in rows if r["status"] == "infra_failure"]
    assert len(killed) == 1 and killed[0]["number"] == "0"  # the trial killed mid-way ...
    retry = next(r for r in rows if r["attempt"] == "2")
    assert retry["genome"] == killed[0]["genome"]  # ... re-queued and trained again
    assert trained == 5  # baseline + 3 trials + the killed one: nothing trained twice
    summary = json.load(open(os.path.join(output, "summary.json")))
    session = summary["sessions"][-1]
    assert summary["best_genome"] and session["trial_seconds"] > 0
    assert 0 <= session["overhead_without_idle_at_end"] <= session["overhead"] < 1
    assert open(os.path.join(output, "best_genome.txt")).read().strip() == summary["best_genome"]
    best_config = load_config(os.path.join(output, "best_config.yaml"))
    assert best_config.DISTILL.DETKDS.GENOME == summary["best_genome"]
    # tools/train_net.py's keys only: the search's own keys are left out
    assert "SEARCH:" not in open(os.path.join(output, "best_config.yaml")).read()
    assert os.path.isfile(os.path.join(output, "best_so_far.png"))


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


def test_breeding_counts_bred_genomes_among_the_best():
    def row(genome, status, ap, generation):
        return {"study": "stage1-global", "genome": genome, "status": status, "ap": ap,
                "generation": generation}

    rows = [{"study": "baseline", "genome": "none", "status": "ok", "ap": "9.0", "generation": ""},
            row("A", "ok", "5.0", ""),  # an enqueued seed genome: generation 0
            row("B", "ok", "3.0", "0"), row("C", "ok", "6.0", "1"), row("D", "ok", "4.0", "1"),
            row("E", "pruned", "9.0", "2"), row("G", "rejected", "", "2"),
            row("C", "ok", "5.5", "2"), row("F", "ok", "2.0", "2")]
    # by hand: finished trials A5 B3 C6 D4 C5.5 F2; best distinct genomes C, A, D -> 2 of 3 bred
    result = breeding(rows, top=3)
    assert result["winner_generation"] == 1
    assert result["bred_share_top"] == pytest.approx(2 / 3)
    assert result["generations"] == {
        0: {"trials": 2, "mean_ap": 4.0, "best_ap": 5.0},
        1: {"trials": 2, "mean_ap": 5.0, "best_ap": 6.0},
        2: {"trials": 2, "mean_ap": 3.75, "best_ap": 5.5}}
    random_arm = [dict(r, generation="") for r in rows]
    assert breeding(random_arm) == {"winner_generation": None, "bred_share_top": None,
                                    "generations": {}}


@pytest.mark.slow
def test_best_so_far_and_compare(tmp_path):
    rows = [{"study": "baseline", "status": "ok", "ap": "9.0", "completed": "1"},
            {"study": "stage1-global", "status": "ok", "ap": "3.0", "completed": "2"},
            {"study": "stage1-global", "status": "rejected", "ap": "", "completed": "3"},
            {"study": "stage1-fgbg", "status": "ok", "ap": "5.0", "completed": "5"},
            {"study": "stage1-fgbg", "status": "pruned", "ap": "8.0", "completed": "4"},
            {"study": "stage1-fgbg", "status": "infra_failure", "ap": "", "completed": "6"}]
    assert best_so_far(rows) == [3.0, 3.0, 3.0, 5.0]
    # two sessions of 2 workers: 100 s + 50 s wall, 270 s of trials, 10 s idle at the end
    sessions = [{"wall_seconds": 100.0, "workers": 2, "trial_seconds": 180.0,
                 "idle_at_end_seconds": 10.0},
                {"wall_seconds": 50.0, "workers": 2, "trial_seconds": 90.0,
                 "idle_at_end_seconds": 0.0}]
    for name, seed, ap in (("ga", 0, "4.0"), ("ga", 1, "6.0"), ("random", 0, "2.0")):
        out = tmp_path / f"{name}{seed}"
        out.mkdir()
        (out / "trials.csv").write_text("study,input,number,genome,status,ap,seconds,attempt,"
                                        f"generation,completed\nstage1-global,global,0,g,ok,{ap},"
                                        "1,1,0,2020\n")
        (out / "summary.json").write_text(json.dumps({
            "arm": f"{name}-seed{seed}", "baseline_ap": 1.0, "sessions": sessions,
            "best_genome": "global:no|no|no|l1|w=1"}))
    dirs = [str(tmp_path / d) for d in ("ga0", "ga1", "random0")]
    table, results = compare(dirs, str(tmp_path / "c.png"))
    assert ("| ga-seed0 | 1 | 4.00 | 1.00 | global:no\\|no\\|no\\|l1\\|w=1 | - | 0 | 0% | "
            "10.0% (6.7%) |" in table)
    assert results["samplers"]["ga"] == {"searches": 2, "best_ap": [4.0, 6.0], "best_ap_mean": 5.0,
                                         "winner_full_ap_mean": None}
    fidelity = tmp_path / "fidelity.json"
    fidelity.write_text(json.dumps({"rows": [{"genome": "global:no|no|no|l1|w=1",
                                              "full_aps": [40.0, 41.5], "seeds": [0, 1]}]}))
    with_full, full = compare(dirs, str(tmp_path / "c.png"), full_schedule_aps([str(fidelity)]))
    assert "| 40.75 (40.00, 41.50) | 0 |" in with_full
    assert full["samplers"]["random"]["winner_full_ap_mean"] == 40.75
    assert results["searches"][2]["sampler"] == "random"
    assert (tmp_path / "c.png").stat().st_size > 0
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "search_net.py"), "--compare",
                    *dirs, "--plot", str(tmp_path / "d.png"), "--json", str(tmp_path / "c.json"),
                    "--markdown", str(tmp_path / "c.md")], check=True, capture_output=True)
    assert json.load(open(tmp_path / "c.json")) == json.loads(json.dumps(results))
    assert (tmp_path / "c.md").read_text() == table


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
        assert_valid(space, t.params)


def test_proxy_config_sets_budget_batch_and_subsets(tiny_digitsdet, tmp_path):
    from conftest import CONFIGS
    from detectron2.data import DatasetCatalog

    from d2kd.apps.search.proxy import proxy_config

    cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_R18_from_R50_detkds.yaml"))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("digitsdet_tiny_train",), ("digitsdet_tiny_val",)
    search = cfg.DISTILL.DETKDS.SEARCH
    search.PROXY_ITERS, search.PROXY_WARMUP_ITERS, search.PROXY_IMS_PER_BATCH = 30, 10, 4
    search.TRAIN_IMAGES, search.VAL_IMAGES = 12, 5
    proxy = proxy_config(cfg, "global:catt|scale_r2|norm_N|l1|w=5", str(tmp_path))
    assert (proxy.SOLVER.MAX_ITER, proxy.SOLVER.WARMUP_ITERS,
            proxy.SOLVER.IMS_PER_BATCH) == (30, 10, 4)
    assert proxy.DISTILL.DETKDS.GENOME == "global:catt|scale_r2|norm_N|l1|w=5"
    train, val = (DatasetCatalog.get(proxy.DATASETS.TRAIN[0]),
                  DatasetCatalog.get(proxy.DATASETS.TEST[0]))
    assert len(train) == 12 and len(val) == 5
    # the default validation images: held out of the training split, never the reported split
    everything = {d["file_name"] for d in DatasetCatalog.get("digitsdet_tiny_train")}
    train_files, val_files = {d["file_name"] for d in train}, {d["file_name"] for d in val}
    assert val_files <= everything and train_files <= everything
    assert not val_files & train_files
    assert not val_files & {d["file_name"] for d in DatasetCatalog.get("digitsdet_tiny_val")}
    assert proxy_config(cfg, None, str(tmp_path)).DATASETS.TEST == proxy.DATASETS.TEST  # fixed
    search.VAL_SOURCE = "test"  # as searches did before: a subset of the reported split
    old = proxy_config(cfg, None, str(tmp_path))
    assert {d["file_name"] for d in DatasetCatalog.get(old.DATASETS.TEST[0])} <= {
        d["file_name"] for d in DatasetCatalog.get("digitsdet_tiny_val")}
    search.VAL_SOURCE, search.VAL_IMAGES = "train_holdout", 24
    with pytest.raises(ValueError, match="VAL_IMAGES=24 leaves no training image"):
        DatasetCatalog.get(proxy_config(cfg, None, str(tmp_path)).DATASETS.TRAIN[0])
    search.VAL_IMAGES = 5
    assert proxy.MODEL.WEIGHTS == cfg.MODEL.WEIGHTS
    search.PROXY_IMS_PER_BATCH, search.PROXY_WEIGHTS = 0, "student/model_0000199.pth"
    baseline = proxy_config(cfg, None, str(tmp_path))
    assert baseline.SOLVER.IMS_PER_BATCH == cfg.SOLVER.IMS_PER_BATCH
    assert baseline.MODEL.WEIGHTS == "student/model_0000199.pth"
    assert "DetKDSHead" not in baseline.DISTILL.HEADS


@pytest.mark.slow
def test_the_proxy_start_trains_on_the_training_split_without_the_held_out_images(
        tiny_digitsdet, tmp_path):
    from detectron2.config import CfgNode
    from detectron2.data import DatasetCatalog

    from d2kd.apps.search.proxy_start import train_proxy_start
    from d2kd.config import ConfigError

    student = tmp_path / "student.yaml"
    student.write_text(f"""_BASE_: "{os.path.join(CONFIGS, 'DigitsDet/retinanet_R18_student.yaml')}"
MODEL: {{WEIGHTS: ""}}
DATASETS: {{TRAIN: ["digitsdet_tiny_train"], TEST: ["digitsdet_tiny_val"]}}
SOLVER: {{IMS_PER_BATCH: 2, MAX_ITER: 4, WARMUP_ITERS: 1, CHECKPOINT_PERIOD: 2}}
DATALOADER: {{NUM_WORKERS: 0}}
TEST: {{EVAL_PERIOD: 0}}
""")
    weights = str(tmp_path / "start" / "model_0000001.pth")
    opts = ["DATASETS.TRAIN", "('digitsdet_tiny_train',)", "DISTILL.DETKDS.SEARCH.VAL_IMAGES", "5",
            "DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS", weights]
    assert train_proxy_start(DETKDS, opts, str(student)) == weights
    assert os.path.isfile(weights)  # the checkpoint after 2 of 4 iterations
    with open(tmp_path / "start" / "config.yaml") as f:
        trained_on = CfgNode.load_cfg(f).DATASETS.TRAIN
    held_out = {d["file_name"]
                for d in DatasetCatalog.get("digitsdet_tiny_train_proxy_holdout_5_0")}
    seen = {d["file_name"] for d in DatasetCatalog.get(trained_on[0])}
    everything = {d["file_name"] for d in DatasetCatalog.get("digitsdet_tiny_train")}
    assert len(held_out) == 5 and not held_out & seen and seen | held_out == everything
    # bad input: one line before anything trains
    with pytest.raises(ConfigError, match="not a checkpoint the student's run saves"):
        train_proxy_start(DETKDS, opts[:-1] + [str(tmp_path / "x" / "model_0000002.pth")],
                          str(student))
    with pytest.raises(ConfigError, match="only 'train_holdout' holds images out"):
        train_proxy_start(DETKDS, opts + ["DISTILL.DETKDS.SEARCH.VAL_SOURCE", "test"], str(student))
    assert not (tmp_path / "x").exists()
