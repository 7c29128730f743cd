"""RDM: robust distillation with global knowledge (Tang et al., ECCV 2022).

Reference: docs/methods/global_knowledge.md. KD instances are the positives the student's
own loss used: positive sampled proposals (R-CNN; labels from their matched GT, each on the
FPN level detectron2's ``assign_boxes_to_levels`` picks) or positive anchors (RetinaNet; the
anchor box on its own level). Their features are box-pooled from the raw FPN maps of both
models (the space of the prototypes). Per instance the robustness weight (Eq. 8) scales:

- the global loss (Eq. 6): relations to every prototype of a level, smooth-L1; as released,
  every KD instance of the batch enters every level's term (``GLOBAL_INSTANCES``);
- the local feature loss (Eq. 7): a 3x3 adapter, foreground cells of the level's KD boxes
  filled with their weight, background cells, normalised separately;
- the local response loss: weighted T^2 KL of softened class distributions at the KD
  instances (R-CNN: both box heads on the student's positive RoIs, weights from the mean of
  each RoI's RoIAlign bins as released (``RESPONSE_POOLING``); RetinaNet: both dense heads
  at the positive anchors, aligned per image and anchor).

``L = GLOBAL_WEIGHT * a * L_glob + FEATURE_WEIGHT * a * L_feat + RESPONSE_WEIGHT * L_resp``
with the attenuation ``a = 1 - iter / ATTENUATION_ITERS``, decayed every iteration or held per
block of ``ATTENUATION_STEP_ITERS`` (the release's per-epoch decay). The prototype bank
(``self.bank``) is rebuilt by the prototype refresh; with an empty bank every weight is 1 and
the global loss is 0.
"""
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config.defaults import register_config_extension
from ..config.ranges import NON_NEGATIVE, POSITIVE, at_least, one_of, register_key_rules
from ..prototypes import PrototypeBank, batched_box_pool, roi_align_mean
from ..structures import StudentKind, StudentTaps, TeacherOutputs, level_id
from .alignment import check_levels
from .global_knowledge_losses import global_relation_loss, local_feature_loss, weighted_response_kl
from .masks import box_weight_maps, released_box_weight_maps
from .registry import DISTILL_HEAD_REGISTRY, DistillHead
from .response import dense_num_classes, flatten_dense


@dataclass
class KDInstances:
    """Positive instances of one level: boxes (M, 4), classes (M,), image index (M,), and for
    the response loss their row in the flattened predictions (M,)."""

    boxes: torch.Tensor
    classes: torch.Tensor
    images: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def concat(cls, parts: Sequence["KDInstances"]) -> "KDInstances":
        """The instances of ``parts``, in order."""
        return cls(*(torch.cat(fields) for fields in zip(
            *((p.boxes, p.classes, p.images, p.rows) for p in parts))))


@dataclass(frozen=True)
class RoIAlignSpec:
    """The student's box pooler, for the R-CNN response weights: RoIAlign with ``resolution``
    bins per side, ``sampling_ratio`` samples per bin side (0: adaptive) and half-pixel
    ``aligned`` coordinates (``ROIAlignV2``), over the FPN ``levels``
    (``ROI_HEADS.IN_FEATURES``; a box goes to the level ``assign_boxes_to_levels`` picks)."""

    levels: Tuple[str, ...]
    resolution: int
    sampling_ratio: int
    aligned: bool

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "RoIAlignSpec":
        box_head = cfg.MODEL.ROI_BOX_HEAD
        aligned = {"ROIAlign": False, "ROIAlignV2": True}.get(box_head.POOLER_TYPE)
        if aligned is None:
            raise ValueError(f"DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_POOLING 'roi' pools with the "
                             f"student's box pooler, which must be ROIAlign or ROIAlignV2, not "
                             f"{box_head.POOLER_TYPE!r}; set RESPONSE_POOLING: 'box'.")
        return cls(tuple(cfg.MODEL.ROI_HEADS.IN_FEATURES), box_head.POOLER_RESOLUTION,
                   box_head.POOLER_SAMPLING_RATIO, aligned)

    def level_of(self, level: str) -> str:
        """The pooler level of a box that ``assign_boxes_to_levels`` put on ``level`` when
        choosing among another range of levels: the nearest pooler level (the assignment
        clamps to the range's ends). Exact where that range contains the pooler's; else a
        box the pooler would put beyond that range stays on the range's end."""
        ids = [level_id(l) for l in self.levels]
        return f"p{min(max(level_id(level), min(ids)), max(ids))}"


@DISTILL_HEAD_REGISTRY.register()
class GlobalKnowledgeHead(DistillHead):
    """RDM losses with a PGM prototype bank (Tang et al., ECCV 2022;
    docs/methods/global_knowledge.md).

    Inputs per distilled level l: student map S (N, C_s, H_s, W_s), teacher map T
    (N, C_t, H_t, W_t). KD instances of level l (module docstring): boxes (M_l, 4) XYXY in
    input pixels, classes (M_l,), image indices (M_l,). Their features are box-pooled from
    the raw maps: f^s (M_l, C_s), f^t (M_l, C_t). The bank ``self.bank`` holds prototypes
    P^s [L, n_cls, K, C_s], P^t [L, n_cls, K, C_t] and ``valid`` [L, n_cls].

    - Robustness weight (Eq. 8), detached, not clipped, (M_l,); 1 for a class without valid
      prototypes:
      ``w = 1 - |max_k cos(f^s, P^s[l, c, k]) - max_k cos(f^t, P^t[l, c, k])|``
    - Global loss (Eq. 6), per level l over the instances of every level, M = sum_l M_l
      (``global_instances`` "all_levels", as released) or over level l's own (M_l,
      "assigned"), each box-pooled from level l's maps and weighted by level l's w: A^s, A^t
      (M, n_cls * K) cosines of every instance to every prototype of level l;
      ``L_glob = sum_l mean smoothL1_{beta=1}(w A^s, w A^t)`` over the columns of valid
      classes.
    - Local feature loss (Eq. 7): g_l a 3x3 conv C_s -> C_t (bilinearly resized to
      (H_t, W_t) if needed); M (N, 1, H_t, W_t) holds each KD box's w on the cells it covers
      (max over boxes, 0 elsewhere), B = 1[M = 0]:
      ``L_feat^l = FG_LAMBDA sum (g(S) - T)^2 M / max(1, 2 C_t sum M)
      + BG_LAMBDA sum (g(S) - T)^2 B / max(1, 2 C_t sum B)``,
      mean over levels (``LEVEL_REDUCTION`` "mean") or sum ("sum").
    - Local response loss over the R = sum_l M_l instances: class logits z (R, K + 1) of both
      box predictors on the student's positive RoIs (R-CNN) or (R, K) of both dense heads at
      the positive anchors (RetinaNet); p = softmax(z / T), T = ``TEMPERATURE``:
      ``L_resp = (1/R) sum_r w_r T^2 mean_c p^t (log p^t - log p^s)``. With a
      ``response_pooler`` (R-CNN, as released) w_r is Eq. 8 on the mean of the RoI's
      RoIAlign bins (f^s from S, f^t from T, (R, C)) on its box-pooler level; without, the
      box-pooled weights above.

    Returns 0-dim losses ``loss_kd_global_knowledge_global`` (GLOBAL_WEIGHT * a * L_glob),
    ``loss_kd_global_knowledge_feat`` (FEATURE_WEIGHT * a * L_feat) and
    ``loss_kd_global_knowledge_resp`` (RESPONSE_WEIGHT * L_resp), with
    a = max(0, 1 - i / ATTENUATION_ITERS) (1 when ATTENUATION is off), i the iteration, or
    with ``ATTENUATION_STEP_ITERS`` = P > 0 the start of its block, P * floor(iter / P) (the
    release: P one epoch). Logs
    ``kd/global_knowledge/feat/<level>``, ``kd/global_knowledge/weight_mean`` and
    ``kd/global_knowledge/weight_min``.
    """

    name = "global_knowledge"

    @configurable
    def __init__(self, *, levels: Sequence[str], student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec], student_kind: StudentKind,
                 num_prototypes: int, global_weight: float, feature_weight: float,
                 response_weight: float, temperature: float, fg_lambda: float,
                 bg_lambda: float, level_reduction: str = "mean", attenuation_iters: int = 0,
                 attenuation_step_iters: int = 0, weight_map: str = "max",
                 global_instances: str = "all_levels",
                 response_pooler: Optional[RoIAlignSpec] = None):
        """
        Args:
            levels: as for the feature heads.
            student_shapes: as for the feature heads.
            teacher_shapes: as for the feature heads.
            student_kind: what the student is (dense or R-CNN, its anchor levels, classes).
            num_prototypes: prototypes per class (``DISTILL.PROTOTYPES.NUM_PROTOTYPES``).
            global_weight: ``DISTILL.GLOBAL_KNOWLEDGE.GLOBAL_WEIGHT``.
            feature_weight: ``DISTILL.GLOBAL_KNOWLEDGE.FEATURE_WEIGHT``.
            response_weight: ``DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_WEIGHT``.
            temperature: ``DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE``.
            fg_lambda: ``DISTILL.GLOBAL_KNOWLEDGE.FG_LAMBDA``.
            bg_lambda: ``DISTILL.GLOBAL_KNOWLEDGE.BG_LAMBDA``.
            level_reduction: ``DISTILL.GLOBAL_KNOWLEDGE.LEVEL_REDUCTION``.
            attenuation_iters: the loss attenuation's length in iterations (0: off;
                ``DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION`` / ``ATTENUATION_ITERS``).
            attenuation_step_iters: 0, the attenuation decays every iteration; P > 0, it is
                held constant over blocks of P iterations
                (``DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION_STEP_ITERS``).
            weight_map: how KD boxes fill the feature loss's foreground mask: "max" or
                "released" (:func:`~d2kd.heads.masks.released_box_weight_maps`);
                ``DISTILL.GLOBAL_KNOWLEDGE.WEIGHT_MAP``.
            global_instances: "all_levels" (every KD instance in every level's global term,
                as released) or "assigned" (each level's own);
                ``DISTILL.GLOBAL_KNOWLEDGE.GLOBAL_INSTANCES``.
            response_pooler: an R-CNN student's box pooler: the response weights come from
                the mean of each RoI's RoIAlign bins (as released); None: from the box-pooled
                features (``DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_POOLING``). A RoI whose pooler level
                is not distilled uses the nearest distilled level (KD levels clamped to the
                pooler's).
        """
        super().__init__()
        self.levels = list(levels)
        check_levels(self.levels, student_shapes, teacher_shapes)
        self.teacher_strides = {l: teacher_shapes[l].stride for l in self.levels}
        self.student_strides = {l: student_shapes[l].stride for l in self.levels}
        self.dense = student_kind.dense
        # The response term reads the teacher's predictions; without it (RESPONSE_WEIGHT 0)
        # features suffice, so any teacher family serves (e.g. a Cascade R-CNN teacher for a
        # RetinaNet student).
        self.with_response = response_weight != 0
        self.with_global = global_weight != 0
        self.global_all_levels = global_instances == "all_levels"
        self.response_pooler = response_pooler if self.with_response and not self.dense else None
        if self.response_pooler is not None and not all(
                response_pooler.level_of(l) in self.levels for l in self.levels):
            raise ValueError(f"GlobalKnowledgeHead: the R-CNN response weights "
                             f"(DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_POOLING 'roi') need "
                             f"prototypes on the box pooler's levels "
                             f"{list(response_pooler.levels)}, but DISTILL.IN_FEATURES "
                             f"{self.levels} shares none: add them or set RESPONSE_POOLING: "
                             f"'box'.")
        self.teacher_needs = frozenset(
            {"features"} | ({"dense_predictions" if self.dense else "roi_predictions"}
                            if self.with_response else set()))
        self.bank = PrototypeBank(self.levels, student_kind.num_classes, num_prototypes,
                                  teacher_shapes[self.levels[0]].channels,
                                  student_shapes[self.levels[0]].channels)
        self.adapters = nn.ModuleDict({
            l: nn.Conv2d(student_shapes[l].channels, teacher_shapes[l].channels, 3, padding=1)
            for l in self.levels})
        self.weights = (global_weight, feature_weight, response_weight)
        self.temperature = temperature
        self.fg_lambda, self.bg_lambda = fg_lambda, bg_lambda
        self.level_mean = level_reduction == "mean"
        self.attenuation_iters = attenuation_iters
        self.attenuation_step_iters = attenuation_step_iters
        self.weight_map = weight_map
        self.level_ids = [level_id(l) for l in self.levels]
        if self.dense:  # positive anchors come per head level
            head_levels = list(student_kind.anchor_levels)
            missing = [l for l in self.levels if l not in head_levels]
            if missing or not student_kind.anchored:
                raise ValueError("GlobalKnowledgeHead on a dense student needs a RetinaNet whose "
                                 f"head levels {head_levels} include DISTILL.IN_FEATURES "
                                 f"{self.levels}.")
            self.anchor_level_index = {l: head_levels.index(l) for l in self.levels}

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        gk = cfg.DISTILL.GLOBAL_KNOWLEDGE
        kind = StudentKind.from_config(cfg)
        return {"levels": list(cfg.DISTILL.IN_FEATURES), "student_shapes": student_shapes,
                "teacher_shapes": teacher_shapes, "student_kind": kind,
                "num_prototypes": cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES,
                "global_weight": gk.GLOBAL_WEIGHT, "feature_weight": gk.FEATURE_WEIGHT,
                "response_weight": gk.RESPONSE_WEIGHT, "temperature": gk.TEMPERATURE,
                "fg_lambda": gk.FG_LAMBDA, "bg_lambda": gk.BG_LAMBDA,
                "level_reduction": gk.LEVEL_REDUCTION,
                "attenuation_iters": ((gk.ATTENUATION_ITERS or cfg.SOLVER.MAX_ITER)
                                      if gk.ATTENUATION else 0),
                "attenuation_step_iters": gk.ATTENUATION_STEP_ITERS,
                "weight_map": gk.WEIGHT_MAP,
                "global_instances": gk.GLOBAL_INSTANCES,
                "response_pooler": (RoIAlignSpec.from_config(cfg)
                                    if gk.RESPONSE_POOLING == "roi" and gk.RESPONSE_WEIGHT != 0
                                    and not kind.dense else None)}

    # ---- KD instances --------------------------------------------------------------------
    def kd_instances(self, student: StudentTaps) -> Dict[str, KDInstances]:
        """The positive instances of each level. Their numbers depend on the data: one host
        synchronisation per step (the per-level counts), shared by every level."""
        return self._dense_instances(student) if self.dense else self._rcnn_instances(student)

    def _rcnn_instances(self, student: StudentTaps) -> Dict[str, KDInstances]:
        num_classes = student.roi_predictions[0].shape[1] - 1
        proposals = student.sampled_proposals
        boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])  # (R, 4)
        classes = torch.cat([p.gt_classes for p in proposals])  # (R,)
        images = torch.cat([torch.full((len(p),), i, dtype=torch.long, device=classes.device)
                            for i, p in enumerate(proposals)])
        positive = (classes >= 0) & (classes < num_classes)
        level = assign_boxes_to_levels([Boxes(boxes)], min(self.level_ids), max(self.level_ids),
                                       224, 4)
        picks = _set_entries([positive & (level == k) for k in range(len(self.levels))])
        return {l: KDInstances(boxes[rows], classes[rows], images[rows], rows)
                for l, rows in zip(self.levels, picks)}

    def _dense_instances(self, student: StudentTaps) -> Dict[str, KDInstances]:
        labels = torch.stack(student.anchor_labels)  # (N, R over all head levels)
        num_classes = dense_num_classes(student)
        starts = list(itertools.accumulate([0] + [len(a) for a in student.anchors]))
        positive = (labels >= 0) & (labels < num_classes)
        spans = [(starts[i], starts[i + 1]) for i in
                 (self.anchor_level_index[level] for level in self.levels)]
        picks = _set_entries([positive[:, lo:hi] for lo, hi in spans])
        out = {}
        for level, (lo, _), pick in zip(self.levels, spans, picks):
            images, anchor = pick.unbind(dim=1)
            level_index = self.anchor_level_index[level]
            out[level] = KDInstances(student.anchors[level_index].tensor[anchor],
                                     labels[images, lo + anchor], images,
                                     images * labels.shape[1] + lo + anchor)
        return out

    # ---- losses --------------------------------------------------------------------------
    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        return self.instance_losses(student, teacher, self.kd_instances(student))

    def instance_losses(self, student: StudentTaps, teacher: TeacherOutputs,
                        instances: Dict[str, KDInstances]) -> Dict[str, torch.Tensor]:
        """The three losses on given KD instances (fixed shapes from here on: no host
        synchronisation)."""
        parts = [instances[l] for l in self.levels]
        # The instances each level pools: every level's (the released global term) or its own.
        # The level's own are then rows starts[i]:starts[i + 1] of every level's.
        pool_all = self.with_global and self.global_all_levels
        everything = KDInstances.concat(parts) if pool_all else None
        starts = list(itertools.accumulate([0] + [len(p.boxes) for p in parts]))
        glob, feat, weights, per_level = [], [], [], {}
        for level_index, (level, kd) in enumerate(zip(self.levels, parts)):
            s_map, t_map = student.features[level], teacher.features[level]
            pooled = everything if pool_all else kd
            f_s, f_t, w_pooled = self._box_weights(pooled, s_map, t_map, level, level_index)
            w = w_pooled[starts[level_index]:starts[level_index + 1]] if pool_all else w_pooled
            weights.append(w)
            glob.append(global_relation_loss(f_s, f_t, w_pooled, self.bank, level_index)
                        if self.with_global and len(pooled.boxes) else s_map.sum() * 0.0)
            mask = self._foreground(kd, w, t_map, self.teacher_strides[level])
            adapted = self.adapters[level](s_map)
            if adapted.shape[-2:] != t_map.shape[-2:]:
                adapted = torch.nn.functional.interpolate(adapted, size=t_map.shape[-2:],
                                                          mode="bilinear", align_corners=False)
            feat.append(local_feature_loss(adapted, t_map, mask, self.fg_lambda,
                                           self.bg_lambda))
            per_level[level] = feat[-1].detach()
        feat_loss = torch.stack(feat).mean() if self.level_mean else torch.stack(feat).sum()
        glob_loss = torch.stack(glob).sum()
        resp_loss = self._response(student, teacher, instances, weights)
        a = self._attenuation()
        w_glob, w_feat, w_resp = self.weights
        all_w = torch.cat(weights)
        if len(all_w):
            self.log_scalar("weight_mean", all_w.mean())
            self.log_scalar("weight_min", all_w.min())
        self.log("feat", per_level)
        return {"loss_kd_global_knowledge_global": w_glob * a * glob_loss,
                "loss_kd_global_knowledge_feat": w_feat * a * feat_loss,
                "loss_kd_global_knowledge_resp": w_resp * resp_loss}

    def _box_weights(self, kd: KDInstances, s_map: torch.Tensor, t_map: torch.Tensor,
                     level: str, level_index: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box-pooled features f^s (M, C_s), f^t (M, C_t) of ``kd`` on ``level`` and their
        Eq. 8 weights (M,) against the level's prototypes."""
        f_s = batched_box_pool(s_map, kd.boxes, kd.images, self.student_strides[level])
        f_t = batched_box_pool(t_map, kd.boxes, kd.images, self.teacher_strides[level])
        return f_s, f_t, self.bank.robustness_weight(f_s, f_t, kd.classes, level_index)

    def _foreground(self, kd: KDInstances, w: torch.Tensor, t_map: torch.Tensor,
                    stride: int) -> torch.Tensor:
        """(N, 1, H, W): each KD box's cells filled with its weight (``WEIGHT_MAP``)."""
        fill = released_box_weight_maps if self.weight_map == "released" else box_weight_maps
        return fill(kd.boxes, w, kd.images, t_map.shape, stride)

    def _response(self, student: StudentTaps, teacher: TeacherOutputs,
                  instances: Dict[str, KDInstances], weights: List[torch.Tensor]
                  ) -> torch.Tensor:
        """The local response loss of the KD instances; ``weights`` their box-pooled Eq. 8
        weights per level (used unless the RoI weights replace them)."""
        if not self.with_response:
            return student.features[self.levels[0]].sum() * 0.0
        rows = torch.cat([instances[l].rows for l in self.levels])
        w = (self._roi_weights(student, teacher, instances) if self.response_pooler is not None
             else torch.cat(weights))
        if self.dense:
            num_classes = dense_num_classes(student)
            s = flatten_dense(student.dense_predictions[0], num_classes).flatten(0, 1)
            t = flatten_dense(teacher.dense_predictions[0], num_classes).flatten(0, 1)
        else:
            s, t = student.roi_predictions[0], teacher.roi_predictions[0]
        if len(rows) == 0:
            return s.sum() * 0.0
        return weighted_response_kl(s[rows], t[rows], w, self.temperature)

    @torch.no_grad()
    def _roi_weights(self, student: StudentTaps, teacher: TeacherOutputs,
                     instances: Dict[str, KDInstances]) -> torch.Tensor:
        """(R,) Eq. 8 weights of the KD RoIs (level by level, as ``instances``), as the
        released Faster R-CNN code weights its response loss: from the mean of each RoI's
        RoIAlign bins (the student's box pooler settings, on both models' maps) on its
        box-pooler level, against that level's prototypes."""
        spec = self.response_pooler
        weights = []
        for level in self.levels:
            kd, roi_level = instances[level], spec.level_of(level)
            f_s, f_t = (roi_align_mean(maps[roi_level], kd.boxes, kd.images,
                                       strides[roi_level], spec.resolution,
                                       spec.sampling_ratio, spec.aligned)
                        for maps, strides in ((student.features, self.student_strides),
                                              (teacher.features, self.teacher_strides)))
            weights.append(self.bank.robustness_weight(f_s, f_t, kd.classes,
                                                       self.levels.index(roi_level)))
        return torch.cat(weights)

    def _attenuation(self) -> float:
        if self.attenuation_iters <= 0:
            return 1.0
        i = get_event_storage().iter
        if self.attenuation_step_iters > 0:
            i -= i % self.attenuation_step_iters
        return max(0.0, 1.0 - i / self.attenuation_iters)


def _set_entries(masks: List[torch.Tensor]) -> List[torch.Tensor]:
    """The indices of the set entries of each bool mask: (P,) for a 1-d mask, (P, 2) for a
    2-d one, in row-major order. One host read (the counts of all masks together); with
    ``torch.nonzero_static`` the indices then need none."""
    counts = torch.stack([m.sum() for m in masks]).tolist() if masks else []
    if not hasattr(torch, "nonzero_static"):  # torch < 2.1: one more read per mask
        picks = [m.nonzero() for m in masks]
    else:
        picks = [torch.nonzero_static(m, size=c) for m, c in zip(masks, counts)]
    return [p.squeeze(1) if m.dim() == 1 else p for p, m in zip(picks, masks)]


@register_config_extension
def add_global_knowledge_config(cfg: CfgNode) -> None:
    """``DISTILL.GLOBAL_KNOWLEDGE``: :class:`GlobalKnowledgeHead`'s keys (its losses are
    ``loss_kd_global_knowledge_*``)."""
    if "GLOBAL_KNOWLEDGE" in cfg.DISTILL:
        return
    # Global-knowledge distillation, RDM losses (d2kd/heads/global_knowledge.py).
    cfg.DISTILL.GLOBAL_KNOWLEDGE = CfgNode()
    # Weights of the global (Eq. 6), local feature (Eq. 7) and local response losses.
    cfg.DISTILL.GLOBAL_KNOWLEDGE.GLOBAL_WEIGHT = 5.0
    cfg.DISTILL.GLOBAL_KNOWLEDGE.FEATURE_WEIGHT = 1.0
    cfg.DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_WEIGHT = 1.0
    # Softmax temperature of the response loss.
    cfg.DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE = 2.0
    # lambda_fg, lambda_bg of the local feature loss.
    cfg.DISTILL.GLOBAL_KNOWLEDGE.FG_LAMBDA = 1.0
    cfg.DISTILL.GLOBAL_KNOWLEDGE.BG_LAMBDA = 4.0
    # Feature-loss reduction over levels: "mean" (released Faster R-CNN) or "sum" (RetinaNet).
    cfg.DISTILL.GLOBAL_KNOWLEDGE.LEVEL_REDUCTION = "mean"
    # Attenuate the global and feature losses by a = 1 - iter / ATTENUATION_ITERS (released).
    cfg.DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION = True
    # Iterations over which the attenuation decays to 0; 0: SOLVER.MAX_ITER (the whole run).
    cfg.DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION_ITERS = 0
    # 0: the attenuation decays every iteration (d2kd); P > 0: it is held over blocks of P
    # iterations, a = 1 - P * floor(iter / P) / ATTENUATION_ITERS. The release decays per
    # epoch: P = one epoch's iterations, ceil(training images / SOLVER.IMS_PER_BATCH).
    cfg.DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION_STEP_ITERS = 0
    # How KD boxes fill the feature loss's foreground mask: "max", each box's cells (the floor
    # rule of the box pooling, inclusive) hold the largest weight of the boxes covering them
    # (d2kd); "released", the release's get_gt_mask: exclusive end cells, a box without cells
    # marks one, a later box overwrites an earlier one, negative weights kept.
    cfg.DISTILL.GLOBAL_KNOWLEDGE.WEIGHT_MAP = "max"
    # Instances of each level's global loss: "all_levels", every KD instance of the batch
    # pooled on every level (released); "assigned", each level's own (d2kd's earlier rule).
    cfg.DISTILL.GLOBAL_KNOWLEDGE.GLOBAL_INSTANCES = "all_levels"
    # R-CNN response weights from "roi", the mean of each RoI's RoIAlign bins (the student's
    # box pooler settings; released), or "box", the box-pooled features of the other terms
    # (d2kd's earlier rule: one weight per instance for every term). Dense students: "box".
    cfg.DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_POOLING = "roi"


register_key_rules({
    "DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE": POSITIVE,
    "DISTILL.GLOBAL_KNOWLEDGE.FG_LAMBDA": NON_NEGATIVE,
    "DISTILL.GLOBAL_KNOWLEDGE.BG_LAMBDA": NON_NEGATIVE,
    "DISTILL.GLOBAL_KNOWLEDGE.LEVEL_REDUCTION": one_of("mean", "sum"),
    "DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION_ITERS": at_least(0),
    "DISTILL.GLOBAL_KNOWLEDGE.ATTENUATION_STEP_ITERS": at_least(0),
    "DISTILL.GLOBAL_KNOWLEDGE.WEIGHT_MAP": one_of("max", "released"),
    "DISTILL.GLOBAL_KNOWLEDGE.GLOBAL_INSTANCES": one_of("all_levels", "assigned"),
    "DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_POOLING": one_of("roi", "box"),
})
