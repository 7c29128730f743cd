"""How training and the DetKDS search scale on this machine: over processes, machine ranks and
search workers (docs/cluster.md).

``scaling-training``: the steady-state step time of one distillation config (random teachers,
no pre-trained weights: the cost does not depend on them) with

- one process with 1 thread, and with ``--cores`` threads;
- ``--cores`` processes of 1 thread on one machine (``tools/train_net.py --num-gpus N``, gloo);
- ``--cores`` machine ranks of one process each, every one started as tools/slurm/train.sbatch
  starts a node (tools/slurm/train_node.sh, ``MASTER_ADDR`` 127.0.0.1).

``SOLVER.IMS_PER_BATCH`` is the same in every arm (detectron2's total batch, split over the
processes), so images per second compare directly. The step time is detectron2's: the median
over the last 20 iterations of rank 0 (``metrics.json``), which includes waiting for the
gradients' all-reduce.

``scaling-search``: trials per hour of a DetKDS search with 1, 2, ... workers, each a
separate "machine" (tools/slurm/search_node.sh with its own host identity and output folder),
on a throw-away PostgreSQL server (dev/postgres.py). Each arm is a new search of the same
number of trials on a database of its own, workers of ``max(1, cores // workers)`` threads;
the rate is the evaluated trials over the wall time from the first worker's start to the last
one's end (start-up included, as a user meets it).

Efficiency is the throughput per core in use relative to the first arm's (one process of one
thread; one search worker of all the cores' threads): 1 is linear scaling over cores.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

import optuna
from tabulate import tabulate

from d2kd.apps.certify.provenance import code_version, software_stack
from d2kd.compat.cpu_distributed import free_local_port
from d2kd.config import load_config
from d2kd.utils.io import atomic_save_figure, atomic_write_json, atomic_write_text

from ..postgres import postgres_bin, throwaway_server
from .fresh_process import REPO_ROOT
from .random_teachers import save_random_teachers
from .run_time import steady_step_seconds

TRAIN_NET = os.path.join(REPO_ROOT, "tools", "train_net.py")
TRAIN_NODE = os.path.join(REPO_ROOT, "tools", "slurm", "train_node.sh")
SEARCH_NODE = os.path.join(REPO_ROOT, "tools", "slurm", "search_node.sh")
#: what every timed training run sets: no evaluation, no checkpoint but the last, the data
#: loaded in the training process (no loader workers competing for the cores)
TRAINING_OPTS = ("MODEL.WEIGHTS", "", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
                 "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000")


def _software() -> Dict[str, object]:
    """The builds the numbers depend on; the threads are each arm's own (``threads``)."""
    return {k: v for k, v in software_stack().items() if k != "threads"}


def _env(threads: int, **variables: str) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                PYTHON=sys.executable, **variables)


def _run_together(commands: List[Tuple[List[str], Dict[str, str], str]], what: str) -> None:
    """Start every ``(argv, environment, log file)`` at once and wait for all; a failed one
    is an error naming ``what``."""
    logs = [open(log, "w") for _, _, log in commands]
    try:
        runs = [subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                for (argv, env, _), log in zip(commands, logs)]
        codes = [run.wait() for run in runs]
    finally:
        for log in logs:
            log.close()
    if any(codes):
        raise RuntimeError(f"{what}: exit codes {codes} (logs: {[c[2] for c in commands]})")


def time_training(opts: Sequence[str], output: str, processes: int, machines: int,
                  threads: int) -> float:
    """Seconds per step of one run of ``processes`` processes (``threads`` each) on each of
    ``machines`` machine ranks, all on this host."""
    args = [*opts, "OUTPUT_DIR", output]
    os.makedirs(output, exist_ok=True)
    if machines == 1:
        commands = [([sys.executable, TRAIN_NET, "--num-gpus", str(processes), *args],
                     _env(threads), os.path.join(output, "machine0.txt"))]
    else:
        port = str(free_local_port())
        commands = [([TRAIN_NODE, *args],
                     _env(threads, SLURM_NNODES=str(machines), SLURM_NODEID=str(m),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          GPUS_PER_NODE=str(processes)),
                     os.path.join(output, f"machine{m}.txt")) for m in range(machines)]
    _run_together(commands, f"training with {machines} x {processes} processes")
    with open(os.path.join(output, "metrics.json")) as f:
        return steady_step_seconds(f.read().splitlines())


def training_arms(cores: int) -> List[Dict[str, int]]:
    """(processes per machine, machines, threads per process) of each arm."""
    return [dict(processes=1, machines=1, threads=1),
            dict(processes=1, machines=1, threads=cores),
            dict(processes=cores, machines=1, threads=1),
            dict(processes=1, machines=cores, threads=1)]


def run_training_scaling(config_file: str, iters: int, cores: int, json_path: str,
                         markdown_path: str, plot_path: str, opts: Sequence[str] = ()) -> Dict:
    """Every arm of :func:`training_arms`; results rewritten after each arm."""
    cfg = load_config(config_file, list(opts))
    batch = cfg.SOLVER.IMS_PER_BATCH
    result = {"config": config_file, "opts": list(opts), "iters": iters,
              "ims_per_batch": batch, "cores": cores, "code": code_version(),
              "software": _software(), "arms": []}
    with tempfile.TemporaryDirectory(prefix="d2kd_scaling_") as tmp:
        teachers = save_random_teachers(cfg, tmp)
        run_opts = [*opts, *TRAINING_OPTS, "SOLVER.MAX_ITER", str(iters),
                    "DISTILL.TEACHER.WEIGHTS", str(teachers)]
        for k, arm in enumerate(training_arms(cores)):
            step = time_training(["--config-file", config_file, *run_opts],
                                 os.path.join(tmp, f"arm{k}"), **arm)
            result["arms"].append({**arm, "seconds_per_step": step,
                                   "images_per_second": batch / step})
            _write_training(result, json_path, markdown_path, plot_path)
    return result


def _efficiency(arms: List[Dict], rate: str, cores_in_use: Callable[[Dict], int]) -> None:
    """Adds ``cores``, ``speedup`` (the rate over the first arm's) and ``efficiency`` (the
    rate per core in use over the first arm's: 1 is linear scaling over cores)."""
    for arm in arms:
        arm["cores"] = cores_in_use(arm)
        arm["speedup"] = arm[rate] / arms[0][rate]
        arm["efficiency"] = arm["speedup"] * arms[0]["cores"] / arm["cores"]


def _training_label(arm: Dict) -> str:
    if arm["machines"] > 1:
        return f"{arm['machines']} machine ranks x 1 process"
    return f"{arm['processes']} process(es) x {arm['threads']} thread(s)"


def _write_training(result: Dict, json_path: str, markdown_path: str, plot_path: str) -> None:
    arms = result["arms"]
    _efficiency(arms, "images_per_second", lambda a: a["processes"] * a["machines"] *
                a["threads"])
    rows = [[_training_label(a), a["cores"],
             round(a["seconds_per_step"], 3), round(a["images_per_second"], 2),
             round(a["speedup"], 2), round(a["efficiency"], 2)] for a in arms]
    headers = ["arm", "cores in use", "s / step", "images / s", "speed-up", "efficiency"]
    title = (f"KD training throughput, `{os.path.basename(result['config'])}`, "
             f"IMS_PER_BATCH {result['ims_per_batch']}, median step of the last 20 of "
             f"{result['iters']} iterations, {result['cores']} cores "
             f"(tools/benchmark.py scaling-training)")
    _write(result, (json_path, markdown_path, plot_path), title, headers, rows,
           [_training_label(a) for a in arms], [a["images_per_second"] for a in arms],
           "images / s", f"KD training on {result['cores']} cores")


def _write(result: Dict, paths: Sequence[str], title: str, headers: List[str],
           rows: List[List], labels: List[str], values: List[float], ylabel: str,
           plot_title: str) -> None:
    """``result`` to ``paths`` (JSON, markdown: ``title`` and the table, PNG: the bars of
    ``values``), each written atomically."""
    json_path, markdown_path, plot_path = paths
    atomic_write_json(json_path, result)
    atomic_write_text(markdown_path, f"{title}\n\n"
                      + tabulate(rows, headers=headers, tablefmt="github") + "\n")
    _bar_plot(plot_path, labels, values, ylabel, plot_title)


def _bar_plot(path: str, labels: List[str], values: List[float], ylabel: str,
              title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def evaluated_trials(url: str) -> int:
    """The trials of every study on ``url`` that were evaluated (Optuna state COMPLETE)."""
    return sum(len(optuna.load_study(study_name=name, storage=url).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        for name in optuna.get_all_study_names(storage=url))


def time_search(server, name: str, workers: int, cores: int, args: Sequence[str],
                output: str) -> Dict:
    """One search by ``workers`` separate workers ("machines") on a new database ``name``."""
    url = server.create_database(name)
    threads = max(1, cores // workers)
    os.makedirs(output, exist_ok=True)
    start = time.perf_counter()
    _run_together([([SEARCH_NODE, *args],
                    _env(threads, D2KD_SEARCH_STORAGE=url, SEARCH_OUTPUT=output,
                         SLURMD_NODENAME=f"worker-{w}"),
                    os.path.join(output, f"worker-{w}.console")) for w in range(workers)],
                  f"search with {workers} workers")
    wall = time.perf_counter() - start
    trials = evaluated_trials(url)
    return {"workers": workers, "threads": threads, "trials": trials,
            "wall_seconds": round(wall, 1), "trials_per_hour": trials / wall * 3600}


def run_search_scaling(config_file: str, trials: int, workers: Sequence[int], cores: int,
                       json_path: str, markdown_path: str, plot_path: str,
                       opts: Sequence[str] = ()) -> Dict:
    """A search of ``trials`` stage-1 trials (and the baseline) for each worker count."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("scaling-search needs PostgreSQL (initdb, pg_ctl): install it")
    cfg = load_config(config_file, list(opts))
    result = {"config": config_file, "opts": list(opts), "trials": trials, "cores": cores,
              "proxy_iters": cfg.DISTILL.DETKDS.SEARCH.PROXY_ITERS, "code": code_version(),
              "software": _software(), "arms": []}
    with tempfile.TemporaryDirectory(prefix="d2kd_scaling_") as tmp, \
            throwaway_server(bindir) as server:
        teachers = save_random_teachers(cfg, tmp)
        args = ["--config-file", config_file, "--trials", str(trials), "--sampler", "random",
                "--seed", "0", *opts, "DISTILL.TEACHER.WEIGHTS", str(teachers)]
        for n in workers:
            arm = time_search(server, f"workers{n}", n, cores, args,
                              os.path.join(tmp, f"workers{n}"))
            result["arms"].append(arm)
            _write_search(result, json_path, markdown_path, plot_path)
    return result


def _write_search(result: Dict, json_path: str, markdown_path: str, plot_path: str) -> None:
    arms = result["arms"]
    _efficiency(arms, "trials_per_hour",
                lambda a: min(result["cores"], a["workers"] * a["threads"]))
    rows = [[a["workers"], a["threads"], a["cores"], a["trials"], a["wall_seconds"],
             round(a["trials_per_hour"], 1), round(a["speedup"], 2), round(a["efficiency"], 2)]
            for a in arms]
    headers = ["workers", "threads each", "cores in use", "trials evaluated", "wall s",
               "trials / hour", "speed-up", "efficiency"]
    title = (f"DetKDS search throughput on PostgreSQL, `{os.path.basename(result['config'])}`, "
             f"{result['trials']} stage-1 trials + the baseline, proxy of "
             f"{result['proxy_iters']} iterations, {result['cores']} cores "
             f"(tools/benchmark.py scaling-search)")
    _write(result, (json_path, markdown_path, plot_path), title, headers, rows,
           [f"{a['workers']} worker(s)" for a in arms], [a["trials_per_hour"] for a in arms],
           "trials / hour", f"DetKDS search on PostgreSQL, {result['cores']} cores")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py scaling-training`` and ``scaling-search``."""
    cores = len(os.sched_getaffinity(0))
    train = subparsers.add_parser("scaling-training", help="KD step throughput over processes "
                                  "and machine ranks on this host")
    train.add_argument("--config-file", required=True)
    train.add_argument("--iters", type=int, default=60)
    train.add_argument("--cores", type=int, default=cores)
    for name in ("--json", "--markdown", "--plot"):
        train.add_argument(name, required=True)
    train.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    train.set_defaults(run=lambda a: run_training_scaling(
        a.config_file, a.iters, a.cores, a.json, a.markdown, a.plot, a.opts))

    search = subparsers.add_parser("scaling-search", help="DetKDS search trials per hour over "
                                   "workers on a PostgreSQL server")
    search.add_argument("--config-file", required=True, help="a DetKDS search config")
    search.add_argument("--trials", type=int, default=6)
    search.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    search.add_argument("--cores", type=int, default=cores)
    for name in ("--json", "--markdown", "--plot"):
        search.add_argument(name, required=True)
    search.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    search.set_defaults(run=lambda a: run_search_scaling(
        a.config_file, a.trials, a.workers, a.cores, a.json, a.markdown, a.plot, a.opts))
