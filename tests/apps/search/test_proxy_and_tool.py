"""DetKDS search's real proxy evaluator (d2kd/apps/search/proxy.py: rejection, pruning,
infrastructure failure, its config and its training start), a tiny end-to-end search with
tools/search_net.py killed with kill -9 and resumed, and the search's report (breeding,
best-so-far, --compare)."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import CONFIGS, REPO, TEACHER, save_untrained_teacher

from d2kd.apps.search.proxy import InfrastructureFailure, ProxyEvaluator
from d2kd.apps.search.report import best_so_far, breeding, compare, full_schedule_aps
from d2kd.config import load_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
DETKDS = os.path.join(CONFIGS, "DigitsDet/retinanet_R18_from_R50_detkds.yaml")


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
    # successive halving: a report at every rung (1 and 2 of 4 iterations), then the final AP
    reports.clear()
    evaluator.opts = ["DISTILL.DETKDS.SEARCH.PRUNER", "successive_halving",
                      "DISTILL.DETKDS.SEARCH.PROXY_ITERS", "4", "DISTILL.DETKDS.SEARCH.PRUNE_AT",
                      "0.25", "DISTILL.DETKDS.SEARCH.PRUNE_REDUCTION_FACTOR", "2"]
    promoted = evaluator("global:catt|scale_r2|norm_N|l1|w=5", str(tmp_path / "c"),
                         lambda step, ap: reports.append((step, ap)) and False)
    assert promoted.status == "ok" and [step for step, _ in reports] == [1, 2]


@pytest.mark.slow
def test_proxy_reports_a_dead_trial_process_as_infrastructure_failure(tmp_path, tiny_env):
    evaluator = ProxyEvaluator(str(tmp_path / "missing.yaml"), [], threads=1)
    with pytest.raises(InfrastructureFailure, match="exited with code 1"):
        evaluator(None, str(tmp_path / "t"), lambda s, ap: False)


def _rows(output):
    with open(os.path.join(output, "trials.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.long
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
