"""Teacher levels answer student levels by stride (``match_levels``), also when the teacher
names them otherwise (docs/transformer_teachers.md); a teacher's maps are presented to the heads
under the student's level names."""
import os

import torch
from conftest import CONFIGS, tiny_training_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_model

from d2kd.config import load_config
from d2kd.heads import FitNetHead
from d2kd.heads.alignment import match_levels
from d2kd.modeling.teacher import FrozenTeacher
from d2kd.structures import level_id


def _shapes(**levels):
    return {name: ShapeSpec(channels=channels, stride=stride)
            for name, (channels, stride) in levels.items()}


def test_levels_match_by_name_then_stride():
    student = _shapes(p2=(64, 4), p3=(64, 8), p4=(64, 16), p5=(64, 32), p6=(64, 64), p7=(64, 128))
    fpn = _shapes(p2=(256, 4), p3=(256, 8), p4=(256, 16), p5=(256, 32), p6=(256, 64))
    assert match_levels(student, fpn) == {f"p{k}": f"p{k}" for k in range(2, 7)}  # no p7
    # a backbone naming its maps otherwise (Swin's own outputs p0-p3, strides 4-32)
    swin = _shapes(p0=(128, 4), p1=(256, 8), p2=(512, 16), p3=(1024, 32))
    assert match_levels(student, swin) == {"p2": "p0", "p3": "p1", "p4": "p2", "p5": "p3"}
    # a name at another stride, no level of the stride: the name (maps are resized)
    assert match_levels(_shapes(p3=(64, 8)), _shapes(p3=(64, 4))) == {"p3": "p3"}
    # two teacher levels of the stride, neither of the name: ambiguous, unmatched
    assert match_levels(_shapes(p3=(64, 8)), _shapes(a=(8, 8), b=(8, 8))) == {}


class _Renamed(Backbone):
    """A backbone whose maps are named by stride (``s8``, ``s16``, ...)."""

    def __init__(self, inner: Backbone):
        super().__init__()
        self.inner = inner
        self._names = {name: f"s{shape.stride}" for name, shape in inner.output_shape().items()}

    def forward(self, x):
        return {self._names[k]: v for k, v in self.inner(x).items()}

    def output_shape(self):
        return {self._names[k]: v for k, v in self.inner.output_shape().items()}

    @property
    def size_divisibility(self):
        return self.inner.size_divisibility


def test_teacher_levels_are_presented_under_the_student_names(tiny_digitsdet, tmp_path):
    """Heads see a teacher level under the name of the student level of its stride: FitNet on
    a teacher that names its maps ``s8``..``s128`` equals the loss against those maps."""
    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_from_R50_fitnet.yaml", str(tmp_path))
    student_cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_R18_student.yaml"),
                              ["MODEL.WEIGHTS", ""])
    teacher_cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_R50_teacher.yaml"),
                              ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    student, teacher_model = build_model(student_cfg), build_model(teacher_cfg)
    teacher_model.backbone = _Renamed(teacher_model.backbone)
    teacher = FrozenTeacher(teacher_model, "RGB", "random", "renamed",
                            student.backbone.output_shape())
    levels = list(cfg.DISTILL.IN_FEATURES)
    assert teacher.levels == {level: f"s{2 ** level_id(level)}" for level in levels}
    shapes = teacher.backbone_shapes
    assert [shapes[l].stride for l in levels] == [2 ** level_id(l) for l in levels]
    head = FitNetHead(cfg, student.backbone.output_shape(), shapes)
    images = torch.randn(2, 3, 160, 192)
    raw = teacher.backbone_features(images)
    view = teacher.features(images)
    assert all(torch.equal(view[l], raw[f"s{2 ** level_id(l)}"]) for l in levels)

    class Taps:
        features = {l: f for l, f in student.backbone(images).items()}

    class Outputs:
        features = view

    from detectron2.utils.events import EventStorage
    with EventStorage():
        loss = head(Taps, Outputs)["loss_kd_fitnet_feat"]
    expected = sum(cfg.DISTILL.FITNET.WEIGHT * (head.aligner.adapters[l](Taps.features[l])
                                                - raw[f"s{2 ** level_id(l)}"]).pow(2).mean()
                   for l in levels)
    assert torch.allclose(loss, expected)
