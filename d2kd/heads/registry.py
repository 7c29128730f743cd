"""The distillation-head registry and the interface every head implements."""
from typing import Dict, FrozenSet

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry
from torch import nn

from ..utils.step_scalars import put_tensor_scalar

DISTILL_HEAD_REGISTRY = Registry("DISTILL_HEAD")
DISTILL_HEAD_REGISTRY.__doc__ = """
Distillation heads, listed by name in ``DISTILL.HEADS``. A head is called as
``head(cfg, student_shapes, teacher_shapes)`` with the backbone output shapes of both models,
declares in ``teacher_needs`` what the teacher must compute, and returns named losses.
d2kd's heads are ``@configurable``: ``from_config(cfg, student_shapes, teacher_shapes)`` reads
their keys, and a LazyConfig builds them from keyword arguments (``L(MGDHead)(levels=...,
student_shapes=..., teacher_shapes=..., alpha=...)``).
"""


class DistillHead(nn.Module):
    """Base class: ``forward(student_taps, teacher_outputs) -> {"loss_kd_<name>_<term>": ...}``.

    Subclasses set ``name`` (the short name in their loss keys and logs) and
    ``teacher_needs`` (subset of ``{"features", "dense_predictions", "roi_predictions",
    "rpn_predictions"}``), and log scalars with :meth:`log` / :meth:`log_scalar`: they take
    device tensors and never read them (no host synchronisation in ``forward``); the values
    reach detectron2's EventStorage (and ``metrics.json``) with one host transfer per step
    for all heads together (d2kd/utils/step_scalars.py).
    """

    name: str = ""
    teacher_needs: FrozenSet[str] = frozenset({"features"})

    def log(self, term: str, values: Dict[str, torch.Tensor]) -> None:
        """Per-level scalars ``kd/<name>/<term>/<level>`` (0-dim tensors) for this step."""
        storage = get_event_storage()
        for level, value in values.items():
            put_tensor_scalar(f"kd/{self.name}/{term}/{level}", value, storage)

    def log_scalar(self, key: str, value: torch.Tensor) -> None:
        """One scalar ``kd/<name>/<key>`` (a 0-dim tensor) for this step."""
        put_tensor_scalar(f"kd/{self.name}/{key}", value)


def build_distill_heads(cfg: CfgNode, student_shapes: Dict[str, ShapeSpec],
                        teacher_shapes: Dict[str, ShapeSpec]) -> nn.ModuleDict:
    """The heads named in ``cfg.DISTILL.HEADS``, in order."""
    heads = nn.ModuleDict()
    for name in cfg.DISTILL.HEADS:
        if name in heads:
            raise ValueError(f"DISTILL.HEADS lists {name!r} twice.")
        if name not in DISTILL_HEAD_REGISTRY:
            known = sorted(k for k, _ in DISTILL_HEAD_REGISTRY)
            raise KeyError(f"Unknown distillation head {name!r} in DISTILL.HEADS; registered: "
                           f"{known}. Register new heads with @DISTILL_HEAD_REGISTRY.register().")
        heads[name] = DISTILL_HEAD_REGISTRY.get(name)(cfg, student_shapes, teacher_shapes)
    return heads
