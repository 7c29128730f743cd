"""FGD: focal and global knowledge distillation (Yang et al., CVPR 2022), as the authors'
released ``FeatureLoss`` computes it (yzd-v/FGD, mmdet/distillation/losses/fgd.py;
docs/methods/baselines.md, FGD).

Per distilled level, with S~ = A(S) the aligned student map and T the teacher's (N, C, H, W):

- attention of a map F: spatial ``A^S = H W softmax_{hw}(mean_c |F| / temperature)``
  (N, 1, H, W) and channel ``A^C = C softmax_c(mean_{hw} |F| / temperature)`` (N, C, 1, 1);
- masks from the GT boxes on the level's grid: ``M`` (each box's cells carry 1 / its cell
  count, max over overlapping boxes) and ``B`` (the other cells, 1 / their count per image);
- focal terms ``sum_{n,c,h,w} {M, B} A^S_T A^C_T (S~ - T)^2 / N`` (the teacher's attention);
- attention term ``(sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T|) / N``;
- global term ``sum (GC_s(S~) - GC_t(T))^2 / N`` with a learnable GcBlock per side;

weighted by alpha, beta, gamma and lambda and summed over levels.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from torch import nn

from ..config.defaults import register_config_extension
from ..config.ranges import NON_NEGATIVE, POSITIVE, one_of, register_key_rules
from ..structures import StudentTaps, TeacherOutputs
from .feature_imitation import FeatureHead
from .masks import BOX_MAPPINGS, focal_masks, grid_boxes
from .registry import DISTILL_HEAD_REGISTRY


def attention_maps(x: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's attention of ``x`` (N, C, H, W): spatial (N, 1, H, W) and channel (N, C, 1, 1).

    ``A^S = H W softmax_{hw}(mean_c |x| / temperature)``,
    ``A^C = C softmax_c(mean_{hw} |x| / temperature)``; each has mean 1 per image.
    """
    n, c, h, w = x.shape
    magnitude = x.abs()
    spatial = F.softmax(magnitude.mean(dim=1).flatten(1) / temperature, dim=1)
    channel = F.softmax(magnitude.mean(dim=(2, 3)) / temperature, dim=1)
    return (h * w) * spatial.view(n, 1, h, w), c * channel.view(n, c, 1, 1)


class GlobalContextBlock(nn.Module):
    """The GcBlock of FGD's global term: ``x + transform(context(x))``.

    context: a 1x1 conv C -> 1, softmax over the H W cells, the weighted sum of x's cells
    (N, C, 1, 1); transform: 1x1 conv C -> C/2, LayerNorm over (C/2, 1, 1), ReLU, 1x1 conv
    C/2 -> C. Initialised as the authors': the context conv Kaiming-normal (fan-in, bias 0),
    the last conv zero, so the block starts as the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.context_mask = nn.Conv2d(channels, 1, kernel_size=1)
        hidden = channels // 2
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, 1): x's cells averaged with softmax(conv(x)) weights."""
        n, c, h, w = x.shape
        weights = F.softmax(self.context_mask(x).view(n, 1, h * w), dim=2)  # (N, 1, HW)
        return torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        return x + self.transform(self.context(x))


@DISTILL_HEAD_REGISTRY.register()
class FGDHead(FeatureHead):
    """Focal and global distillation (Yang et al., CVPR 2022), the authors' ``FeatureLoss``.

    Inputs per distilled level: student map S (N, C_s, H_s, W_s), teacher map T (N, C, H, W);
    S~ = A(S) (N, C, H, W) after the 1x1 adapter (channels differ) and bilinear resize
    (strides differ). With the teacher's attention A^S_T (N, 1, H, W), A^C_T (N, C, 1, 1)
    (:func:`attention_maps`), the student's A^S_S, A^C_S, and the masks M, B (N, 1, H, W) of
    :func:`focal_masks`:

    - ``fg = alpha / N * sum M A^S_T A^C_T (S~ - T)^2``, ``bg`` the same with beta and B;
    - ``attention = gamma / N * (sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T|)``;
    - ``global = lambda / N * sum (GC_s(S~) - GC_t(T))^2``, two :class:`GlobalContextBlock`
      (C channels) per level, both learnable.

    Returns ``loss_kd_fgd_{fg,bg,attention,global}`` (0-dim, sums over levels); logs
    ``kd/fgd/<term>/<level>``. Reference: docs/methods/baselines.md (FGD).
    """

    name = "fgd"

    @configurable
    def __init__(self, *, alpha: float = 1e-3, beta: float = 5e-4, gamma: float = 5e-4,
                 lambda_: float = 5e-6, temperature: float = 0.5,
                 box_mapping: str = "image_size", **feature_head):
        """Arguments: the ``DISTILL.FGD`` keys in lower case (``lambda_`` for LAMBDA)."""
        super().__init__(**feature_head)
        if box_mapping not in BOX_MAPPINGS:
            raise ValueError(f"DISTILL.FGD.BOX_MAPPING={box_mapping!r} is not one of "
                             f"{BOX_MAPPINGS}.")
        self.weights = {"fg": alpha, "bg": beta, "attention": gamma, "global": lambda_}
        self.temperature = temperature
        self.box_mapping = box_mapping
        teacher_shapes = feature_head["teacher_shapes"]
        self.student_context = nn.ModuleDict(
            {l: GlobalContextBlock(teacher_shapes[l].channels) for l in self.levels})
        self.teacher_context = nn.ModuleDict(
            {l: GlobalContextBlock(teacher_shapes[l].channels) for l in self.levels})

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        fgd = cfg.DISTILL.FGD
        return {**cls.feature_args(cfg, student_shapes, teacher_shapes),
                "alpha": fgd.ALPHA, "beta": fgd.BETA, "gamma": fgd.GAMMA, "lambda_": fgd.LAMBDA,
                "temperature": fgd.TEMPERATURE, "box_mapping": fgd.BOX_MAPPING}

    def level_terms(self, level: str, s: torch.Tensor, t: torch.Tensor,
                    fg: torch.Tensor, bg: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The four unweighted terms of one level, each summed and divided by N.

        ``s``: S~ (N, C, H, W); ``t``: T (N, C, H, W); ``fg``, ``bg``: (N, 1, H, W)."""
        n = s.shape[0]
        spatial_t, channel_t = attention_maps(t, self.temperature)
        spatial_s, channel_s = attention_maps(s, self.temperature)
        cell_error = ((s - t).pow(2) * channel_t).sum(dim=1, keepdim=True) * spatial_t
        attention = (channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()
        relation = self.student_context[level](s) - self.teacher_context[level](t)
        return {"fg": (cell_error * fg).sum() / n, "bg": (cell_error * bg).sum() / n,
                "attention": attention / n, "global": relation.pow(2).sum() / n}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        terms: Dict[str, Dict[str, torch.Tensor]] = {term: {} for term in self.weights}
        for level in self.levels:
            t = teacher.features[level]
            boxes, images = grid_boxes(student.gt_instances, student.images.image_sizes,
                                       t.shape[-2:], self.strides[level], self.box_mapping)
            fg, bg = focal_masks(boxes, images, t.shape, t.dtype)
            for term, value in self.level_terms(level, aligned[level], t, fg, bg).items():
                terms[term][level] = self.weights[term] * value
        for term, per_level in terms.items():
            self.log(term, per_level)
        return {f"loss_kd_fgd_{term}": sum(per_level.values()) for term, per_level in terms.items()}


@register_config_extension
def add_fgd_config(cfg: CfgNode) -> None:
    """``DISTILL.FGD``: :class:`FGDHead`."""
    if "FGD" in cfg.DISTILL:
        return
    # FGD (focal and global distillation), see docs/methods/baselines.md. Defaults: the
    # authors' RetinaNet configs; their two-stage (Faster / Mask R-CNN) configs use
    # ALPHA 5e-5, BETA 2.5e-5, GAMMA 5e-5, LAMBDA 5e-7.
    cfg.DISTILL.FGD = CfgNode()
    # alpha: weight of the foreground term sum(M A^S A^C (A(S) - T)^2) / N.
    cfg.DISTILL.FGD.ALPHA = 1e-3
    # beta: weight of the background term (the same on the other cells).
    cfg.DISTILL.FGD.BETA = 5e-4
    # gamma: weight of the attention term (L1 between student and teacher attention) / N.
    cfg.DISTILL.FGD.GAMMA = 5e-4
    # lambda: weight of the global term sum(GcBlock_s(A(S)) - GcBlock_t(T))^2 / N.
    cfg.DISTILL.FGD.LAMBDA = 5e-6
    # Temperature of the spatial and channel attention softmaxes.
    cfg.DISTILL.FGD.TEMPERATURE = 0.5
    # GT boxes onto a level's grid: "image_size" (the authors': coordinates x W / image width
    # before padding, so a padded batch stretches boxes) or "stride" (coordinates / stride).
    cfg.DISTILL.FGD.BOX_MAPPING = "image_size"


register_key_rules({
    "DISTILL.FGD.ALPHA": NON_NEGATIVE,
    "DISTILL.FGD.BETA": NON_NEGATIVE,
    "DISTILL.FGD.GAMMA": NON_NEGATIVE,
    "DISTILL.FGD.LAMBDA": NON_NEGATIVE,
    "DISTILL.FGD.TEMPERATURE": POSITIVE,
    "DISTILL.FGD.BOX_MAPPING": one_of(*BOX_MAPPINGS),
})
