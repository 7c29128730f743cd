"""Process groups and DDP wrapping that also work without GPUs.

Both detectron2 v0.6's and upstream main's ``create_ddp_model`` pass
``device_ids=[local_rank]``, which torch rejects for CPU modules (gloo, ``MODEL.DEVICE=cpu``);
here ``device_ids`` is given only to CUDA modules. The local process group that detectron2's
``comm`` needs is made differently by v0.6 and main. (The processes themselves are started by
the entry points' ``launch``.)
"""
import torch
import torch.distributed as dist
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm
from torch.nn.parallel import DataParallel, DistributedDataParallel


def free_local_port() -> int:
    """A TCP port free on this machine (for ``--dist-url auto``), as detectron2 finds it."""
    return _find_free_port()


def create_local_process_group(procs_per_machine: int, machine_rank: int) -> None:
    """detectron2's per-machine process group (``comm.get_local_rank`` and friends), after
    ``init_process_group``; every process of every machine must call it."""
    if hasattr(comm, "create_local_process_group"):  # upstream main
        comm.create_local_process_group(procs_per_machine)
        return
    # v0.6 has no public function for it: its own launch() worker sets this private global
    world_size = dist.get_world_size()
    for machine in range(world_size // procs_per_machine):
        ranks = list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def default_store() -> dist.Store:
    """The key-value store of the default process group (the rendezvous of ``--dist-url``),
    which every rank of every machine reaches; torch offers no public accessor."""
    return dist.distributed_c10d._get_default_store()


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
