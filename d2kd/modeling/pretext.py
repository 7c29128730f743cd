"""Backbone pre-training by dense digit segmentation: the offline stand-in for ImageNet.

No pre-trained weights can be downloaded on the machines DigitsDet targets, so detectors
would start from random initialisation. :class:`SegmentationPretext` trains a detector's
``backbone`` (ResNet + FPN, built from the detector's own config) to label every cell of
every FPN level with the class of the instance mask covering its centre (0 = background).
Its checkpoint loads as ``MODEL.WEIGHTS`` of any detector with the same backbone config:
the ``backbone.*`` keys match, the 1x1 ``predictor`` is ignored.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

IGNORE_LABEL = -1


@META_ARCH_REGISTRY.register()
class SegmentationPretext(nn.Module):
    """Backbone + shared 1x1 classifier over FPN levels, trained with per-cell cross-entropy."""

    @configurable
    def __init__(self, *, backbone: Backbone, num_classes: int, pixel_mean: List[float],
                 pixel_std: List[float]):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        shapes = backbone.output_shape()
        channels = {s.channels for s in shapes.values()}
        if len(channels) != 1:
            raise ValueError(f"All backbone outputs must have one channel count, got {shapes}.")
        self.predictor = nn.Conv2d(channels.pop(), num_classes + 1, kernel_size=1)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_backbone(cfg),
            "num_classes": len(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """Training: ``{"loss_pretext": per-cell cross-entropy averaged over levels}``.

        Inference: ``[{"sem_seg": (K + 1, H, W) class probabilities}]`` per image, from the
        finest level, like detectron2's semantic segmentors.
        """
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        features = self.backbone(images.tensor)
        if not self.training:
            return self._inference(features, images)
        labels = self._label_maps(batched_inputs, images.tensor.shape[-2:])  # (N, H, W)
        losses = []
        for name, shape in self.backbone.output_shape().items():
            logits = self.predictor(features[name])  # (N, K + 1, H / s, W / s)
            target = torch.full_like(logits[:, 0], IGNORE_LABEL, dtype=torch.long)
            offset = shape.stride // 2  # label of each cell's centre pixel
            centres = labels[:, offset::shape.stride, offset::shape.stride]
            h, w = min(centres.shape[1], target.shape[1]), min(centres.shape[2], target.shape[2])
            target[:, :h, :w] = centres[:, :h, :w]
            if (target != IGNORE_LABEL).any():  # a level coarser than the image has no cell
                losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL))
        return {"loss_pretext": torch.stack(losses).mean()}

    def _inference(self, features: Dict[str, torch.Tensor], images: ImageList) -> List[Dict]:
        finest = min(self.backbone.output_shape().items(), key=lambda kv: kv[1].stride)[0]
        logits = F.interpolate(self.predictor(features[finest]), size=images.tensor.shape[-2:],
                               mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        return [{"sem_seg": p[:, :h, :w]} for p, (h, w) in zip(probs, images.image_sizes)]

    def _label_maps(self, batched_inputs: List[Dict], padded_size) -> torch.Tensor:
        """(N, H, W) int64: 1 + class under each instance mask, 0 elsewhere, -1 on padding."""
        labels = torch.full((len(batched_inputs), *padded_size), IGNORE_LABEL, dtype=torch.long,
                            device=self.device)
        for i, x in enumerate(batched_inputs):
            h, w = x["image"].shape[-2:]
            labels[i, :h, :w] = 0
            instances = x["instances"].to(self.device)
            for mask, cls in zip(instances.gt_masks.tensor, instances.gt_classes):
                labels[i, :h, :w][mask] = cls + 1
        return labels
