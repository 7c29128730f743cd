"""Run a training as a child process: ``python -m d2kd.launch.train_net``, the one way d2kd
launches a training from Python (benchmarks, the demo, backbone pre-training), so that every
such run is an ordinary detectron2 output directory made by the command a user types."""
import logging
import os
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

TRAIN_NET_MODULE = "d2kd.launch.train_net"


def run_train_net(config_file: str, args: Sequence[str] = (), threads: int = 0,
                  env: Optional[Mapping[str, str]] = None, quiet: bool = True) -> float:
    """``python -m d2kd.launch.train_net --config-file CONFIG ARGS...``; returns its wall time
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
    cmd = [sys.executable, "-m", TRAIN_NET_MODULE, "--config-file", config_file, *args]
    logger.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env,
                   stdout=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start
