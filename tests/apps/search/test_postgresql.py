"""The DetKDS search on a PostgreSQL server (docs/detkds_search.md, "Several machines: a
PostgreSQL server"): three worker processes stand in for three machines, each with its own host
identity (``D2KD_SEARCH_HOST``) and output folder, and share one search through
``postgresql://``. Their trials sleep instead of training (tests/helpers/search_worker.py). A
machine killed in the middle of a trial and a server restart lose no trial and count none twice;
every machine's tables, built from the database, list every machine's trials.

The server is a throw-away cluster on a free port (dev/postgres.py: why not pytest-postgresql).
"""
import glob
import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import optuna
import pytest
from conftest import CONFIGS, REPO, slurm_env
from optuna.trial import FrozenTrial, TrialState

from d2kd.apps.search.report import best_so_far, load_rows
from d2kd.apps.search.storage import open_storage
from dev.postgres import postgres_bin, throwaway_server

DETKDS = os.path.join(CONFIGS, "DigitsDet/retinanet_R18_from_R50_detkds.yaml")
WORKER = os.path.join(REPO, "tests", "helpers", "search_worker.py")
SEARCH_NODE = os.path.join(REPO, "tools", "slurm", "search_node.sh")
MACHINES = ("machine-a", "machine-b", "machine-c")
TRIALS = 10  # stage-1 trials of the one knowledge input (and one baseline trial)
TRIAL_SECONDS = 2.0
# a heartbeat every second; a machine silent for 10 s is gone (longer than the restart's
# outage plus a retry's pause, so that no live machine's trial is taken for a dead one)
SEARCH_OPTS = ("MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "2",
               "DISTILL.DETKDS.SEARCH.INPUTS", "['logit']", "DISTILL.DETKDS.SEARCH.PRUNE_AT", "0.0",
               "DISTILL.DETKDS.SEARCH.HEARTBEAT_SECONDS", "1",
               "DISTILL.DETKDS.SEARCH.STALE_SECONDS", "10")
#: the arguments of docs/cluster.md's search (search.sbatch / search_node.sh)
SEARCH_ARGS = ("--config-file", DETKDS, "--trials", str(TRIALS), "--sampler", "ga", "--seed",
               "0", *SEARCH_OPTS)
STAGES = ("ga-seed0/baseline", "ga-seed0/stage1-logit")
Marker = Tuple[str, str, int]  # (machine, stage, trial number)


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server for this module's tests, removed afterwards. Skips where PostgreSQL
    is not installed; fails where its driver (psycopg) is not."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in "
                    "/usr/lib/postgresql/*/bin): install PostgreSQL and "
                    '`pip install -e ".[postgres]"` to test the search on a database server')
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail('psycopg, the PostgreSQL driver, is not installed: pip install -e '
                    '".[postgres]" (`make setup` installs it)', pytrace=False)
    with throwaway_server(bindir) as server:
        yield server


def worker_env(**variables: str) -> Dict[str, str]:
    """The environment of a search worker started through tools/slurm/ (docs/cluster.md), with
    the trials of tests/helpers/search_worker.py and SLURM's stand-ins on PATH."""
    return slurm_env(SEARCH_NET=WORKER, TRIAL_SECONDS=str(TRIAL_SECONDS), **variables)


def start_machine(host: str, root: Path, url: str) -> subprocess.Popen:
    """A search worker standing in for machine ``host`` (output ``root/host``), started as
    tools/slurm/search.sbatch starts one on each node."""
    env = worker_env(SLURMD_NODENAME=host, D2KD_SEARCH_STORAGE=url, SEARCH_OUTPUT=str(root))
    with open(root / f"{host}.console", "w") as console:  # a file: a full pipe would block it
        return subprocess.Popen([SEARCH_NODE, *SEARCH_ARGS], env=env, stdout=console,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def start_machines(tmp_path):
    """``start(url)``: the three machines, searching on the database ``url`` (outputs in
    ``tmp_path``); those still running when the test ends are killed."""
    started = []

    def start(url: str) -> Dict[str, subprocess.Popen]:
        machines = {host: start_machine(host, tmp_path, url) for host in MACHINES}
        started.extend(machines.values())
        return machines

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(machines: Dict[str, subprocess.Popen], root: Path) -> None:
    """Wait for the machines; each must end its search (exit code 0)."""
    for host, process in machines.items():
        code = process.wait(timeout=300)
        assert code == 0, f"{host} exited with {code}:\n" + (root / f"{host}.console"
                                                           ).read_text()[-3000:]


def markers(root: Path, name: str) -> Set[Marker]:
    """The trials the machines' evaluations marked ``started`` / ``finished``."""
    found = set()
    for path in glob.glob(os.path.join(root, "machine-*", "trials", "*", "*", name)):
        trial_dir, _ = os.path.split(path)
        stage_dir, number = os.path.split(trial_dir)
        machine_dir = os.path.dirname(os.path.dirname(stage_dir))
        found.add((os.path.basename(machine_dir), f"ga-seed0/{os.path.basename(stage_dir)}",
                   int(number)))
    return found


def unfinished(root: Path, host: Optional[str] = None) -> Set[Marker]:
    """The trials that started and did not finish (on machine ``host``; None: any)."""
    return {m for m in markers(root, "started") - markers(root, "finished")
            if host is None or m[0] == host}


def database_trials(url: str) -> Dict[str, List[FrozenTrial]]:
    """The trials of the search's studies, read from the database."""
    storage = optuna.storages.RDBStorage(url)
    studies = {s.study_name: s._study_id for s in storage.get_all_studies()}
    assert sorted(studies) == list(STAGES)
    return {name: storage.get_all_trials(study_id) for name, study_id in studies.items()}


def evaluated(trials: Dict[str, List[FrozenTrial]]) -> Set[Marker]:
    """(machine, stage, number) of the trials the database holds as evaluated."""
    return {(t.user_attrs["host"], stage, t.number) for stage, ts in trials.items() for t in ts
            if t.state == TrialState.COMPLETE}


def assert_complete_and_counted_once(trials: Dict[str, List[FrozenTrial]],
                                     root: Path) -> None:
    """Each stage holds its budget of evaluated trials, one per genome; the evaluations that
    ended are exactly the database's evaluated trials, each on the machine that ran it."""
    done = {stage: [t for t in ts if t.state == TrialState.COMPLETE]
            for stage, ts in trials.items()}
    assert [len(done[s]) for s in STAGES] == [1, TRIALS]
    genomes = [t.user_attrs["genome"] for ts in done.values() for t in ts]
    assert len(set(genomes)) == len(genomes) == 1 + TRIALS
    assert {t.user_attrs["status"] for ts in done.values() for t in ts} == {"ok"}
    assert markers(root, "finished") == evaluated(trials)


def assert_tables_list_every_trial(trials: Dict[str, List[FrozenTrial]], root: Path,
                                   hosts: Tuple[str, ...]) -> None:
    """The tables, plot and summary of each machine in ``hosts`` list every evaluated trial of
    every machine, and every failed attempt."""
    listed = {(stage.split("/")[1], t.number) for stage, ts in trials.items() for t in ts
              if t.user_attrs.get("status") not in (None, "surplus")}
    for host in hosts:
        rows = load_rows(str(root / host))
        assert {(r["study"], int(r["number"])) for r in rows} == listed
        assert len(best_so_far(rows)) == TRIALS  # the plot's curve: every candidate trial
        assert os.path.getsize(root / host / "best_so_far.png") > 0
        with open(root / host / "summary.json") as f:
            assert json.load(f)["trials"]["stage1-logit"] == sum(
                stage == "stage1-logit" for stage, _ in listed)


@pytest.mark.slow
def test_workers_that_open_an_empty_database_together_all_open_it(postgres_server):
    url = postgres_server.create_database("together")
    workers = 6
    start, opened = threading.Barrier(workers), []

    def open_it() -> None:
        start.wait()
        opened.append(open_storage(url, "").get_all_studies())

    threads = [threading.Thread(target=open_it) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert opened == [[]] * workers  # a thread that raised added nothing


@pytest.mark.slow
@pytest.mark.long
def test_a_machine_killed_in_a_trial_has_its_genome_retried_by_another(postgres_server,
                                                                       start_machines, tmp_path):
    url = postgres_server.create_database("killed")
    machines = start_machines(url)
    victim = machines["machine-b"]

    def victim_in_a_trial() -> bool:
        assert victim.poll() is None, "machine-b ended before it ran a trial"
        return bool(unfinished(tmp_path, "machine-b"))

    wait_for(victim_in_a_trial, "machine-b to run a trial")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed = unfinished(tmp_path, "machine-b")
    survivors = {h: p for h, p in machines.items() if h != "machine-b"}
    finish(survivors, tmp_path)
    trials = database_trials(url)
    assert_complete_and_counted_once(trials, tmp_path)
    assert unfinished(tmp_path) == killed
    [(_, stage, number)] = killed
    dead = trials[stage][number]
    assert (dead.state, dead.user_attrs["status"], dead.user_attrs["host"]) == (
        TrialState.FAIL, "infra_failure", "machine-b")
    [retry] = [t for t in trials[stage] if t.user_attrs.get("attempt") == 2]
    assert retry.user_attrs["genome"] == dead.user_attrs["genome"]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["host"] in survivors
    failed = [t for ts in trials.values() for t in ts if t.state == TrialState.FAIL
              and t.user_attrs["status"] != "surplus"]
    assert failed == [dead]  # one attempt lost to the kill, none to anything else
    assert_tables_list_every_trial(trials, tmp_path, tuple(survivors))


@pytest.mark.slow
@pytest.mark.long
def test_the_search_survives_a_restart_of_the_database_server(postgres_server, start_machines,
                                                              tmp_path):
    url = postgres_server.create_database("restarted")
    machines = start_machines(url)

    def every_machine_started_a_trial() -> bool:
        assert all(p.poll() is None for p in machines.values()), "a machine ended early"
        return {m[0] for m in markers(tmp_path, "started")} == set(MACHINES)

    wait_for(every_machine_started_a_trial, "every machine to start a trial")
    postgres_server.stop()  # sessions of the machines ended, pooled connections dead
    time.sleep(2.0)  # the machines' heartbeats and polls find no server
    postgres_server.start()  # the same port
    finish(machines, tmp_path)
    trials = database_trials(url)
    assert_complete_and_counted_once(trials, tmp_path)
    # every evaluation ended and was counted: no genome trained twice
    assert markers(tmp_path, "started") == markers(tmp_path, "finished")
    assert not [t for ts in trials.values() for t in ts if t.state == TrialState.FAIL
                and t.user_attrs["status"] != "surplus"]  # no attempt lost
    assert {host for host, _, _ in evaluated(trials)} == set(MACHINES)
    logs = [(tmp_path / host / "search.log").read_text() for host in MACHINES]
    assert any("the database cannot be reached" in log and "answered again" in log
               for log in logs), "no machine met the restart"
    assert_tables_list_every_trial(trials, tmp_path, MACHINES)


@pytest.mark.slow
@pytest.mark.long
def test_the_cluster_recipe_runs_one_search_over_every_node(postgres_server, tmp_path):
    """tools/slurm/search.sbatch as docs/cluster.md submits it, as a job of three nodes
    (tests/helpers/slurm/srun starts its task once per node, on this host)."""
    url = postgres_server.create_database("sbatch")
    env = worker_env(SLURM_NNODES=str(len(MACHINES)), SLURM_JOB_NODELIST=",".join(MACHINES),
                    SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=REPO, D2KD_SEARCH_STORAGE=url,
                    SEARCH_OUTPUT=str(tmp_path))
    job = subprocess.run(["bash", os.path.join(REPO, "tools", "slurm", "search.sbatch"),
                          *SEARCH_ARGS], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    trials = database_trials(url)
    assert_complete_and_counted_once(trials, tmp_path)
    assert_tables_list_every_trial(trials, tmp_path, MACHINES)
