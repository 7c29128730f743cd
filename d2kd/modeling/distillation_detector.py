"""The one meta-architecture of d2kd: a student trained by frozen teachers through heads."""
import gc
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..config.schedule import TeacherSchedule
from ..heads import TeacherOutputs, build_distill_heads
from ..structures import StudentTapper, StudentTaps, is_dense_detector
from ..utils.step_scalars import flush_tensor_scalars
from .teacher import FrozenTeacher, build_teacher, crop_to_grids
from .weights import load_initialisation

logger = logging.getLogger(__name__)


def student_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` with ``MODEL.META_ARCHITECTURE`` set to the student's own."""
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.META_ARCHITECTURE = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    return student_cfg


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


def check_response_compatible(student: nn.Module, teacher: nn.Module,
                              heads: Dict[str, nn.Module]) -> None:
    """Response heads compare outputs one to one; fail at build time when they cannot.

    ``heads``: name -> head; the error names the heads that need what is missing."""
    def users(need: str) -> str:
        return ", ".join(n for n, h in heads.items() if need in h.teacher_needs)

    needs = set().union(*(h.teacher_needs for h in heads.values()))
    if "dense_predictions" in needs:
        s, t = dense_head_layout(student), dense_head_layout(teacher)
        if not (is_dense_detector(student) and s == t):
            hint = (" (GlobalKnowledgeHead: DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_WEIGHT 0 keeps its "
                    "feature and global terms only)"
                    if "GlobalKnowledgeHead" in users("dense_predictions") else "")
            raise ValueError(f"{users('dense_predictions')}: dense response distillation needs "
                             "a teacher of the student's family and head layout (family, "
                             f"classes, levels, anchors/cell): student {s}, teacher {t}{hint}.")
    if "rpn_predictions" in needs:
        s_rpn, t_rpn = (getattr(getattr(m, "proposal_generator", None), "in_features", None)
                        for m in (student, teacher))
        s_anchors, t_anchors = (m.proposal_generator.anchor_generator.num_anchors
                                if getattr(m, "proposal_generator", None) is not None else None
                                for m in (student, teacher))
        if s_rpn is None or (s_rpn, s_anchors) != (t_rpn, t_anchors):
            raise ValueError(f"{users('rpn_predictions')}: RPN response distillation needs "
                             "R-CNN student and teacher with the same RPN levels and anchors: "
                             f"student {s_rpn} {s_anchors}, teacher {t_rpn} {t_anchors}.")
    if "roi_predictions" in needs:
        s_heads, t_heads = getattr(student, "roi_heads", None), getattr(teacher, "roi_heads", None)
        if s_heads is None or t_heads is None or s_heads.num_classes != t_heads.num_classes:
            raise ValueError(f"{users('roi_predictions')}: R-CNN response distillation needs "
                             "R-CNN student and teacher with the same classes: student "
                             f"{type(student).__name__}, teacher {type(teacher).__name__}.")
        for role, roi_heads in (("student", s_heads), ("teacher", t_heads)):
            if not all(hasattr(roi_heads, a) for a in ("box_pooler", "box_head", "box_predictor")):
                raise ValueError(f"{users('roi_predictions')}: the {role}'s RoI heads "
                                 f"({type(roi_heads).__name__}) have no FPN box head "
                                 "(box_pooler, box_head, box_predictor); R-CNN response "
                                 "distillation needs StandardROIHeads or CascadeROIHeads.")
        if isinstance(s_heads.box_predictor, nn.ModuleList):
            raise ValueError(f"{users('roi_predictions')}: the student's RoI heads "
                             f"({type(s_heads).__name__}) have {len(s_heads.box_predictor)} box "
                             "predictors; R-CNN response distillation reads one (a Cascade "
                             "R-CNN may be the teacher, not the student).")


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

    @configurable
    def __init__(self, *, student: nn.Module, input_format: str,
                 teacher: Optional[FrozenTeacher] = None,
                 heads: Sequence[nn.Module] = (),
                 config: Optional[CfgNode] = None):
        """
        Args:
            student: the detector being trained (any detectron2 meta-architecture).
            input_format: the channel order of the student's input ("RGB" or "BGR").
            teacher: one frozen teacher, as a LazyConfig gives it (``L(load_teacher)(...)``).
            heads: the heads that distil ``teacher``, as a LazyConfig gives them
                (``[L(MGDHead)(...)]``); a head is named by its class, as in ``DISTILL.HEADS``.
            config: instead of ``teacher`` and ``heads``, the yacs config they are built
                from: ``DISTILL.TEACHER`` (several teachers and teacher schedules) and
                ``DISTILL.HEADS`` (rebuilt for every stage by :meth:`activate`).
        """
        super().__init__()
        self.student = student
        self.input_format = input_format
        self.cfg = config
        if config is not None:
            # Resident teachers; None where not loaded (a schedule holds only its stage's).
            self.teachers: List[Optional[FrozenTeacher]] = (
                [None] * len(config.DISTILL.TEACHER.CONFIGS))
            schedule = TeacherSchedule.from_config(config)
            if schedule is None:
                self.activate({0: 1.0}, config)
            else:
                self.activate(schedule.stage_teachers(0), schedule.head_config(config, 0))
            return
        if teacher is None or not heads:
            raise ValueError("DistillationDetector needs a teacher and its heads, or the yacs "
                             "config to build them from (config=...).")
        named = nn.ModuleDict()
        for head in heads:
            name = type(head).__name__
            if name in named:
                raise ValueError(f"DistillationDetector: two {name} heads.")
            named[name] = head
        self.teachers = [teacher.match_student(self.student.backbone.output_shape()).to(
            self.device)]
        self._install_heads({0: 1.0}, {0: named})

    @classmethod
    def from_config(cls, cfg: CfgNode):
        return {"student": META_ARCH_REGISTRY.get(cfg.DISTILL.STUDENT_META_ARCHITECTURE)(
                    student_config(cfg)),
                "input_format": cfg.INPUT.FORMAT, "config": cfg}

    def activate(self, teacher_weights: Dict[int, float], head_cfg: CfgNode) -> None:
        """Make exactly the teachers of ``teacher_weights`` (index -> loss weight) resident —
        the others are freed before missing ones load — and build fresh heads for them from
        ``head_cfg``. With several teachers, head ``H`` of teacher ``i`` is ``heads["H_t<i>"]``
        and its losses are ``loss_kd_..._t<i>``, multiplied by the teacher's weight. Needs the
        yacs config (``config``) the model was built from."""
        if self.cfg is None:
            raise ValueError("Teacher schedules (DistillationDetector.activate) build their "
                             "teachers and heads from a yacs config (DISTILL.*); a model given "
                             "one teacher and its heads has one stage.")
        self.release_teachers(keep=teacher_weights)
        for index in sorted(teacher_weights):
            if self.teachers[index] is None:
                self.teachers[index] = build_teacher(
                    self.cfg, index, self.student.backbone.output_shape()).to(self.device)
        self._install_heads(teacher_weights, {
            index: build_distill_heads(head_cfg, self.student.backbone.output_shape(),
                                       self.teachers[index].backbone_shapes)
            for index in sorted(teacher_weights)})

    def _install_heads(self, teacher_weights: Dict[int, float],
                       heads_per_teacher: Dict[int, nn.ModuleDict]) -> None:
        """The heads of the resident teachers (index -> name -> head), checked against them."""
        self.teacher_weights = dict(teacher_weights)
        self.active_teacher = min(teacher_weights)
        self.heads = nn.ModuleDict()
        self.head_teacher: Dict[str, int] = {}  # head key -> teacher index
        for index, heads in sorted(heads_per_teacher.items()):
            check_response_compatible(self.student, self.teachers[index].model, heads)
            for name, head in heads.items():
                key = name if len(teacher_weights) == 1 else f"{name}_t{index}"
                if key != name:
                    head.name = f"{head.name}_t{index}"  # per-teacher log scalars
                self.heads[key] = head
                self.head_teacher[key] = index
        self.heads.to(self.device)
        self.teacher_needs = set().union(*(h.teacher_needs for h in self.heads.values()))

    def release_teachers(self, keep: Sequence[int] = ()) -> None:
        """Free every resident teacher not in ``keep``."""
        freed = [i for i, t in enumerate(self.teachers) if t is not None and i not in keep]
        for index in freed:
            self.teachers[index] = None
        if freed:
            gc.collect()  # a locked teacher's modules reference themselves (_lock_eval)
            logger.info("Freed teacher(s) %s", freed)

    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cpu()`` / ... move the teachers too (they are not submodules)."""
        super()._apply(fn, *args, **kwargs)
        for teacher in self.teachers:
            if teacher is not None:
                teacher.model._apply(fn, *args, **kwargs)
        return self

    def initialize(self, student_weights: str, init_from_teacher: bool) -> None:
        """Fresh-run initialisation: the student's ``MODEL.WEIGHTS`` (plain detector keys, e.g.
        a pre-trained backbone), then optionally its neck and heads from the active teacher
        (the first stage's teacher of a schedule)."""
        if student_weights:
            load_initialisation(self.student, student_weights)
        if init_from_teacher:
            copy_neck_and_heads(self.teachers[self.active_teacher].model, self.student)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)
        losses, taps = self.student_losses_and_taps(batched_inputs)
        losses.update(self.head_losses(taps, self.teacher_outputs(taps)))
        return losses

    def student_losses_and_taps(self, batched_inputs: List[Dict]
                                ) -> Tuple[Dict[str, torch.Tensor], StudentTaps]:
        """The step's one student forward: its own losses and what it exposed to the heads
        (with the batch's ground truth: the student's device copy when tapped, else copied
        here)."""
        with StudentTapper(self.student) as taps:
            losses = self.student(batched_inputs)
        if taps.gt_instances is None or len(taps.gt_instances) != len(batched_inputs):
            taps.gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return losses, taps

    def teacher_outputs(self, taps: StudentTaps) -> Dict[int, TeacherOutputs]:
        """What each teacher of the step (index -> outputs) computes on the student's batch."""
        return {i: self.run_teacher(self.teachers[i], taps) for i in self.teacher_weights}

    def head_losses(self, taps: StudentTaps,
                    outputs: Dict[int, TeacherOutputs]) -> Dict[str, torch.Tensor]:
        """Every head's losses against its teacher's outputs; with several teachers (joint
        schedule) suffixed ``_t<index>`` and weighted by the teacher's weight.

        The heads' logged scalars (device tensors) reach the EventStorage here, after every
        head, with one host transfer for all of them: the step's only host synchronisation
        for KD statistics."""
        losses = {}
        for key, head in self.heads.items():
            index = self.head_teacher[key]
            head_losses = head(taps, outputs[index])
            if len(outputs) > 1:
                weight = self.teacher_weights[index]
                head_losses = {f"{k}_t{index}": weight * v for k, v in head_losses.items()}
            losses.update(head_losses)
        flush_tensor_scalars()
        return losses

    def run_teacher(self, teacher: FrozenTeacher, taps: StudentTaps) -> TeacherOutputs:
        """The teacher's outputs the heads need, on the student's batch."""
        outputs = TeacherOutputs()
        if not self.teacher_needs:
            return outputs
        images = teacher.normalize(taps.images, self.student.pixel_mean,
                                   self.student.pixel_std, self.input_format)
        features = teacher.backbone_features(images)  # the teacher's own level names
        # under the student's level names (matched by stride), on the student's grids
        outputs.features = teacher.student_levels(features, taps.features)
        # dense / RPN maps level by level like the student's (same levels: checked at build)
        if "dense_predictions" in self.teacher_needs:
            outputs.dense_predictions = [
                crop_to_grids(t, s) for t, s in zip(teacher.dense_predictions(features),
                                                    taps.dense_predictions)]
        if "rpn_predictions" in self.teacher_needs:
            outputs.rpn_predictions = tuple(
                crop_to_grids(t, s) for t, s in zip(teacher.rpn_predictions(features),
                                                    taps.rpn_predictions))
        if "roi_predictions" in self.teacher_needs:
            boxes = [p.proposal_boxes for p in taps.sampled_proposals]
            outputs.roi_predictions = teacher.roi_predictions(
                features, boxes, self.student.roi_heads.box_predictor.box2box_transform)
        return outputs


def deployed_detector(model: nn.Module) -> nn.Module:
    """The detector that evaluation scores and deployment ships: a distillation model's
    student, any other detector itself."""
    return model.student if isinstance(model, DistillationDetector) else model
