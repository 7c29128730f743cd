"""DFD: disparity-aware feature distillation (Liu et al., ICML 2024), as reconstructed in
docs/methods/dfd.md (the paper's method section is not available; every choice below is
a config switch under ``DISTILL.DFD``).

Per level and image, over valid (unpadded) cells:

1. disparity d per cell, detached: ``mse`` (1/C sum_c (T - S~)^2), ``cos`` (1 - cosine) or
   ``rel`` (mse divided by the teacher's mean energy 1/C sum_c T^2);
2. threshold theta = the (1 - rho) quantile of d (optionally separately on GT-box cells and
   the rest); hard cells H = {d > theta}, easy E = the rest;
3. e = sum_c (T - S~)^2 per cell; strict on E: ``e``; lenient on H (``LENIENT``):
   - ``pseudo_huber``: ``e_theta + 2 kappa (sqrt(1 + (e - e_theta) / kappa) - 1)``, with
     e_theta the (1 - rho) quantile of e (= C theta for ``mse``) and kappa =
     ``KAPPA_SCALE * e_theta``, detached. Decision: the pseudo-Huber is shifted to the
     threshold so that the per-cell loss has the same value and slope on both sides of it
     (the un-shifted 2 kappa (sqrt(1 + e / kappa) - 1) jumps there); its gradient
     stays bounded for large gaps, and kappa -> infinity recovers plain imitation;
   - ``pseudo_huber_unshifted``: the un-shifted ``2 kappa (sqrt(1 + e / kappa) - 1)``
     (same kappa), which drops below the strict term at the threshold;
   - ``downweight``: ``DOWNWEIGHT * e``; ``cosine``: ``||T||^2 (1 - cos(S~, T))``;
   - ``generative``: MGD-style: ``(G(S~ * M) - T)^2`` summed over channels on hard cells, M
     MGD's random mask (``DISTILL.MGD.MASK_RATIO``);
   ``REVERSED`` swaps the roles (lenient on easy cells, strict on hard ones);
4. ``L = ALPHA / N * sum_cells valid * omega * (beta_E 1_E strict + beta_H 1_H lenient)``,
   summed over levels; omega = FG_WEIGHT / BG_WEIGHT on GT-box / other cells when stratified.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config.defaults import register_config_extension
from ..config.ranges import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    at_least,
    one_of,
    register_key_rules,
)
from ..structures import StudentTaps, TeacherOutputs
from .feature_imitation import FeatureHead, generation_block
from .masks import box_cell_masks, random_keep_mask, valid_cell_masks
from .registry import DISTILL_HEAD_REGISTRY

DISPARITIES = ("mse", "cos", "rel")
LENIENT_TYPES = ("pseudo_huber", "pseudo_huber_unshifted", "downweight", "cosine", "generative")


def disparity(student: torch.Tensor, teacher: torch.Tensor, kind: str,
              squared_error: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, H, W) per-cell disparity of (N, C, H, W) maps, detached. ``squared_error``: the
    per-cell sum of squared differences (N, H, W) when the caller already has it."""
    with torch.no_grad():
        if squared_error is None:
            squared_error = (teacher - student).pow(2).sum(dim=1)
        mse = squared_error / student.shape[1]
        if kind == "mse":
            return mse
        if kind == "cos":
            return 1.0 - F.cosine_similarity(student, teacher, dim=1)
        if kind == "rel":
            return mse / teacher.pow(2).mean(dim=1).clamp(min=1e-12)
    raise ValueError(f"DISTILL.DFD.DISPARITY={kind!r} is not one of {DISPARITIES}.")


def upper_quantile(values: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Per image: the value above which the top ``rho`` fraction of ``values[mask]`` lies.

    ``values``, ``mask``: (N, H, W). Exactly round(rho * count) masked cells are strictly
    above it when values are distinct (k-th smallest, no interpolation). Images without masked
    cells get +inf. One sort of the batch: masked-out cells are sorted last as +inf.
    """
    flat, selected = values.flatten(1), mask.flatten(1)
    count = selected.sum(dim=1)  # (N,)
    keep = count - (rho * count.double()).round().long()  # rank of the threshold, 1-based
    inf = flat.new_full((), float("inf"))  # a fill on the device, not a host-to-device copy
    ordered = torch.where(selected, flat, inf).sort(dim=1).values
    kth = ordered.gather(1, (keep - 1).clamp(min=0)[:, None])[:, 0]
    thresholds = torch.where(keep == 0, ordered[:, 0] - 1.0, kth)  # rho = 1: every cell above
    return torch.where(count == 0, inf, thresholds)  # (N,)


def shifted_pseudo_huber(e: torch.Tensor, e_theta: torch.Tensor,
                         kappa: torch.Tensor) -> torch.Tensor:
    """``e_theta + 2 kappa (sqrt(1 + (e - e_theta) / kappa) - 1)``: value e_theta and slope 1
    at e = e_theta, sqrt growth beyond. Evaluated as ``e_theta + 2 x / (sqrt(1 + x / kappa) + 1)``
    (x = e - e_theta), which is exact for any kappa, including huge ones."""
    x = e - e_theta
    return e_theta + 2.0 * x / (torch.sqrt((1.0 + x / kappa).clamp(min=0.0)) + 1.0)


@DISTILL_HEAD_REGISTRY.register()
class DFDHead(FeatureHead):
    """Disparity-aware feature distillation (Liu et al., ICML 2024), d2kd's reconstruction
    (docs/methods/dfd.md; every choice a ``DISTILL.DFD`` key, see the module docstring).

    Inputs per distilled level: student map S (N, C_s, H_s, W_s), teacher map T (N, C, H, W);
    S~ = A(S) (N, C, H, W) after the 1x1 adapter (channels differ) and bilinear resize
    (strides differ). Per image, over valid (unpadded) cells only:

    - disparity d (N, H, W), detached: ``mse`` d = (1/C) sum_c (T - S~)^2 (or ``cos``,
      ``rel``);
    - theta = the (1 - rho) quantile of d per image (and stratum when ``FG_BG_STRATIFIED``);
      hard cells H = {d > theta}, easy cells E = the other valid cells;
    - e = sum_c (T - S~)^2 (N, H, W); strict phi_S(e) = e; lenient (default
      ``pseudo_huber``) ``phi_L(e) = e_theta + 2 kappa (sqrt(1 + (e - e_theta) / kappa) - 1)``
      with e_theta the (1 - rho) quantile of e and kappa = KAPPA_SCALE * e_theta, detached;
    - ``L = sum_l (ALPHA / N) sum_{n,h,w} omega (BETA_EASY 1_E phi_S(e)
      + BETA_HARD 1_H phi_L(e))`` (``REVERSED``: phi_L on E, phi_S on H), omega = FG_WEIGHT /
      BG_WEIGHT on GT-box / other cells when stratified, else 1.

    Returns ``loss_kd_dfd_feat`` (0-dim). Logs ``kd/dfd/loss/<level>`` every step and, every
    ``STATS_PERIOD`` iterations, ``kd/dfd/{hard_fraction,d_easy,d_hard,theta}/<level>``.
    With ``LENIENT`` "generative" it owns MGD generators (C -> C) per level.
    """

    name = "dfd"

    @configurable
    def __init__(self, *, alpha: float, hard_fraction: float, disparity: str, lenient: str,
                 reversed: bool, kappa_scale: float, downweight: float, beta_easy: float,
                 beta_hard: float, fg_bg_stratified: bool, fg_weight: float, bg_weight: float,
                 stats_period: int, mask_ratio: float, **feature_head):
        """Arguments: the ``DISTILL.DFD`` keys in lower case (see d2kd/config/defaults.py);
        ``mask_ratio``: MGD's mask ratio, for ``lenient="generative"``."""
        super().__init__(**feature_head)
        self.alpha = alpha
        self.hard_fraction = hard_fraction
        self.disparity = disparity
        self.lenient = lenient
        self.reversed = reversed
        self.kappa_scale = kappa_scale
        self.downweight = downweight
        self.beta_easy, self.beta_hard = beta_easy, beta_hard
        self.fg_bg_stratified = fg_bg_stratified
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.stats_period = stats_period
        if self.disparity not in DISPARITIES:
            raise ValueError(f"DISTILL.DFD.DISPARITY={self.disparity!r} is not one of "
                             f"{DISPARITIES}.")
        if self.lenient not in LENIENT_TYPES:
            raise ValueError(f"DISTILL.DFD.LENIENT={self.lenient!r} is not one of {LENIENT_TYPES}.")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"DISTILL.DFD.HARD_FRACTION={self.hard_fraction} must lie in [0, 1].")
        self.mask_ratio = mask_ratio
        self.generators = nn.ModuleDict()
        if self.lenient == "generative":
            teacher_shapes = feature_head["teacher_shapes"]
            self.generators.update(
                {l: generation_block(teacher_shapes[l].channels) for l in self.levels})

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        dfd = cfg.DISTILL.DFD
        keys = ("ALPHA", "HARD_FRACTION", "DISPARITY", "LENIENT", "REVERSED", "KAPPA_SCALE",
                "DOWNWEIGHT", "BETA_EASY", "BETA_HARD", "FG_BG_STRATIFIED", "FG_WEIGHT",
                "BG_WEIGHT", "STATS_PERIOD")
        return {**cls.feature_args(cfg, student_shapes, teacher_shapes),
                **{key.lower(): dfd[key] for key in keys},
                "mask_ratio": cfg.DISTILL.MGD.MASK_RATIO}

    def threshold(self, values: torch.Tensor, valid: torch.Tensor,
                  fg: torch.Tensor) -> torch.Tensor:
        """(N, H, W): each valid cell's (1 - rho) quantile of ``values`` over its image (and
        stratum, when stratified); 0 on padded cells."""
        strata = [valid & fg, valid & ~fg] if self.fg_bg_stratified else [valid]
        theta = torch.zeros_like(values)
        for stratum in strata:
            q = upper_quantile(values, stratum, self.hard_fraction)[:, None, None].expand_as(values)
            theta = torch.where(stratum, q, theta)
        return theta

    def partition(self, d: torch.Tensor, valid: torch.Tensor,
                  fg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Hard-cell mask (N, H, W) and per-cell threshold theta (N, H, W)."""
        theta = self.threshold(d, valid, fg)
        return valid & (d > theta), theta

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        per_level, stats = {}, {}
        for level in self.levels:
            s, t = aligned[level], teacher.features[level]
            stride = self.strides[level]
            valid = valid_cell_masks(student.images.image_sizes, t.shape, stride, t.device)[:, 0]
            fg = box_cell_masks(student.gt_instances, t.shape, stride)[:, 0].bool()
            e = (t - s).pow(2).sum(dim=1)  # (N, H, W)
            d = disparity(s, t, self.disparity, squared_error=e.detach())
            hard, theta = self.partition(d, valid, fg)
            easy = valid & ~hard
            strict_cells, lenient_cells = (hard, easy) if self.reversed else (easy, hard)
            omega = (torch.where(fg, self.fg_weight, self.bg_weight) if self.fg_bg_stratified
                     else 1.0)
            strict = e * strict_cells
            lenient = self.lenient_loss(level, s, t, e, valid, fg) * lenient_cells
            beta_strict = self.beta_hard if self.reversed else self.beta_easy
            beta_lenient = self.beta_easy if self.reversed else self.beta_hard
            total = (omega * (beta_strict * strict + beta_lenient * lenient)).sum()
            per_level[level] = self.alpha * total / s.shape[0]
            stats[level] = (hard, easy, valid, d, theta)
        self.log("loss", per_level)
        self._log_stats(stats)
        return {"loss_kd_dfd_feat": sum(per_level.values())}

    def lenient_loss(self, level: str, s: torch.Tensor, t: torch.Tensor, e: torch.Tensor,
                     valid: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        """(N, H, W) lenient per-cell loss (see module docstring)."""
        if self.lenient.startswith("pseudo_huber"):
            with torch.no_grad():
                e_theta = self.threshold(e, valid, fg)
                e_theta = torch.nan_to_num(e_theta, posinf=0.0).clamp(min=1e-12)
                kappa = self.kappa_scale * e_theta
            if self.lenient == "pseudo_huber_unshifted":
                return shifted_pseudo_huber(e, torch.zeros_like(e_theta), kappa)
            return shifted_pseudo_huber(e, e_theta, kappa)
        if self.lenient == "downweight":
            return self.downweight * e
        if self.lenient == "cosine":
            return t.pow(2).sum(dim=1) * (1.0 - F.cosine_similarity(s, t, dim=1))
        generated = self.generators[level](s * random_keep_mask(s, self.mask_ratio))
        return (generated - t).pow(2).sum(dim=1)

    def _log_stats(self, stats) -> None:
        """Every ``STATS_PERIOD`` steps, per level: the hard fraction of valid cells, the mean
        disparity of easy and of hard cells (0 without such cells) and the mean threshold over
        valid cells. Masked means on the device: nothing is read back here."""
        if self.stats_period <= 0 or get_event_storage().iter % self.stats_period:
            return
        with torch.no_grad():
            for term, index in (("hard_fraction", 0), ("d_easy", 1), ("d_hard", 2),
                                ("theta", 3)):
                self.log(term, {level: _stats(*values)[index]
                                for level, values in stats.items()})


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shapes), 0 for an empty mask."""
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp(min=1)


def _stats(hard, easy, valid, d, theta):
    """(hard fraction, mean d on easy cells, mean d on hard cells, mean theta on valid cells)."""
    return (hard.sum() / valid.sum().clamp(min=1), _masked_mean(d, easy),
            _masked_mean(d, hard), _masked_mean(theta, valid))


@register_config_extension
def add_dfd_config(cfg: CfgNode) -> None:
    """``DISTILL.DFD``: :class:`DFDHead`."""
    if "DFD" in cfg.DISTILL:
        return
    # DFD: disparity-aware feature distillation (d2kd/heads/dfd.py, docs/methods/dfd.md).
    cfg.DISTILL.DFD = CfgNode()
    # alpha: the loss is (alpha / N) * sum over cells of the per-cell constraint (MGD-like scale;
    # 2e-5 for one-stage, 5e-7 for two-stage detectors as starting points).
    cfg.DISTILL.DFD.ALPHA = 2e-5
    # rho: fraction of valid cells per image and level treated as hard (largest disparity).
    cfg.DISTILL.DFD.HARD_FRACTION = 0.3
    # Per-cell disparity that ranks cells: "mse", "cos" (1 - cosine) or "rel"
    # (mse / teacher energy).
    cfg.DISTILL.DFD.DISPARITY = "mse"
    # Constraint on hard cells: "pseudo_huber" (shifted to the threshold: continuous value and
    # slope), "pseudo_huber_unshifted" (the unshifted form), "downweight", "cosine" or
    # "generative".
    cfg.DISTILL.DFD.LENIENT = "pseudo_huber"
    # Ablation: lenient on easy cells and strict on hard ones.
    cfg.DISTILL.DFD.REVERSED = False
    # kappa = KAPPA_SCALE * e_theta, the pseudo-Huber scale (larger: closer to plain MSE).
    cfg.DISTILL.DFD.KAPPA_SCALE = 1.0
    # Factor on hard cells for LENIENT = "downweight".
    cfg.DISTILL.DFD.DOWNWEIGHT = 0.5
    # beta_E, beta_H: weights of the easy-cell and hard-cell terms.
    cfg.DISTILL.DFD.BETA_EASY = 1.0
    cfg.DISTILL.DFD.BETA_HARD = 1.0
    # Separate thresholds (and weights below) on GT-box cells and on the other cells.
    cfg.DISTILL.DFD.FG_BG_STRATIFIED = False
    # omega on GT-box cells and on the other cells when FG_BG_STRATIFIED (FGD's 2 : 1).
    cfg.DISTILL.DFD.FG_WEIGHT = 2.0
    cfg.DISTILL.DFD.BG_WEIGHT = 1.0
    # Log hard fraction, mean disparity on easy/hard cells and theta every N iterations.
    cfg.DISTILL.DFD.STATS_PERIOD = 20


register_key_rules({
    "DISTILL.DFD.HARD_FRACTION": UNIT_INTERVAL,
    "DISTILL.DFD.DISPARITY": one_of("mse", "cos", "rel"),
    "DISTILL.DFD.LENIENT": one_of("pseudo_huber", "pseudo_huber_unshifted", "downweight",
                                  "cosine", "generative"),
    "DISTILL.DFD.KAPPA_SCALE": POSITIVE,
    "DISTILL.DFD.DOWNWEIGHT": NON_NEGATIVE,
    "DISTILL.DFD.BETA_EASY": NON_NEGATIVE,
    "DISTILL.DFD.BETA_HARD": NON_NEGATIVE,
    "DISTILL.DFD.STATS_PERIOD": at_least(1),
})
