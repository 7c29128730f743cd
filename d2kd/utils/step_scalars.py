"""Scalars computed on the device during a training step, written to detectron2's
EventStorage with one host transfer per step.

``storage.put_scalar(name, tensor)`` calls ``float(tensor)``: on a GPU every such call waits
for the stream (a host synchronisation), so a head logging a few scalars per level would stall
the step a dozen times. Heads instead hand their 0-dim tensors to :func:`put_tensor_scalar`,
which only queues them; :func:`flush_tensor_scalars` (called once per step by
``DistillationDetector.head_losses``, after every head) stacks the queued values, copies them
to the host at once and puts them into the storage under the step's iteration. The names and
values in ``metrics.json`` are the same as with direct ``put_scalar`` calls.

Values are converted to float32 on the device before the copy (as ``float()`` of a float32
tensor gives). Queued values are kept per EventStorage; a storage whose scalars are never
flushed (heads called by hand) has them flushed by the next :func:`put_tensor_scalar` of a later
iteration, so that nothing accumulates.
"""
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.utils.events import EventStorage, get_event_storage

# EventStorage -> (iteration the values belong to, [(name, 0-dim detached tensor)])
_PENDING: "weakref.WeakKeyDictionary[EventStorage, Tuple[int, List[Tuple[str, torch.Tensor]]]]"
_PENDING = weakref.WeakKeyDictionary()


def put_tensor_scalar(name: str, value, storage: Optional[EventStorage] = None) -> None:
    """Queue ``value`` (a 0-dim or one-element tensor, or a Python number) for ``name`` in
    ``storage`` (default: the current EventStorage). Never reads the device."""
    storage = storage if storage is not None else get_event_storage()
    if not isinstance(value, torch.Tensor):
        storage.put_scalar(name, float(value))
        return
    iteration, queued = _PENDING.get(storage, (storage.iter, []))
    if iteration != storage.iter and queued:  # the caller never flushed: do not accumulate
        flush_tensor_scalars(storage)
        iteration, queued = storage.iter, []
    queued.append((name, value.detach().reshape(())))
    _PENDING[storage] = (storage.iter, queued)


def pending_tensor_scalars(storage: Optional[EventStorage] = None) -> Dict[str, torch.Tensor]:
    """The queued, not yet flushed values of ``storage`` (name -> tensor; the last one of a
    name queued twice)."""
    storage = storage if storage is not None else get_event_storage()
    return dict(_PENDING.get(storage, (0, []))[1])


def flush_tensor_scalars(storage: Optional[EventStorage] = None) -> int:
    """Put every queued value of ``storage`` into it; returns the number of host transfers
    (one per device the values are on: one in a training step, 0 when nothing was queued)."""
    storage = storage if storage is not None else get_event_storage()
    _, queued = _PENDING.pop(storage, (0, []))
    by_device: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for name, value in queued:
        by_device.setdefault(value.device, []).append((name, value))
    for items in by_device.values():
        values = torch.stack([value.float() for _, value in items]).cpu().tolist()
        for (name, _), value in zip(items, values):
            storage.put_scalar(name, value)
    return len(by_device)
