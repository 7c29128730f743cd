"""Frozen teacher detectors.

A :class:`FrozenTeacher` is deliberately **not** an ``nn.Module``: held as a plain attribute of
its owner, it stays out of ``state_dict()``, ``parameters()`` (hence the optimizer) and DDP.
Its parameters never require grad, it is locked in eval mode (``model.train()`` is a no-op on
it), it runs under ``torch.no_grad()``, and its weights must load completely — a teacher whose
checkpoint is missing or does not match its config is a hard error, never a warning.
"""
import logging
import os
from typing import Dict, List, Tuple

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList
from omegaconf import OmegaConf
from torch import nn

from ..compat.checkpoint import UnreadableCheckpoint, load_weights
from ..compat.padding import padded_size
from ..config.loading import ConfigError
from ..config.teachers import YACS, TeacherSpec, load_teacher_config, teacher_specs, teacher_weights

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


def build_teacher(cfg: CfgNode, index: int) -> "FrozenTeacher":
    """The :class:`FrozenTeacher` of entry ``index`` of ``DISTILL.TEACHER.CONFIGS`` (a yacs
    or LazyConfig file, or a model-zoo name; see d2kd/config/teachers.py)."""
    spec = teacher_specs(cfg)[index]
    model, input_format, weights = build_teacher_model(spec, cfg)
    load_teacher_weights(model, weights, spec.reference)
    return FrozenTeacher(model, input_format, weights, spec.reference)


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
    """

    def __init__(self, model: nn.Module, input_format: str, weights: str, name: str = ""):
        self.model = model
        self.input_format = input_format
        self.weights = weights
        self.name = name
        self.model.requires_grad_(False)
        _lock_eval(self.model)
        logger.info("Teacher %s (%s) loaded from %s", name, type(model).__name__, weights)

    @property
    def backbone_shapes(self) -> Dict[str, ShapeSpec]:
        return self.model.backbone.output_shape()

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    def normalize(self, images: ImageList, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                  input_format: str) -> torch.Tensor:
        """The student's padded batch, re-normalised with this teacher's mean/std/format.

        Args:
            images: the student's normalised batch, tensor (N, 3, H, W).
            pixel_mean, pixel_std, input_format: the student's normalisation.
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
    def features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone (FPN) outputs, name -> (N, C, H/s, W/s)."""
        return self.model.backbone(images)

    @torch.no_grad()
    def dense_predictions(self, features: Dict[str, torch.Tensor]) -> List[List[torch.Tensor]]:
        """A dense teacher's head outputs per kind (logits, deltas[, ctrness]) and level."""
        return list(self.model.head([features[f] for f in self.model.head_in_features]))

    @torch.no_grad()
    def roi_predictions(self, features: Dict[str, torch.Tensor],
                        boxes: List[Boxes]) -> Tuple[torch.Tensor, torch.Tensor]:
        """An R-CNN teacher's box head on given boxes: (scores (R, K+1), deltas (R, 4K))."""
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        return roi_heads.box_predictor(roi_heads.box_head(pooled))

    @torch.no_grad()
    def rpn_predictions(self, features: Dict[str, torch.Tensor]):
        """An R-CNN teacher's RPN head: objectness logits and deltas, lists over its levels."""
        generator = self.model.proposal_generator
        return generator.rpn_head([features[f] for f in generator.in_features])
