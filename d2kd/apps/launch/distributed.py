"""Multi-process launch that also works without GPUs.

detectron2 v0.6's ``launch`` asserts CUDA and always uses NCCL. On CUDA machines (and for one
process) this defers to detectron2's ``launch``; on CPU it runs the same process layout with
the gloo backend (``MODEL.DEVICE=cpu``), local process groups included. Either way every rank
runs under :func:`~d2kd.apps.launch.failure.run_guarded`: one rank's failure ends them all.

On CPU with ``--dist-url auto`` the rendezvous store is served by the launching process on a
port the system gives it, held until the ranks end; the ranks connect to it. (detectron2 finds
a free port, closes it and lets rank 0 bind it seconds later, after its imports: another
process on the machine can take it in between, and the run fails with "address already in
use".)
"""
import functools
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from ...compat.cpu_distributed import create_local_process_group
from .failure import run_guarded

DEFAULT_TIMEOUT = timedelta(minutes=30)
LOCALHOST = "127.0.0.1"


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
    store = None
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; pass tcp://HOST:PORT.")
        store = dist.TCPStore(LOCALHOST, 0, None, True, timeout, wait_for_workers=False)
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url,
              store.port if store else None, tuple(args), timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url,
                store_port, args, timeout) -> None:
    """One rank; it joins the launching process's store at ``store_port`` if given, else the
    rendezvous of ``dist_url``."""
    global_rank = machine_rank * procs_per_machine + local_rank
    if store_port is None:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    else:
        store = dist.TCPStore(LOCALHOST, store_port, None, False, timeout)
        dist.init_process_group("gloo", store=store, world_size=world_size, rank=global_rank,
                                timeout=timeout)
    create_local_process_group(procs_per_machine, machine_rank)
    comm.synchronize()
    run_guarded(main_func, *args)
    dist.destroy_process_group()
