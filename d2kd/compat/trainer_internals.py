"""Trainer internals d2kd needs that detectron2 exposes under private names only (or as
module globals of ``detectron2.engine.defaults``).

Both detectron2 v0.6 and upstream ``main`` have these attributes (checked by the suite on
both builds); this module is the one place that reads or writes them.
"""
import contextlib
from typing import Callable, Iterator

import torch
from detectron2.engine import DefaultTrainer, TrainerBase, defaults
from detectron2.engine.hooks import LRScheduler
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import ParamScheduler


def scheduler_multiplier(scheduler: LRMultiplier) -> ParamScheduler:
    """The fvcore ``ParamScheduler`` behind a detectron2 ``LRMultiplier``."""
    return scheduler._multiplier


def restart_data_loader(trainer: DefaultTrainer) -> None:
    """Make the ``SimpleTrainer`` / ``AMPTrainer`` inside a ``DefaultTrainer`` draw its next
    batch from a new iterator of its data loader (e.g. after its sampler was repositioned)."""
    inner = trainer._trainer
    if hasattr(inner, "reset_data_loader"):  # upstream main: the iterator is made lazily
        loader = inner.data_loader
        inner.reset_data_loader(lambda: loader)
    else:  # v0.6: made in __init__
        inner._data_loader_iter = iter(inner.data_loader)


def point_lr_logging_at(trainer: TrainerBase, optimizer: torch.optim.Optimizer) -> None:
    """Make the trainer's ``LRScheduler`` hooks log the learning rate of ``optimizer`` (after
    the optimizer was rebuilt mid-run)."""
    for hook in trainer._hooks:
        if isinstance(hook, LRScheduler):
            hook._optimizer = optimizer
            hook._best_param_group_id = LRScheduler.get_best_param_group_id(optimizer)


@contextlib.contextmanager
def default_trainer_parts(ddp_wrapper: Callable, checkpointer_class: type) -> Iterator[None]:
    """While active, ``DefaultTrainer.__init__`` wraps the model with ``ddp_wrapper`` and
    checkpoints with ``checkpointer_class`` (the names it looks up in
    ``detectron2.engine.defaults``, on v0.6 and upstream main), so that a subclass runs the
    parent's constructor instead of copying it."""
    saved = defaults.create_ddp_model, defaults.DetectionCheckpointer
    defaults.create_ddp_model, defaults.DetectionCheckpointer = ddp_wrapper, checkpointer_class
    try:
        yield
    finally:
        defaults.create_ddp_model, defaults.DetectionCheckpointer = saved
