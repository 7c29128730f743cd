"""MGDHead computes what the authors' released loss computes.

Reference: yzd-v/MGD, det/mmdet/distillation/losses/mgd.py at commit
454e609be857da44478876c5a43d45b78da2bc57 (``FeatureLoss``). Transcribed here from that file:
a 1x1 ``align`` convolution only when the channel counts differ; a mask drawn as
``rand(N, 1, H, W)``, a cell set to 0 where the draw exceeds ``1 - lambda_mgd`` and to 1
elsewhere; the generator conv3x3 -> ReLU -> conv3x3 on the masked student map; the loss
``alpha_mgd * sum((G(S * M) - T) ** 2) / N`` (``MSELoss(reduction='sum')`` over the batch
size). Both sides get the same uniform draw, the same generator and adapter weights, float64.
"""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage

from d2kd.config import get_d2kd_cfg
from d2kd.heads import MGDHead, TeacherOutputs, feature_imitation
from d2kd.structures import StudentTaps

LEVELS = ("p3", "p4")
SIZES = {"p3": (10, 12), "p4": (5, 6)}


def authors_mask(uniform: torch.Tensor, lambda_mgd: float) -> torch.Tensor:
    """The release's ``torch.where(mat > 1 - lambda_mgd, 0, 1)`` of its uniform draw."""
    return torch.where(uniform > 1 - lambda_mgd, torch.zeros_like(uniform),
                       torch.ones_like(uniform))


def authors_loss(s, t, uniform, align, generation, alpha_mgd, lambda_mgd):
    """``FeatureLoss.forward`` of the release, written out with functional ops."""
    if align is not None:
        s = F.conv2d(s, align.weight, align.bias)
    masked = s * authors_mask(uniform, lambda_mgd)
    conv1, conv2 = generation[0], generation[2]
    new = F.conv2d(F.relu(F.conv2d(masked, conv1.weight, conv1.bias, padding=1)),
                   conv2.weight, conv2.bias, padding=1)
    return alpha_mgd * ((new - t) ** 2).sum() / t.shape[0]


@pytest.mark.parametrize("student_channels, teacher_channels", [(8, 8), (6, 10)])
@pytest.mark.parametrize("alpha, ratio", [(2e-5, 0.65), (7e-5, 0.5)])
def test_mgd_head_equals_the_released_feature_loss(student_channels, teacher_channels, alpha,
                                                   ratio, monkeypatch):
    torch.manual_seed(0)
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = list(LEVELS)
    cfg.DISTILL.MGD.ALPHA, cfg.DISTILL.MGD.MASK_RATIO = alpha, ratio
    strides = {"p3": 8, "p4": 16}
    head = MGDHead(cfg,
                   {l: ShapeSpec(channels=student_channels, stride=strides[l]) for l in LEVELS},
                   {l: ShapeSpec(channels=teacher_channels, stride=strides[l]) for l in LEVELS})
    head = head.double()
    s = {l: torch.randn(3, student_channels, *SIZES[l], dtype=torch.float64) for l in LEVELS}
    t = {l: torch.randn(3, teacher_channels, *SIZES[l], dtype=torch.float64) for l in LEVELS}
    uniform = {l: torch.rand(3, 1, *SIZES[l], dtype=torch.float64) for l in LEVELS}
    draws = iter(uniform[l] for l in LEVELS)  # the head draws one mask per level, in order
    monkeypatch.setattr(feature_imitation, "random_keep_mask",
                        lambda x, drop_ratio: authors_mask(next(draws), drop_ratio))
    with EventStorage():
        loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_mgd_feat"]
    adapters = head.aligner.adapters
    expected = sum(authors_loss(s[l], t[l], uniform[l], adapters[l] if l in adapters else None,
                                head.generators[l], alpha, ratio) for l in LEVELS)
    assert (student_channels != teacher_channels) == (len(adapters) == len(LEVELS))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_mask_drops_each_cell_with_the_released_probability():
    # d2kd keeps a cell where u >= ratio, the release where u <= 1 - ratio: the same law
    torch.manual_seed(1)
    x = torch.ones(64, 1, 64, 64)
    kept = feature_imitation.random_keep_mask(x, 0.65).mean().item()
    assert kept == pytest.approx(0.35, abs=0.01)  # 262,144 cells: the binomial sd is 0.001
