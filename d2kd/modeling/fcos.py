"""FCOS built from a yacs config.

detectron2 implements FCOS (``detectron2.modeling.meta_arch.fcos``) but only for LazyConfig:
the class is neither ``@configurable`` nor registered. This subclass adds ``from_config``
reading ``MODEL.FCOS.*`` (see d2kd/config/defaults.py) and registers it as ``"FCOS"`` in
``META_ARCH_REGISTRY``, so ``MODEL.META_ARCHITECTURE: FCOS`` works like ``RetinaNet``.
"""
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

from ..config.defaults import register_config_extension

__all__ = ["FCOS"]


class FCOS(_FCOS):
    """detectron2's FCOS with a yacs ``from_config``; behaviour unchanged."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        fcos = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        feature_shapes = [backbone.output_shape()[f] for f in fcos.IN_FEATURES]
        channels = feature_shapes[0].channels
        head = FCOSHead(
            input_shape=feature_shapes,
            num_classes=fcos.NUM_CLASSES,
            conv_dims=[channels] * fcos.NUM_CONVS,
            norm=fcos.NORM,
            prior_prob=fcos.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": fcos.IN_FEATURES,
            "num_classes": fcos.NUM_CLASSES,
            "center_sampling_radius": fcos.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": fcos.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": fcos.FOCAL_LOSS_GAMMA,
            "test_score_thresh": fcos.SCORE_THRESH_TEST,
            "test_topk_candidates": fcos.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": fcos.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }


if "FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(FCOS)


@register_config_extension
def add_fcos_config(cfg: CfgNode) -> None:
    """``MODEL.FCOS``: :class:`FCOS` with a yacs config (detectron2 ships FCOS for LazyConfig
    only)."""
    if "FCOS" in cfg.MODEL:
        return
    cfg.MODEL.FCOS = CfgNode()
    # Number of foreground classes.
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    # FPN levels the head runs on, from the highest resolution to the lowest.
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convolutions in each of the classification and regression towers.
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # Normalisation in the towers ("GN", "BN", "" ...), see detectron2.layers.get_norm.
    cfg.MODEL.FCOS.NORM = "GN"
    # Initial foreground probability of the classification logits.
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Centre-sampling radius, in units of the level's stride.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Focal-loss parameters of the classification branch.
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Inference: score threshold, candidates per level before NMS, NMS IoU threshold.
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6
