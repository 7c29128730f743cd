"""Frozen teacher detectors.

A :class:`FrozenTeacher` is deliberately **not** an ``nn.Module``: held as a plain attribute of
its owner, it stays out of ``state_dict()``, ``parameters()`` (hence the optimizer) and DDP.
Its parameters never require grad, it is locked in eval mode (``model.train()`` is a no-op on
it), it runs under ``torch.no_grad()``, and its weights must load completely — a teacher whose
checkpoint is missing or does not match its config is a hard error, never a warning.
"""
import logging
import os
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList
from torch import nn

from ..config.loading import ConfigError, load_config

logger = logging.getLogger(__name__)


def _lock_eval(model: nn.Module) -> None:
    """Put ``model`` (and every submodule) in eval mode for good: ``train()`` does nothing."""
    model.eval()
    for module in model.modules():
        module.train = lambda mode=True, _m=module: _m


def load_teacher_weights(model: nn.Module, weights: str) -> None:
    """Load ``weights`` into ``model``; raise unless every tensor matches exactly."""
    if not weights:
        raise ConfigError("A teacher needs weights: set DISTILL.TEACHER.WEIGHTS or the teacher "
                          "config's MODEL.WEIGHTS to a trained model_final.pth.")
    if "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"Teacher weights {weights} do not exist. Train the teacher first "
                          "(tools/train_net.py --config-file TEACHER_CONFIG).")
    checkpointer = DetectionCheckpointer(model)
    checkpoint = checkpointer._load_file(checkpointer.path_manager.get_local_path(weights))
    incompatible = checkpointer._load_model(checkpoint)
    problems = []
    if incompatible.missing_keys:
        problems.append(f"missing keys: {sorted(incompatible.missing_keys)}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {sorted(incompatible.unexpected_keys)}")
    if incompatible.incorrect_shapes:
        problems.append("shape mismatches (key, checkpoint, model): "
                        f"{sorted(incompatible.incorrect_shapes)}")
    if problems:
        raise ConfigError(f"Teacher weights {weights} do not match the teacher config: "
                          + "; ".join(problems))


class FrozenTeacher:
    """A trained detector built from its own config; produces features and head outputs."""

    def __init__(self, cfg: CfgNode):
        self.cfg = cfg
        self.model = build_model(cfg)
        load_teacher_weights(self.model, cfg.MODEL.WEIGHTS)
        self.model.requires_grad_(False)
        _lock_eval(self.model)
        logger.info("Teacher %s loaded from %s", cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.WEIGHTS)

    @classmethod
    def from_files(cls, config_file: str, weights: str = "", opts: Sequence[str] = ()):
        cfg = load_config(config_file, opts)
        if weights:
            cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        return cls(cfg)

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
            (N, 3, H', W') with padding 0 in the teacher's space; H', W' are rounded up to the
            teacher backbone's size divisibility.
        """
        raw = images.tensor * pixel_std + pixel_mean
        if input_format != self.cfg.INPUT.FORMAT:
            raw = raw.flip(1)
        model = self.model
        normalized = (raw - model.pixel_mean) / model.pixel_std
        divisibility = max(model.backbone.size_divisibility, 1)
        height = -(-normalized.shape[-2] // divisibility) * divisibility
        width = -(-normalized.shape[-1] // divisibility) * divisibility
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
