"""Run a training as a child process: ``python -m d2kd.apps.launch.train_net`` (a LazyConfig
``.py`` recipe: ``d2kd.apps.launch.lazy_train_net``), the one way d2kd launches a training from
Python (benchmarks, the demo, backbone pre-training), so that every such run is an ordinary
detectron2 output directory made by the command a user types."""
import logging
import os
import subprocess
import sys
import time
from typing import List, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

TRAIN_NET_MODULE = "d2kd.apps.launch.train_net"
LAZY_TRAIN_NET_MODULE = "d2kd.apps.launch.lazy_train_net"


def run_options(config_file: str, seed: int, output_dir: str) -> List[str]:
    """The command-line overrides that set a run's seed and output directory (yacs
    ``KEY VALUE`` pairs, or LazyConfig ``key=value``)."""
    if config_file.endswith(".py"):
        return [f"train.seed={seed}", f"train.output_dir={output_dir}"]
    return ["SEED", str(seed), "OUTPUT_DIR", output_dir]


def run_train_net(config_file: str, args: Sequence[str] = (), threads: int = 0,
                  env: Optional[Mapping[str, str]] = None, quiet: bool = True) -> float:
    """``python -m d2kd.apps.launch.train_net --config-file CONFIG ARGS...``; returns its wall time
    in seconds.

    Args:
        args: further command-line arguments and trailing ``KEY VALUE`` overrides.
        threads: torch threads of the child (``OMP_NUM_THREADS``); 0 keeps the default.
        env: extra environment variables of the child.
        quiet: discard the child's stdout (its log is in ``OUTPUT_DIR/log.txt``); otherwise
            it is shown as it comes, also when this process's output goes to a pipe or file.
    Raises ``subprocess.CalledProcessError`` when the run fails.
    """
    child_env = dict(os.environ, **(env or {}))
    if not quiet:
        child_env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        child_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    module = LAZY_TRAIN_NET_MODULE if config_file.endswith(".py") else TRAIN_NET_MODULE
    cmd = [sys.executable, "-m", module, "--config-file", config_file, *args]
    logger.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env,
                   stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start
