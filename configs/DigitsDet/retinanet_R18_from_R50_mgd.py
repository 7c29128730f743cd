"""LazyConfig twin of retinanet_R18_from_R50_mgd.yaml: the RetinaNet R-18/2 student distilled
from the R-50/2 teacher with MGD, 600 iterations (docs/lazyconfig.md).

    python tools/lazy_train_net.py --config-file configs/DigitsDet/retinanet_R18_from_R50_mgd.py

Every setting mirrors the yacs config (Base-DigitsDet.yaml, Base-RetinaNet.yaml,
retinanet_R18_student.yaml, Base-Distill-retinanet_R18_from_R50.yaml);
tests/config/test_lazyconfig.py checks that the student is the yacs one, tensor for tensor and
output for output.
"""
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler

from d2kd.compat import has_compiled_extension
from d2kd.engine.optimizer import clipped_optimizer
from d2kd.heads import MGDHead
from d2kd.model_zoo import get_config_file
from d2kd.modeling import DistillationDetector, scalable_resnet
from d2kd.modeling.teacher import load_teacher

LEVELS = ["p3", "p4", "p5", "p6", "p7"]
MAX_ITER = 600


def fpn_shapes(channels: int):
    """The shapes of an FPN's P3-P7 (stride 2**k), as the heads are told them."""
    return {f"p{k}": ShapeSpec(channels=channels, stride=2 ** k) for k in range(3, 8)}


# ---- the student: RetinaNet R-18/2 (stem and res2 32 channels), FPN 64, GN head -----------
student = model_zoo.get_config("common/models/retinanet.py").model
student.backbone.bottom_up = L(scalable_resnet)(
    depth=18, stem_out_channels=32, res2_out_channels=32, out_features=["res3", "res4", "res5"],
    norm="BN", stride_in_1x1=False, freeze_at=0)
student.backbone.out_channels = 64
student.backbone.top_block.in_channels = 256  # res5 of R-18/2
student.head.input_shape = [ShapeSpec(channels=64)] * len(LEVELS)
student.head.conv_dims = [64] * 4
student.head.norm = "GN"
student.num_classes = 10
student.smooth_l1_beta = 0.1  # MODEL.RETINANET.SMOOTH_L1_LOSS_BETA
# digits are 10-190 px tall: anchors 16-256 on P3-P7, 3 octave scales x 3 aspect ratios
student.anchor_generator.sizes = [
    [16.0, 20.16, 25.4], [32.0, 40.32, 50.8], [64.0, 80.63, 101.59], [128.0, 161.27, 203.19],
    [256.0, 322.54, 406.37]]
student.pixel_mean = [123.675, 116.28, 103.53]  # RGB
student.pixel_std = [58.395, 57.12, 57.375]
student.input_format = "RGB"

# ---- the distillation: the trained R-50/2 teacher (FPN 128), MGD on P3-P7 --------------------
model = L(DistillationDetector)(
    student=student,
    input_format="RGB",
    teacher=L(load_teacher)(
        config=get_config_file("DigitsDet/retinanet_R50_teacher.yaml"),
        weights="output/digitsdet/retinanet_R50_teacher/model_final.pth"),
    heads=[L(MGDHead)(levels=LEVELS, student_shapes=fpn_shapes(64),
                      teacher_shapes=fpn_shapes(128), alpha=2e-5, mask_ratio=0.65)],
)

# ---- data: DigitsDet at 144 x 192, no flips (they turn digits into non-digits) --------------
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="digitsdet_train"),
    mapper=L(DatasetMapper)(
        is_train=True, image_format="RGB",
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=(144,), max_size=192,
                                               sample_style="choice")]),
    total_batch_size=16, num_workers=1)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="digitsdet_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False, image_format="RGB",
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=144, max_size=192)]),
    num_workers=1)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="digitsdet_val", tasks=("bbox",), output_dir="${...train.output_dir}/inference",
    use_fast_impl=has_compiled_extension())  # the pure-Python detectron2 build has no fast one

# ---- solver: AdamW 2e-3, weight decay 0.05 (none on norms), per-parameter gradient-norm clip
# 10, 100 warm-up iterations then cosine to 0 --------------------------------------------------
optimizer = L(clipped_optimizer)(
    optimizer_class=torch.optim.AdamW,
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.002, betas=(0.9, 0.999), weight_decay=0.05, clip_type="norm", clip_value=10.0)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=100 / MAX_ITER, warmup_factor=0.001)

train = model_zoo.get_config("common/train.py").train
train.output_dir = "output/digitsdet/retinanet_R18_from_R50_mgd_lazy"
train.init_checkpoint = "digitsdet-pretrained://R18_FPN64"
train.max_iter = MAX_ITER
train.checkpointer = dict(period=200, max_to_keep=100)
train.eval_period = 0  # once, after training
train.device = "cpu"
train.seed = 0
