"""Frozen teacher detectors.

A :class:`FrozenTeacher` is deliberately **not** an ``nn.Module``: held as a plain attribute of
its owner, it stays out of ``state_dict()``, ``parameters()`` (hence the optimizer) and DDP.
Its parameters never require grad, it is locked in eval mode (``model.train()`` is a no-op on
it), it runs under ``torch.no_grad()``, and its weights must load completely — a teacher whose
checkpoint is missing or does not match its config is a hard error, never a warning.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, ImageList
from omegaconf import OmegaConf
from torch import nn

from ..compat.padding import padded_size
from ..compat.weight_loading import UnreadableCheckpoint, load_weights
from ..config.loading import ConfigError, get_d2kd_cfg
from ..config.teachers import YACS, TeacherSpec, load_teacher_config, teacher_specs, teacher_weights
from ..heads.alignment import match_levels
from ..utils.hashing import weights_sha256

# DISTILL.TEACHER.CASCADE_STAGE: which stages of a Cascade R-CNN teacher answer on RoIs.
CASCADE_STAGES = ("mean", "last")

logger = logging.getLogger(__name__)


def _lock_eval(model: nn.Module) -> None:
    """Put ``model`` (and every submodule) in eval mode for good: ``train()`` does nothing."""
    model.eval()
    for module in model.modules():
        module.train = lambda mode=True, _m=module: _m


def load_teacher_weights(model: nn.Module, weights: str, name: str = "") -> None:
    """Load ``weights`` (a local file or a URL detectron2's ``PathManager`` resolves, e.g.
    ``detectron2://...``; ``.pth`` or model-zoo ``.pkl``) into ``model``; raise unless every
    tensor matches exactly."""
    teacher = f"Teacher {name}: weights" if name else "Teacher weights"
    if "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"{teacher} {weights} do not exist. Train the teacher first "
                          "(tools/train_net.py --config-file TEACHER_CONFIG) or point "
                          "DISTILL.TEACHER.WEIGHTS at its checkpoint.")
    try:
        report = load_weights(model, weights)
    except UnreadableCheckpoint as e:
        raise ConfigError(f"{teacher} {weights} cannot be read as a checkpoint ({e}); "
                          "re-download or re-export the file.") from None
    except (AssertionError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{teacher} {weights} cannot be opened ({e}); train the teacher "
                          "first or point DISTILL.TEACHER.WEIGHTS at its checkpoint.") from None
    if report.problems:
        raise ConfigError(f"{teacher} {weights} do not match the teacher config: "
                          + "; ".join(report.problems))


def _lazy_input_format(lazy_cfg) -> str:
    """The channel order a LazyConfig model was trained on: ``model.input_format`` (RetinaNet,
    R-CNN), else its data loader's ``image_format`` (FCOS), else detectron2's default BGR."""
    for key in ("model.input_format", "dataloader.test.mapper.image_format",
                "dataloader.train.mapper.image_format"):
        value = OmegaConf.select(lazy_cfg, key, default=None)
        if value:
            return value
    return "BGR"


def build_teacher(cfg: CfgNode, index: int,
                  student_shapes: Optional[Dict[str, ShapeSpec]] = None) -> "FrozenTeacher":
    """The :class:`FrozenTeacher` of entry ``index`` of ``DISTILL.TEACHER.CONFIGS`` (a yacs
    or LazyConfig file, or a model-zoo name; see d2kd/config/teachers.py), its levels matched
    to ``student_shapes`` (the student backbone's output shapes) by stride."""
    return FrozenTeacher(cfg, index, student_shapes)


def load_teacher(config: str, weights: str, *, opts: Sequence[str] = (),
                 lazy_overrides: Sequence[str] = (), cascade_stage: str = "mean",
                 device: str = "cpu") -> "FrozenTeacher":
    """A :class:`FrozenTeacher` from its config (a yacs or LazyConfig file, or
    ``model_zoo://...``) and weights, loaded strictly — the ``DISTILL.TEACHER`` keys of one
    teacher as arguments, for LazyConfig recipes (``L(load_teacher)(config=..., weights=...)``).
    Its levels are matched to the student's by :class:`DistillationDetector`."""
    cfg = get_d2kd_cfg()
    cfg.MODEL.DEVICE = device
    cfg.DISTILL.TEACHER.CONFIGS = [config]
    cfg.DISTILL.TEACHER.WEIGHTS = [weights]
    cfg.DISTILL.TEACHER.OPTS = list(opts)
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = list(lazy_overrides)
    cfg.DISTILL.TEACHER.CASCADE_STAGE = cascade_stage
    return build_teacher(cfg, 0)


def build_teacher_model(spec: TeacherSpec, cfg: CfgNode) -> Tuple[nn.Module, str, str]:
    """(model with its initial weights, input format, the weights it must load) of a
    teacher."""
    teacher_cfg = load_teacher_config(spec, cfg)
    weights = teacher_weights(spec, teacher_cfg)
    if spec.kind == YACS:
        return build_model(teacher_cfg), teacher_cfg.INPUT.FORMAT, weights
    try:
        model = instantiate(teacher_cfg.model)
    except Exception as e:  # arbitrary user code: name the teacher
        raise ConfigError(f"Teacher LazyConfig {spec.reference}: `model` cannot be built: "
                          f"{type(e).__name__}: {e}") from None
    return model, _lazy_input_format(teacher_cfg), weights


class FrozenTeacher:
    """A trained detector; produces features and head outputs on the student's batch.

    Args:
        model: the detector (any detectron2 meta-architecture), weights loaded.
        input_format: the channel order it was trained on ("BGR" or "RGB").
        weights: where its weights came from (identifies the teacher in caches and logs).
        name: how the config named it (for messages).
        student_shapes: the student backbone's output shapes; the teacher's levels are
            presented under the names of the student levels they match by stride
            (:func:`d2kd.heads.alignment.match_levels`). None: the teacher's own names.
        cascade_stage: a Cascade R-CNN teacher's answer on RoIs (:meth:`roi_predictions`):
            "mean" of the stages' class probabilities, or the "last" stage's.
    """

    @configurable
    def __init__(self, model: nn.Module, input_format: str, weights: str, name: str = "",
                 student_shapes: Optional[Dict[str, ShapeSpec]] = None,
                 cascade_stage: str = "mean"):
        self.model = model
        self.input_format = input_format
        self.weights = weights
        self.name = name
        self.cascade_stage = cascade_stage
        self.model.requires_grad_(False)
        _lock_eval(self.model)
        logger.info("Teacher %s (%s) loaded from %s", name, type(model).__name__, weights)
        self.match_student(student_shapes)

    @classmethod
    def from_config(cls, cfg: CfgNode, index: int = 0,
                    student_shapes: Optional[Dict[str, ShapeSpec]] = None):
        """Teacher ``index`` of ``DISTILL.TEACHER``: built, its weights loaded strictly."""
        cascade_stage = cfg.DISTILL.TEACHER.CASCADE_STAGE
        if cascade_stage not in CASCADE_STAGES:
            raise ValueError(f"DISTILL.TEACHER.CASCADE_STAGE={cascade_stage!r} is not one of "
                             f"{', '.join(map(repr, CASCADE_STAGES))}.")
        spec = teacher_specs(cfg)[index]
        model, input_format, weights = build_teacher_model(spec, cfg)
        load_teacher_weights(model, weights, spec.reference)
        return {"model": model, "input_format": input_format, "weights": weights,
                "name": spec.reference, "student_shapes": student_shapes,
                "cascade_stage": cascade_stage}

    def weights_sha256(self) -> str:
        """SHA-256 of the weights file the teacher was loaded from (a URL: detectron2's local
        copy of it): what caches of its outputs are keyed by, never its path."""
        return weights_sha256(self.weights)

    def architecture(self) -> List[Tuple[str, List[int]]]:
        """(name, shape) of every tensor of the teacher's state: its architecture."""
        return [(name, list(t.shape)) for name, t in self.model.state_dict().items()]

    def match_student(self, student_shapes: Optional[Dict[str, ShapeSpec]]) -> "FrozenTeacher":
        """Present the teacher's levels under the names of the student levels they match by
        stride (None: the teacher's own names); returns self."""
        own = self.model.backbone.output_shape()
        # student level name -> teacher level name
        self.levels: Dict[str, str] = (match_levels(student_shapes, own) if student_shapes
                                       else {level: level for level in own})
        # student levels whose teacher map has the student's stride (cropped, never resized)
        self._same_stride = {s for s, t in self.levels.items()
                             if not student_shapes or student_shapes[s].stride == own[t].stride}
        renamed = {s: t for s, t in self.levels.items() if s != t}
        if renamed:
            logger.info("Teacher %s levels matched to student levels by stride: %s", self.name,
                        ", ".join(f"{s} <- {t}" for s, t in sorted(renamed.items())))
        return self

    @property
    def backbone_shapes(self) -> Dict[str, ShapeSpec]:
        """The teacher backbone's output shapes under the student's level names (only the
        levels that match a student level; see ``levels``)."""
        own = self.model.backbone.output_shape()
        return {s: own[t] for s, t in self.levels.items()}

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    def normalize(self, images: ImageList, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                  input_format: str) -> torch.Tensor:
        """The student's padded batch, re-normalised with this teacher's mean/std/format.

        Args:
            images: the student's normalised batch, tensor (N, 3, H, W).
            pixel_mean: the student's normalisation mean.
            pixel_std: the student's normalisation std.
            input_format: the student's channel order ("RGB" or "BGR").
        Returns:
            (N, 3, H', W') with padding 0 in the teacher's space; H', W' follow the teacher
            backbone's padding (size divisibility, fixed square size).
        """
        raw = images.tensor * pixel_std + pixel_mean
        if input_format != self.input_format:
            raw = raw.flip(1)
        model = self.model
        normalized = (raw - model.pixel_mean) / model.pixel_std
        height, width = padded_size(model.backbone, *normalized.shape[-2:])
        out = normalized.new_zeros(normalized.shape[0], 3, height, width)
        for i, (h, w) in enumerate(images.image_sizes):
            out[i, :, :h, :w] = normalized[i, :, :h, :w]
        return out

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone (FPN / simple feature pyramid) outputs under the teacher's own names,
        name -> (N, C, H/s, W/s): what the teacher's own heads read."""
        return self.model.backbone(images)

    def student_levels(self, features: Dict[str, torch.Tensor],
                       student_features: Optional[Dict[str, torch.Tensor]] = None
                       ) -> Dict[str, torch.Tensor]:
        """``features`` (the teacher's names) under the names of the student levels they
        match: student level -> (N, C, H_t, W_t).

        With ``student_features`` (the student's maps of the same batch, (N, C_s, H_s, W_s)),
        a teacher map of the student's stride that is larger — the teacher pads the batch
        further, e.g. to ViTDet's fixed square — is cropped to (H_s, W_s): both maps start at
        the batch's top-left pixel, so cell (i, j) of each sees the same pixels. Otherwise
        the tensors are returned as they are (a map of another stride is resized by the
        heads' aligner)."""
        out = {}
        for s, t in self.levels.items():
            like = student_features.get(s) if student_features is not None else None
            same_grid = like is not None and s in self._same_stride
            out[s] = crop_to_grids([features[t]], [like])[0] if same_grid else features[t]
        return out

    def features(self, images: torch.Tensor,
                 student_features: Optional[Dict[str, torch.Tensor]] = None
                 ) -> Dict[str, torch.Tensor]:
        """Backbone outputs under the student's level names, name -> (N, C, H/s, W/s);
        cropped to ``student_features``' grids as :meth:`student_levels` says."""
        return self.student_levels(self.backbone_features(images), student_features)

    @torch.no_grad()
    def dense_predictions(self, features: Dict[str, torch.Tensor]) -> List[List[torch.Tensor]]:
        """A dense teacher's head outputs per kind (logits, deltas[, ctrness]) and level, from
        :meth:`backbone_features` (the teacher's own level names)."""
        return list(self.model.head([features[f] for f in self.model.head_in_features]))

    @torch.no_grad()
    def roi_predictions(self, features: Dict[str, torch.Tensor], boxes: List[Boxes],
                        box_coder: Optional[Box2BoxTransform] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """An R-CNN teacher's box head on given boxes.

        Args:
            features: :meth:`backbone_features` (the teacher's own level names).
            boxes: per image, the R_i boxes to classify (R = sum R_i), in the padded batch's
                pixels.
            box_coder: the box coding the returned deltas are in (the student's
                ``Box2BoxTransform``); None, or the teacher's own: as the teacher predicts them.
        Returns:
            scores (R, K+1) and deltas (R, 4K), or (R, 4) for class-agnostic regression.
            A Cascade R-CNN teacher (per-stage ``box_head[k]`` / ``box_predictor[k]``) runs
            every stage on the same ``boxes`` (its own inference feeds stage k the boxes of
            stage k-1; here all answer for the student's boxes). With ``cascade_stage``
            "mean", scores are the log of the mean over stages of the softmax probabilities
            (the stage average of ``CascadeROIHeads`` inference; log-probabilities, so a
            softmax of them gives that mean back), with "last" the last stage's logits;
            deltas are the last stage's (the regression cascade inference keeps).
        """
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        return self.box_predictions(pooled, box_coder)

    @torch.no_grad()
    def box_predictions(self, pooled: torch.Tensor,
                        box_coder: Optional[Box2BoxTransform] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`roi_predictions` after the RoI pooling: the box head stage(s) on pooled
        features (R, C, P, P); (scores (R, K+1), deltas (R, 4K) or (R, 4))."""
        heads, predictors = box_stages(self.model.roi_heads)
        if self.cascade_stage == "last":
            heads, predictors = heads[-1:], predictors[-1:]
        stage_scores = []
        for head, predictor in zip(heads, predictors):
            scores, deltas = predictor(head(pooled))
            stage_scores.append(scores)
        if len(stage_scores) > 1:
            log_probs = torch.stack([F.log_softmax(x, dim=1) for x in stage_scores])
            scores = torch.logsumexp(log_probs, dim=0) - math.log(len(stage_scores))
        return scores, recode_deltas(deltas, predictors[-1].box2box_transform, box_coder)

    @torch.no_grad()
    def rpn_predictions(self, features: Dict[str, torch.Tensor]):
        """An R-CNN teacher's RPN head on :meth:`backbone_features`: objectness logits and
        deltas, lists over its levels."""
        generator = self.model.proposal_generator
        return generator.rpn_head([features[f] for f in generator.in_features])


def crop_to_grids(maps: Sequence[torch.Tensor], like: Sequence[torch.Tensor]
                  ) -> List[torch.Tensor]:
    """Each teacher map (N, C, H_t, W_t) of the same stride as its student map (N, C', H_s,
    W_s) cropped to (H_s, W_s) where it is larger in both (the teacher padded the batch
    further; both grids start at the batch's top-left pixel); else as it is."""
    out = []
    for x, y in zip(maps, like):
        h, w = y.shape[-2:]
        out.append(x[..., :h, :w] if x.shape[-2] >= h and x.shape[-1] >= w else x)
    return out


def box_stages(roi_heads: nn.Module) -> Tuple[Sequence[nn.Module], Sequence[nn.Module]]:
    """(box heads, box predictors) of R-CNN RoI heads: one of each for ``StandardROIHeads``,
    one per stage for ``CascadeROIHeads`` (``nn.ModuleList`` s)."""
    heads, predictors = roi_heads.box_head, roi_heads.box_predictor
    if isinstance(predictors, nn.ModuleList):
        return list(heads), list(predictors)
    return [heads], [predictors]


def recode_deltas(deltas: torch.Tensor, source: Box2BoxTransform,
                  target: Optional[Box2BoxTransform]) -> torch.Tensor:
    """Box deltas of coding ``source`` re-expressed in coding ``target``: the deltas that
    ``target`` would encode, relative to the same boxes, the boxes ``source`` decodes.

    With detectron2's ``Box2BoxTransform`` (dx = wx (x' - x) / w, dw = ww log(w' / w), ...)
    this is a rescaling per coordinate, independent of the boxes: dx_t = dx_s wx_t / wx_s,
    dw_t = ww_t min(dw_s / ww_s, scale_clamp) (the clamp ``source`` decodes with).

    Args:
        deltas: (R, 4k) deltas (k classes, or 1: class-agnostic), detectron2's
            (dx, dy, dw, dh) order per class.
    Returns:
        (R, 4k); ``deltas`` itself when the weights are equal (or ``target`` is None).
    """
    if target is None or tuple(source.weights) == tuple(target.weights):
        return deltas
    per_class = deltas.reshape(deltas.shape[0], -1, 4)
    (sx, sy, sw, sh), (tx, ty, tw, th) = source.weights, target.weights
    clamp = source.scale_clamp
    recoded = torch.stack([per_class[..., 0] * (tx / sx), per_class[..., 1] * (ty / sy),
                           (per_class[..., 2] / sw).clamp(max=clamp) * tw,
                           (per_class[..., 3] / sh).clamp(max=clamp) * th], dim=-1)
    return recoded.reshape(deltas.shape)
