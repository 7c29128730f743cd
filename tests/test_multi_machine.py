"""Training across machines: two machine ranks on this host (``--num-machines 2``, one process
each, separate launchers with no common parent, gloo) against one machine with two processes.

- The final model of a global-knowledge distillation through prototype refreshes, an MTPD
  schedule through a stage switch and a DetKDS distiller equals, tensor for tensor, that of
  the same world size on one machine (CPU, fixed ``SEED``).
- ``kill -9`` of machine 1's processes makes machine 0 exit within a minute with an error that
  names the lost rank; ``--resume`` on both machines then ends with the uninterrupted run's
  final model (the machines share ``OUTPUT_DIR``, as they share a filesystem on a cluster).
- The machines start as docs/cluster.md's SLURM recipe starts them: each through
  tools/slurm/train_node.sh, and once as one job through tools/slurm/train.sbatch, with
  SLURM's srun and scontrol replaced by stand-ins (tests/helpers/slurm/) and local addresses.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from conftest import REPO, slurm_env

from d2kd.compat.cpu_distributed import free_local_port

pytestmark = [pytest.mark.slow, pytest.mark.long]

ITERS = 8
TRAIN_NODE = os.path.join(REPO, "tools", "slurm", "train_node.sh")
#: (config, overrides): each exercises what crosses ranks in its method
RUNS = {
    "prototype_refresh": ("retinanet_R18_from_R50_gk.yaml",
                          ["DISTILL.PROTOTYPES.MIN_BOX_SIZE", "4.0",
                           "DISTILL.PROTOTYPES.REFRESH_PERIOD", "3"]),
    "stage_switch": ("retinanet_R18_from_R50_R34_mtpd_mgd.yaml",
                     ["DISTILL.SCHEDULE.STAGE_ITERS", f"[{ITERS // 2}, {ITERS // 2}]"]),
    "detkds": ("retinanet_R18_from_R50_detkds.yaml", []),
}


def _train_args(name: str, teachers: Sequence[str], output: Path,
                resume: bool = False) -> List[str]:
    """tools/train_net.py's arguments for run ``name``, launcher flags excepted."""
    config, opts = RUNS[name]
    weights = str(list(teachers)) if name == "stage_switch" else f"['{teachers[0]}']"
    return ["--config-file", os.path.join(REPO, "configs", "DigitsDet", config),
            *(["--resume"] if resume else []),
            "SEED", "7", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(ITERS),
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "", "TEST.EVAL_PERIOD", "0",
            "DATASETS.TEST", "()", "DISTILL.TEACHER.WEIGHTS", weights, "OUTPUT_DIR", str(output),
            *opts]


def _one_machine(name: str, teachers: Sequence[str], output: Path) -> List[str]:
    """One machine, two processes."""
    return [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--num-gpus", "2",
            *_train_args(name, teachers, output)]


def _env(dataset_root: str, **variables: str) -> Dict[str, str]:
    """The environment of a launcher, SLURM's stand-ins on PATH, the dataset at
    ``dataset_root``."""
    return slurm_env(DETECTRON2_DATASETS=os.path.dirname(dataset_root), **variables)


def _start(cmd: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    """A launcher in a session of its own (``kill -9`` reaches its children too), its output
    to a file (an undrained pipe fills and blocks the writer)."""
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: List[subprocess.Popen], logs: List[Path], timeout: float = 900) -> None:
    for proc, log in zip(procs, logs):
        try:
            assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _two_machines(name, teachers, dataset_root, output: Path, resume=False,
                  port: int = 0) -> List[subprocess.Popen]:
    """Machine ranks 0 and 1, one process each, each started as tools/slurm/train.sbatch
    starts a node (tools/slurm/train_node.sh, docs/cluster.md)."""
    port = port or free_local_port()
    return [_start([TRAIN_NODE, *_train_args(name, teachers, output, resume)],
                   _env(dataset_root, SLURM_NNODES="2", SLURM_NODEID=str(machine),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="1"),
                   output.parent / f"{output.name}_machine{machine}.txt")
            for machine in (0, 1)]


def _final_model(output: Path) -> Dict[str, torch.Tensor]:
    return torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == [], f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def two_machine_runs(tiny_digitsdet, teachers, module_tmp_path_factory):
    """name -> the OUTPUT_DIR of the run on two machines (one process each), every run
    finished; the machines run one configuration after another."""
    outputs = {}
    for name in RUNS:
        output = module_tmp_path_factory.mktemp(f"two_machines_{name}") / "out"
        output.parent.mkdir(parents=True, exist_ok=True)
        procs = _two_machines(name, teachers, tiny_digitsdet, output)
        _wait(procs, [output.parent / f"out_machine{m}.txt" for m in (0, 1)])
        outputs[name] = output
    return outputs


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_machines_train_the_model_one_machine_trains(name, two_machine_runs,
                                                         tiny_digitsdet, teachers, tmp_path):
    output = tmp_path / "out"
    log = tmp_path / "one_machine.txt"
    _wait([_start(_one_machine(name, teachers, output), _env(tiny_digitsdet), log)], [log])
    two = two_machine_runs[name]
    assert "World size: 2" in (two / "log.txt").read_text()
    _assert_same(_final_model(two), _final_model(output))


def test_a_killed_machine_stops_the_other_and_both_resume_to_the_same_model(
        two_machine_runs, tiny_digitsdet, teachers, tmp_path):
    """Global knowledge, killed after a prototype refresh: the resumed ranks restore every
    rank's dense loss normaliser, and the next refresh pools every shard with rank 0's
    BatchNorm statistics, as the uninterrupted run's did."""
    name = "prototype_refresh"
    output = tmp_path / "out"
    logs = [tmp_path / f"out_machine{m}.txt" for m in (0, 1)]
    procs = _two_machines(name, teachers, tiny_digitsdet, output)
    try:
        deadline = time.monotonic() + 600
        checkpoint = output / "last_checkpoint"  # mid-run, after a prototype refresh
        while not (checkpoint.exists() and checkpoint.read_text().strip() == "model_0000003.pth"):
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                logs[0].read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=120)
        stopped_after = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    machine0 = logs[0].read_text()
    assert procs[0].returncode != 0
    assert "d2kd: rank 0 stops because rank 1 was lost" in machine0, machine0[-3000:]
    assert stopped_after < 60
    assert not (output / "model_final.pth").exists()

    resumed = _two_machines(name, teachers, tiny_digitsdet, output, resume=True)
    _wait(resumed, logs)
    assert re.search(r"Starting training from iteration [1-9]", (output / "log.txt").read_text())
    _assert_same(_final_model(two_machine_runs[name]), _final_model(output))


def test_the_cluster_recipe_trains_the_model_of_two_machines(two_machine_runs, tiny_digitsdet,
                                                             teachers, tmp_path):
    """tools/slurm/train.sbatch as docs/cluster.md submits it, as a job of two nodes
    (tests/helpers/slurm/srun starts its task once per node, on this host; the first node's
    address is this host's)."""
    name = "detkds"
    output = tmp_path / "out"
    env = _env(tiny_digitsdet, SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
               SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=REPO, GPUS_PER_NODE="1",
               MASTER_PORT=str(free_local_port()))
    log = tmp_path / "slurm.out"
    _wait([_start(["bash", os.path.join(REPO, "tools", "slurm", "train.sbatch"),
                   *_train_args(name, teachers, output)], env, log)], [log])
    assert "World size: 2" in (output / "log.txt").read_text()
    _assert_same(_final_model(two_machine_runs[name]), _final_model(output))
