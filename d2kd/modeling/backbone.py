"""A ResNet whose width is free for every depth, and its FPN.

detectron2's ``build_resnet_backbone`` fixes the width of R-18/R-34
(``RES2_OUT_CHANNELS`` must be 64). CPU-sized students and teachers need narrower networks,
so this builder takes ``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` at any
value for basic-block (18, 34) and bottleneck (50, 101, 152) ResNets alike. Stage ``k`` has
``RES2_OUT_CHANNELS * 2**(k-2)`` output channels; bottleneck stages keep detectron2's
``NUM_GROUPS * WIDTH_PER_GROUP`` inner width, doubled per stage.
"""
from typing import Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock

from ..config.defaults import register_config_extension

_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def scalable_resnet(*, depth: int, stem_out_channels: int, res2_out_channels: int,
                    out_features: Sequence[str], norm: str = "BN", num_groups: int = 1,
                    width_per_group: int = 64, stride_in_1x1: bool = False, freeze_at: int = 0,
                    in_channels: int = 3) -> ResNet:
    """ResNet-{18,34,50,101,152} of any width (see module docstring); the arguments are
    ``MODEL.RESNETS``' keys in lower case (a LazyConfig builds it with ``L(scalable_resnet)``)."""
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not one of {sorted(_BLOCKS_PER_STAGE)}.")
    basic = depth in (18, 34)
    stem = BasicStem(in_channels, stem_out_channels, norm=norm)
    in_channels, out_channels = stem_out_channels, res2_out_channels
    bottleneck_channels = num_groups * width_per_group
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        stage_kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=norm,
        )
        if basic:
            stage_kwargs["block_class"] = BasicBlock
        else:
            stage_kwargs.update(
                block_class=BottleneckBlock,
                bottleneck_channels=bottleneck_channels,
                num_groups=num_groups,
                stride_in_1x1=stride_in_1x1,
            )
        stages.append(ResNet.make_stage(**stage_kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at)


@BACKBONE_REGISTRY.register()
def build_scalable_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """:func:`scalable_resnet` from ``MODEL.RESNETS``."""
    res = cfg.MODEL.RESNETS
    if any(res.DEFORM_ON_PER_STAGE) or res.RES5_DILATION != 1:
        raise ValueError(
            "build_scalable_resnet_backbone supports neither deformable convolutions nor "
            "res5 dilation; use detectron2's build_resnet_backbone for those."
        )
    return scalable_resnet(
        depth=res.DEPTH, stem_out_channels=res.STEM_OUT_CHANNELS,
        res2_out_channels=res.RES2_OUT_CHANNELS, out_features=res.OUT_FEATURES, norm=res.NORM,
        num_groups=res.NUM_GROUPS, width_per_group=res.WIDTH_PER_GROUP,
        stride_in_1x1=res.STRIDE_IN_1X1, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels)


def build_fpn(cfg, bottom_up: Backbone, top_block_input: str) -> FPN:
    """detectron2's FPN on ``bottom_up`` from ``MODEL.FPN``; the extra levels of
    ``MODEL.FPN.TOP_BLOCK`` ("p6p7") are computed from the bottom-up level ``top_block_input``."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block_name = cfg.MODEL.FPN.TOP_BLOCK
    if top_block_name == "maxpool":
        top_block = LastLevelMaxPool()
    elif top_block_name == "p6p7":
        top_block = LastLevelP6P7(
            bottom_up.output_shape()[top_block_input].channels, out_channels, top_block_input
        )
    elif top_block_name == "none":
        top_block = None
    else:
        raise ValueError(
            f"MODEL.FPN.TOP_BLOCK={top_block_name!r} is not one of 'maxpool', 'p6p7', 'none'."
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_scalable_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """FPN on :func:`build_scalable_resnet_backbone`; extra levels from ``MODEL.FPN.TOP_BLOCK``."""
    return build_fpn(cfg, build_scalable_resnet_backbone(cfg, input_shape), "res5")


@register_config_extension
def add_backbone_config(cfg: CfgNode) -> None:
    """``MODEL.FPN.TOP_BLOCK``: :func:`build_fpn`."""
    if "TOP_BLOCK" in cfg.MODEL.FPN:
        return
    # Extra FPN levels above the last input feature: "maxpool" (P6 by max-pooling P5, as in
    # Faster R-CNN), "p6p7" (P6, P7 by stride-2 convs on res5, as in RetinaNet) or "none".
    cfg.MODEL.FPN.TOP_BLOCK = "maxpool"
