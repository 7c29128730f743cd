"""A Swin Transformer + FPN backbone for yacs configs: transformer detectors d2kd can train.

detectron2 ships :class:`~detectron2.modeling.SwinTransformer` (upstream ``main``; not in
v0.6) for LazyConfig files only (ViTDet's Cascade Mask R-CNN configs). This builder puts it,
sized by ``MODEL.SWIN``, under detectron2's FPN (``MODEL.FPN``, extra levels from
``MODEL.FPN.TOP_BLOCK``) so that a yacs config can train a Swin detector of any detectron2
meta-architecture — the DigitsDet transformer teacher
(``configs/DigitsDet/retinanet_SwinT_teacher.yaml``) — with ``tools/train_net.py``.

Swin names its stages ``p0``-``p3`` (strides 4-32, ``embed_dim * 2**i`` channels); list the
ones the FPN reads in ``MODEL.FPN.IN_FEATURES``. The FPN's outputs are named by stride
(``p2``-``p7``) as for a ResNet-FPN, so teachers and students of both kinds share level names.
"""
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

from ..compat.projects import missing_transformer_backbones
from ..config.defaults import register_config_extension
from .backbone import build_fpn


@register_config_extension
def add_swin_config(cfg: CN) -> None:
    """``MODEL.SWIN``: the Swin Transformer of :func:`build_swin_fpn_backbone`."""
    if "SWIN" in cfg.MODEL:
        return
    cfg.MODEL.SWIN = CN()
    # Patch size of the stride-4 patch embedding (the first stage's stride).
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    # Channels of the first stage; stage i has EMBED_DIM * 2**i.
    cfg.MODEL.SWIN.EMBED_DIM = 96
    # Transformer blocks per stage and attention heads per stage (Swin-T: 2,2,6,2 / 3,6,12,24).
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    # Side of the (shifted) attention windows, in tokens.
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Stochastic depth rate of the last block (linearly increasing from 0).
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN (``MODEL.FPN``) on detectron2's SwinTransformer (``MODEL.SWIN``)."""
    missing = missing_transformer_backbones()
    if "SwinTransformer" in missing:
        raise ImportError(
            "MODEL.BACKBONE.NAME build_swin_fpn_backbone needs detectron2's SwinTransformer, "
            "which this detectron2 lacks (it came after v0.6): install detectron2 from source "
            "(upstream main; `make setup-upstream` builds one)."
        )
    from detectron2.modeling import SwinTransformer

    swin = cfg.MODEL.SWIN
    if len(swin.DEPTHS) != len(swin.NUM_HEADS):
        raise ValueError(
            f"MODEL.SWIN.DEPTHS {list(swin.DEPTHS)} and NUM_HEADS {list(swin.NUM_HEADS)} must "
            "have one entry per stage."
        )
    stages = [f"p{i}" for i in range(len(swin.DEPTHS))]
    unknown = [name for name in cfg.MODEL.FPN.IN_FEATURES if name not in stages]
    if unknown:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} names {unknown}, which "
            f"the Swin backbone does not have: its stages are {stages} (strides 4, 8, ...)."
        )
    bottom_up = SwinTransformer(
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        drop_path_rate=swin.DROP_PATH_RATE,
        out_indices=tuple(stages.index(name) for name in cfg.MODEL.FPN.IN_FEATURES),
    )
    return build_fpn(cfg, bottom_up, cfg.MODEL.FPN.IN_FEATURES[-1])
