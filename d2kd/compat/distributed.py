"""Multi-process launch and DDP wrapping that also work without GPUs.

detectron2 v0.6's ``launch`` asserts CUDA and always uses NCCL, and both v0.6 and upstream
main's ``create_ddp_model`` pass ``device_ids=[local_rank]``, which torch rejects for CPU
modules. On CUDA machines these functions defer to detectron2; on CPU they run the same
process layout with the gloo backend (``MODEL.DEVICE=cpu``).
"""
import logging
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DataParallel, DistributedDataParallel

from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

logger = logging.getLogger(__name__)

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
        d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url,
                  args=tuple(args), timeout=timeout)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; pass tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
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
    if hasattr(comm, "create_local_process_group"):  # upstream main
        comm.create_local_process_group(procs_per_machine)
    else:  # v0.6
        for machine in range(world_size // procs_per_machine):
            ranks = list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine))
            group = dist.new_group(ranks)
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False,
                     **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in DDP when there are several processes (``device_ids`` only on CUDA);
    ``fp16_compression`` as detectron2's ``create_ddp_model`` (LazyConfig ``train.ddp``):
    gradients are all-reduced in fp16."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).is_cuda:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp
