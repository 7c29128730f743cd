"""Response-based heads: logit KD (Hinton) and localization KD on regression deltas.

Dense students (RetinaNet, FCOS) are compared with the teacher's dense head at the same
anchors (same levels, anchors per cell and classes, checked at build time); R-CNN students
send their sampled RoIs through the teacher's box head, so both classify the same boxes.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

from ..config.defaults import register_config_extension
from ..config.ranges import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, one_of, register_key_rules
from ..structures import StudentKind, StudentTaps, TeacherOutputs
from .registry import DISTILL_HEAD_REGISTRY, DistillHead


def flatten_dense(per_level: List[torch.Tensor], dim: int) -> torch.Tensor:
    """Per-level (N, A*dim, H, W) -> (N, sum(H*W*A), dim), detectron2's anchor order."""
    return torch.cat([permute_to_N_HWA_K(x, dim) for x in per_level], dim=1)


def binary_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s)))."""
    p = torch.sigmoid(teacher_logits)
    return (p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))


class _ResponseHead(DistillHead):
    """Shared part: dense vs R-CNN mode and the matching teacher outputs."""

    def __init__(self, *, dense: bool):
        """``dense``: the student is a dense detector (else an R-CNN; ``StudentKind``)."""
        super().__init__()
        self.dense = dense
        need = "dense_predictions" if self.dense else "roi_predictions"
        self.teacher_needs = frozenset({"features", need})


@DISTILL_HEAD_REGISTRY.register()
class LogitKDHead(_ResponseHead):
    """Temperature-softened class distributions, ``WEIGHT * T^2 * KL(teacher || student)``.

    R-CNN: softmax over the K+1 classes of the student's sampled RoIs, mean over RoIs.
    Dense: per-class sigmoid (binary KL averaged over classes) at the student's positive
    anchors (``DENSE_LOCATIONS: "positive"``) or where the teacher's top score exceeds
    ``CONFIDENCE`` (``"teacher_confident"``), mean over those anchors.
    """

    name = "logit"

    @configurable
    def __init__(self, *, dense: bool, weight: float = 1.0, temperature: float = 2.0,
                 dense_locations: str = "positive", confidence: float = 0.5):
        super().__init__(dense=dense)
        self.weight = weight
        self.temperature = temperature
        self.dense_locations = dense_locations
        self.confidence = confidence
        if self.dense_locations not in ("positive", "teacher_confident"):
            raise ValueError(f"DISTILL.LOGIT.DENSE_LOCATIONS={self.dense_locations!r} is not "
                             "one of 'positive', 'teacher_confident'.")

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        logit = cfg.DISTILL.LOGIT
        return {"dense": StudentKind.from_config(cfg).dense, "weight": logit.WEIGHT,
                "temperature": logit.TEMPERATURE, "dense_locations": logit.DENSE_LOCATIONS,
                "confidence": logit.CONFIDENCE}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        t2 = self.temperature ** 2
        if self.dense:
            num_classes = dense_num_classes(student)
            s = flatten_dense(student.dense_predictions[0], num_classes)
            t = flatten_dense(teacher.dense_predictions[0], num_classes)
            if self.dense_locations == "positive":
                selected = _positive_anchors(student)
            else:
                selected = torch.sigmoid(t).amax(dim=-1) > self.confidence
            # Mean over the selected anchors and classes as a masked sum: no boolean indexing
            # (its data-dependent size is a host synchronisation); 0 when none is selected.
            kl = binary_kl(t / self.temperature, s / self.temperature)
            count = selected.sum()
            loss = (_masked_sum(kl, selected) / (count * num_classes).clamp(min=1)) * t2
            self.log("selected_locations", {"all": count.float()})
        else:
            s_scores, _ = student.roi_predictions
            t_scores, _ = teacher.roi_predictions
            log_p_s = F.log_softmax(s_scores / self.temperature, dim=1)
            log_p_t = F.log_softmax(t_scores / self.temperature, dim=1)
            loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * t2
        return {"loss_kd_logit_cls": self.weight * loss}


@DISTILL_HEAD_REGISTRY.register()
class LocKDHead(_ResponseHead):
    """Localization distillation for delta regression heads: L1 or smooth-L1 between student
    and teacher deltas at positive locations (dense: positive anchors; R-CNN: positive sampled
    RoIs, the deltas of their GT class), mean over positives x 4 coordinates."""

    name = "loc"

    @configurable
    def __init__(self, *, dense: bool, weight: float = 1.0, loss: str = "smooth_l1",
                 beta: float = 0.1):
        super().__init__(dense=dense)
        self.weight = weight
        self.loss = loss
        self.beta = beta
        if self.loss not in ("l1", "smooth_l1"):
            raise ValueError(f"DISTILL.LOC.LOSS={self.loss!r} is not 'l1' or 'smooth_l1'.")

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        loc = cfg.DISTILL.LOC
        return {"dense": StudentKind.from_config(cfg).dense, "weight": loc.WEIGHT,
                "loss": loc.LOSS, "beta": loc.BETA}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        if self.dense:
            positive = _positive_anchors(student)  # (N, R)
            s = flatten_dense(student.dense_predictions[1], 4)  # (N, R, 4)
            t = flatten_dense(teacher.dense_predictions[1], 4)
        else:
            positive, s, t = _rcnn_gt_class_deltas(student, teacher)  # (R,), (R, 4), (R, 4)
        # Mean over positives x 4 coordinates as a masked sum (no boolean indexing, no host
        # synchronisation); 0 without positives.
        if self.loss == "l1":
            elementwise = F.l1_loss(s, t, reduction="none")
        else:
            elementwise = F.smooth_l1_loss(s, t, reduction="none", beta=self.beta)
        loss = _masked_sum(elementwise, positive) / (4 * positive.sum()).clamp(min=1)
        return {"loss_kd_loc_box": self.weight * loss}


def dense_num_classes(student: StudentTaps) -> int:
    """K of a dense student: logits have A*K channels, deltas A*4."""
    anchors_per_cell = student.dense_predictions[1][0].shape[1] // 4
    return student.dense_predictions[0][0].shape[1] // anchors_per_cell


def _positive_anchors(student: StudentTaps) -> torch.Tensor:
    """(N, R) bool: anchors the student's own loss labelled with a foreground class."""
    labels = torch.stack(student.anchor_labels)  # class, K = background, -1 = ignored
    return (labels >= 0) & (labels < dense_num_classes(student))


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (mask.shape + trailing dims) where ``mask`` is set; a ``where``, not a
    product, so that non-finite values elsewhere do not leak in."""
    mask = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim()))
    return torch.where(mask, values, values.new_zeros(())).sum()


def _rcnn_gt_class_deltas(student: StudentTaps, teacher: TeacherOutputs
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over all R sampled RoIs: which are positive (R,) bool, and the student's and teacher's
    (R, 4) deltas for each RoI's GT class (class 0's for background RoIs, masked by callers)."""
    _, s_deltas = student.roi_predictions
    _, t_deltas = teacher.roi_predictions
    gt_classes = torch.cat([p.gt_classes for p in student.sampled_proposals])
    num_classes = student.roi_predictions[0].shape[1] - 1
    positive = (gt_classes >= 0) & (gt_classes < num_classes)
    cols = (torch.where(positive, gt_classes, 0)[:, None] * 4
            + torch.arange(4, device=gt_classes.device))

    def pick(deltas: torch.Tensor) -> torch.Tensor:
        if deltas.shape[1] == 4:  # class-agnostic regression
            return deltas
        return deltas.gather(1, cols)

    return positive, pick(s_deltas), pick(t_deltas)


@register_config_extension
def add_response_config(cfg: CfgNode) -> None:
    """``DISTILL.LOGIT`` / ``DISTILL.LOC``: :class:`LogitKDHead` and :class:`LocKDHead`."""
    if "LOGIT" in cfg.DISTILL:
        return
    # Logit KD (Hinton): KL of temperature-softened class distributions, times T^2.
    cfg.DISTILL.LOGIT = CfgNode()
    # Loss weight.
    cfg.DISTILL.LOGIT.WEIGHT = 1.0
    # Softmax/sigmoid temperature T.
    cfg.DISTILL.LOGIT.TEMPERATURE = 2.0
    # Dense students: distil at the student's "positive" anchors or where the teacher is
    # confident ("teacher_confident": its top class score exceeds CONFIDENCE).
    cfg.DISTILL.LOGIT.DENSE_LOCATIONS = "positive"
    # Teacher score threshold for DENSE_LOCATIONS = "teacher_confident".
    cfg.DISTILL.LOGIT.CONFIDENCE = 0.5

    # Localization KD on box-regression deltas at positive locations.
    cfg.DISTILL.LOC = CfgNode()
    # Loss weight.
    cfg.DISTILL.LOC.WEIGHT = 1.0
    # "l1" or "smooth_l1".
    cfg.DISTILL.LOC.LOSS = "smooth_l1"
    # Transition point of smooth-L1.
    cfg.DISTILL.LOC.BETA = 0.1


register_key_rules({
    "DISTILL.LOGIT.TEMPERATURE": POSITIVE,
    "DISTILL.LOGIT.DENSE_LOCATIONS": one_of("positive", "teacher_confident"),
    "DISTILL.LOGIT.CONFIDENCE": UNIT_INTERVAL,
    "DISTILL.LOC.LOSS": one_of("l1", "smooth_l1"),
    "DISTILL.LOC.BETA": NON_NEGATIVE,
})
