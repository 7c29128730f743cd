"""Matching student FPN maps to teacher maps: which teacher level answers each student level
(by stride), learnable channel adapters and resizing."""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import nn


def match_levels(student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec]) -> Dict[str, str]:
    """Which teacher level answers each student level: student name -> teacher name.

    For a student level of stride s, in this order:

    1. the teacher level of the same name, if its stride is s too;
    2. else the one teacher level of stride s (e.g. a backbone that names its stride-4 map
       ``p0``, or ``res2``, where the student's FPN says ``p2``);
    3. else the teacher level of the same name at another stride (its maps are resized to the
       teacher's grid, as for any stride mismatch);
    4. else none: the level cannot be distilled (an error once a head asks for it).

    detectron2's FPN and ViTDet's ``SimpleFeaturePyramid`` both name their outputs ``p<k>``
    with stride ``2**k``, so step 1 matches every level they share with a ResNet-FPN student.
    """
    matched = {}
    for name, shape in student_shapes.items():
        same_name = teacher_shapes.get(name)
        same_stride = [t for t, spec in teacher_shapes.items() if spec.stride == shape.stride]
        if same_name is not None and same_name.stride == shape.stride:
            matched[name] = name
        elif len(same_stride) == 1:
            matched[name] = same_stride[0]
        elif same_name is not None:
            matched[name] = name
    return matched


def check_levels(levels: Sequence[str], student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec]) -> None:
    """Every distilled level exists on both sides (error names both sets of shapes).

    ``teacher_shapes`` are keyed by the student's level names: the teacher levels that
    :func:`match_levels` matched to them (a teacher built by d2kd presents them so)."""
    for level in levels:
        if level not in student_shapes or level not in teacher_shapes:
            raise ValueError(
                f"DISTILL.IN_FEATURES level {level!r} must exist in student and teacher; student "
                f"levels {_describe(student_shapes)}, teacher levels {_describe(teacher_shapes)} "
                "(teacher levels under the names of the student levels they answer, matched by "
                "stride; docs/transformer_teachers.md)."
            )


def _describe(shapes: Dict[str, ShapeSpec]) -> str:
    return "{" + ", ".join(f"{k}: {s.channels}ch/stride {s.stride}"
                           for k, s in sorted(shapes.items())) + "}"


class FeatureAligner(nn.Module):
    """Per level: a 1x1 conv adapter when channels differ, a resize when strides differ."""

    def __init__(self, levels: Sequence[str], student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec], adapters: bool = True):
        super().__init__()
        check_levels(levels, student_shapes, teacher_shapes)
        self.levels = list(levels)
        self.adapters = nn.ModuleDict()
        for level in self.levels:
            s, t = student_shapes[level].channels, teacher_shapes[level].channels
            if s == t:
                continue
            if not adapters:
                raise ValueError(
                    f"Level {level}: student has {s} channels, teacher {t}, and DISTILL.ADAPTER "
                    "is False. Enable DISTILL.ADAPTER or distil levels with equal channels."
                )
            self.adapters[level] = nn.Conv2d(s, t, kernel_size=1)

    def forward(self, student: Dict[str, torch.Tensor],
                teacher: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Student maps (N, C_s, H_s, W_s) -> (N, C_t, H_t, W_t) like the teacher's."""
        aligned = {}
        for level in self.levels:
            x = student[level]
            if level in self.adapters:
                x = self.adapters[level](x)
            target = teacher[level].shape[-2:]
            if x.shape[-2:] != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            aligned[level] = x
        return aligned
