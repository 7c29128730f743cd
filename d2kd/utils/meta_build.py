"""Build models without memory or compute: parameters and buffers on the ``meta`` device.

The pre-start check (d2kd/engine/preflight.py) builds every model of a run this way. A plain
``with torch.device("meta")`` is not enough: detectron2's ViT, Swin and MViT read their
drop-path rates with ``.item()`` while they are built, which meta tensors cannot answer. So
tensors that constructors compute with stay on the CPU, and only what a module registers as a
parameter or buffer goes to ``meta``.
"""
import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def modules_on_meta() -> Iterator[None]:
    """While active, every parameter and buffer a module registers is moved to ``meta`` (the
    default device is the CPU, for the tensors constructors compute with)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        if param is not None:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"),
                        persistent=persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (register_parameter,
                                                                   register_buffer)
