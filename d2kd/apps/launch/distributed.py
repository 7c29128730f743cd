"""Multi-process launch that also works without GPUs.

detectron2 v0.6's ``launch`` asserts CUDA and always uses NCCL. On CUDA machines (and for one
process) this defers to detectron2's ``launch``; on CPU it runs the same process layout with
the gloo backend (``MODEL.DEVICE=cpu``), local process groups included. Either way every rank
runs under :func:`~d2kd.apps.launch.failure.run_guarded`: one rank's failure ends them all.
"""
import functools
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from ...compat.cpu_distributed import create_local_process_group, free_local_port
from .failure import run_guarded

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """detectron2's ``launch``; without CUDA, ``num_gpus_per_machine`` CPU processes on gloo."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        d2_launch(functools.partial(run_guarded, main_func), num_gpus_per_machine,
                  num_machines, machine_rank, dist_url, args=tuple(args), timeout=timeout)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; pass tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{free_local_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args),
              timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url,
                args, timeout) -> None:
    global_rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    create_local_process_group(procs_per_machine, machine_rank)
    comm.synchronize()
    run_guarded(main_func, *args)
    dist.destroy_process_group()
