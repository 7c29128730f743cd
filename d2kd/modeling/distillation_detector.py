"""The one meta-architecture of d2kd: a student trained by frozen teachers through heads."""
import logging
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from torch import nn

from ..config.loading import load_config
from ..heads import TeacherOutputs, build_distill_heads
from .taps import StudentTapper, StudentTaps
from .teacher import FrozenTeacher

logger = logging.getLogger(__name__)


def student_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` with ``MODEL.META_ARCHITECTURE`` set to the student's own."""
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.META_ARCHITECTURE = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    return student_cfg


def build_teachers(cfg: CfgNode) -> List[FrozenTeacher]:
    """One :class:`FrozenTeacher` per entry of ``DISTILL.TEACHER.CONFIGS``."""
    configs, weights = list(cfg.DISTILL.TEACHER.CONFIGS), list(cfg.DISTILL.TEACHER.WEIGHTS)
    if not configs:
        raise ValueError("DistillationDetector needs DISTILL.TEACHER.CONFIGS (one per teacher).")
    if weights and len(weights) != len(configs):
        raise ValueError(f"DISTILL.TEACHER.WEIGHTS has {len(weights)} entries for "
                         f"{len(configs)} teacher configs; give one per teacher (or none).")
    opts = list(cfg.DISTILL.TEACHER.OPTS) + ["MODEL.DEVICE", cfg.MODEL.DEVICE]
    teachers = []
    for i, config_file in enumerate(configs):
        teacher_cfg = load_config(config_file, opts)
        if weights and weights[i]:
            teacher_cfg.MODEL.WEIGHTS = weights[i]
        teacher_cfg.freeze()
        teachers.append(FrozenTeacher(teacher_cfg))
    return teachers


def copy_neck_and_heads(teacher: nn.Module, student: nn.Module) -> List[str]:
    """Copy every teacher tensor outside the bottom-up backbone whose name and shape match a
    student tensor (FPN, dense head, RPN, RoI heads); log what was skipped. Returns the copied
    names."""
    student_state = student.state_dict()
    copied, skipped = [], []
    for name, value in teacher.state_dict().items():
        if ".bottom_up." in name or name.startswith("pixel_"):
            continue
        if name in student_state and student_state[name].shape == value.shape:
            student_state[name].copy_(value)
            copied.append(name)
        else:
            skipped.append(name)
    logger.info("Initialised %d student neck/head tensors from the teacher; skipped (no "
                "student tensor of that name and shape): %s", len(copied), skipped or "none")
    return copied


def dense_head_layout(model: nn.Module) -> Tuple:
    """(family, classes, head levels, anchors per cell): equal layouts give comparable outputs."""
    generator = getattr(model, "anchor_generator", None)
    return (type(model).__name__, getattr(model, "num_classes", None),
            tuple(getattr(model, "head_in_features", ())),
            generator.num_anchors[0] if generator is not None else None)


def check_response_compatible(student: nn.Module, teacher: nn.Module, needs) -> None:
    """Response heads compare outputs one to one; fail at build time when they cannot."""
    if "dense_predictions" in needs:
        s, t = dense_head_layout(student), dense_head_layout(teacher)
        if not (isinstance(student, DenseDetector) and s == t):
            raise ValueError("Dense response distillation needs a teacher of the student's "
                             "family and head layout (family, classes, levels, anchors/cell): "
                             f"student {s}, teacher {t}.")
    if "rpn_predictions" in needs:
        s_rpn, t_rpn = (getattr(getattr(m, "proposal_generator", None), "in_features", None)
                        for m in (student, teacher))
        s_anchors, t_anchors = (m.proposal_generator.anchor_generator.num_anchors
                                if getattr(m, "proposal_generator", None) is not None else None
                                for m in (student, teacher))
        if s_rpn is None or (s_rpn, s_anchors) != (t_rpn, t_anchors):
            raise ValueError("RPN response distillation needs R-CNN student and teacher with "
                             f"the same RPN levels and anchors: student {s_rpn} {s_anchors}, "
                             f"teacher {t_rpn} {t_anchors}.")
    if "roi_predictions" in needs:
        s_heads, t_heads = getattr(student, "roi_heads", None), getattr(teacher, "roi_heads", None)
        if s_heads is None or t_heads is None or s_heads.num_classes != t_heads.num_classes:
            raise ValueError("R-CNN response distillation needs R-CNN student and teacher with "
                             f"the same classes: student {type(student).__name__}, teacher "
                             f"{type(teacher).__name__}.")


@META_ARCH_REGISTRY.register()
class DistillationDetector(nn.Module):
    """Student + frozen teachers + distillation heads (``nn.ModuleDict``).

    Training step: the student computes its own losses once while a :class:`StudentTapper`
    records its intermediate outputs; the active teacher computes, under no-grad, only what
    the heads declared (``teacher_needs``) on the same padded batch re-normalised with its own
    pixel statistics; every head adds ``loss_kd_*`` terms. Inference is the student alone.

    Teachers are plain attributes (not submodules): they are absent from ``state_dict()``,
    from ``parameters()`` (so from the optimizer) and from DDP.
    """

    def __init__(self, cfg: CfgNode):
        super().__init__()
        self.student = META_ARCH_REGISTRY.get(cfg.DISTILL.STUDENT_META_ARCHITECTURE)(
            student_config(cfg))
        self.teachers = build_teachers(cfg)
        self.active_teacher = 0
        self.heads = build_distill_heads(cfg, self.student.backbone.output_shape(),
                                         self.teachers[0].backbone_shapes)
        self.teacher_needs = set().union(*(h.teacher_needs for h in self.heads.values()))
        for teacher in self.teachers:
            check_response_compatible(self.student, teacher.model, self.teacher_needs)
        self.input_format = cfg.INPUT.FORMAT
        for teacher in self.teachers:
            teacher.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cpu()`` / ... move the teachers too (they are not submodules)."""
        super()._apply(fn, *args, **kwargs)
        for teacher in self.teachers:
            teacher.model._apply(fn, *args, **kwargs)
        return self

    def initialize(self, student_weights: str, init_from_teacher: bool) -> None:
        """Fresh-run initialisation: the student's ``MODEL.WEIGHTS`` (plain detector keys, e.g.
        a pre-trained backbone), then optionally its neck and heads from teacher 0."""
        if student_weights:
            DetectionCheckpointer(self.student).load(student_weights)
        if init_from_teacher:
            copy_neck_and_heads(self.teachers[0].model, self.student)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)
        with StudentTapper(self.student) as taps:
            losses = self.student(batched_inputs)
        taps.gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        teacher_outputs = self.run_teacher(self.teachers[self.active_teacher], taps)
        for head in self.heads.values():
            losses.update(head(taps, teacher_outputs))
        return losses

    def run_teacher(self, teacher: FrozenTeacher, taps: StudentTaps) -> TeacherOutputs:
        """The teacher's outputs the heads need, on the student's batch."""
        outputs = TeacherOutputs()
        if not self.teacher_needs:
            return outputs
        images = teacher.normalize(taps.images, self.student.pixel_mean,
                                   self.student.pixel_std, self.input_format)
        outputs.features = teacher.features(images)
        if "dense_predictions" in self.teacher_needs:
            outputs.dense_predictions = teacher.dense_predictions(outputs.features)
        if "rpn_predictions" in self.teacher_needs:
            outputs.rpn_predictions = teacher.rpn_predictions(outputs.features)
        if "roi_predictions" in self.teacher_needs:
            boxes = [p.proposal_boxes for p in taps.sampled_proposals]
            outputs.roi_predictions = teacher.roi_predictions(outputs.features, boxes)
        return outputs
