"""DetKDS search space: transform ops (three slots) and distances, as registries.

Every op maps a tensor to a tensor and is applied identically and independently to the
student and the teacher tensor; a formula is ``distance(slot3(slot2(slot1(S))),
slot3(slot2(slot1(T))))``. Ops take (N, C, H, W) maps; slot-3 ops may reshape to
(N, C*H*W) (``batch``) or (N, C, H*W) (``channel``). Third-party ops and distances register
with ``SLOT_OPS[slot].register(name)`` / ``DISTANCES.register(name)`` (d2kd.heads.detkds.registry).
"""
import math

import torch
import torch.nn.functional as F

from ..masks import random_keep_mask
from .registry import DISTANCES, SLOT_OPS

TAU = 0.5  # attention temperature of slot 1
MASK_RATIO = 0.65  # fraction of positions dropped by slot-1 "mask"


# ---- slot 1: attention / masking -------------------------------------------------------
@SLOT_OPS[1].register("no")
@SLOT_OPS[2].register("no")
@SLOT_OPS[3].register("no")
def identity(x: torch.Tensor, **_) -> torch.Tensor:
    return x


def _sqrt_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """sqrt(softmax(logits)) as exp(log_softmax / 2): where softmax underflows to 0, sqrt's
    gradient would be infinite (and the step NaN); this form stays finite."""
    return torch.exp(0.5 * torch.log_softmax(logits, dim=dim))


@SLOT_OPS[1].register("satt")
def spatial_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """F * sqrt(HW * softmax_HW(mean_c |F| / tau))."""
    n, _, h, w = x.shape
    a = _sqrt_softmax(x.abs().mean(dim=1).flatten(1) / TAU, dim=1).view(n, 1, h, w)
    return x * math.sqrt(h * w) * a


@SLOT_OPS[1].register("catt")
def channel_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """F * sqrt(C * softmax_C(mean_HW |F| / tau))."""
    c = x.shape[1]
    g = _sqrt_softmax(x.abs().mean(dim=(2, 3)) / TAU, dim=1)[:, :, None, None]
    return x * math.sqrt(c) * g


@SLOT_OPS[1].register("natt")
def batch_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """F * N * softmax over the batch axis of mean_CHW |F| / tau."""
    n = x.shape[0]
    a = torch.softmax(x.abs().mean(dim=(1, 2, 3)) / TAU, dim=0)[:, None, None, None]
    return x * n * a


@SLOT_OPS[1].register("mask")
def random_mask(x: torch.Tensor, mask: torch.Tensor = None, **_) -> torch.Tensor:
    """Zero a random 65 % of the positions; ``mask`` (N, 1, H, W), shared by student and
    teacher, is drawn by the caller (see :func:`draw_mask`)."""
    return x * mask


def draw_mask(x: torch.Tensor) -> torch.Tensor:
    return random_keep_mask(x, MASK_RATIO)


# ---- slot 2: scale / locality ----------------------------------------------------------
def _pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % p, 0, (-h) % p))


@SLOT_OPS[2].register("scale_r1")
def scale_r1(x: torch.Tensor, **_) -> torch.Tensor:
    return x


@SLOT_OPS[2].register("scale_r2")
def scale_r2(x: torch.Tensor, **_) -> torch.Tensor:
    return F.max_pool2d(_pad_to_multiple(x, 2), 2)


@SLOT_OPS[2].register("scale_r4")
def scale_r4(x: torch.Tensor, **_) -> torch.Tensor:
    return F.max_pool2d(_pad_to_multiple(x, 4), 4)


def _local(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut into p x p patches, patch index into the channel axis: (N, C*p*p, H/p, W/p)."""
    x = _pad_to_multiple(x, p)
    n, c, h, w = x.shape
    x = x.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * p * p, h // p, w // p)


@SLOT_OPS[2].register("local_s1")
def local_s1(x: torch.Tensor, **_) -> torch.Tensor:
    return x


@SLOT_OPS[2].register("local_s2")
def local_s2(x: torch.Tensor, **_) -> torch.Tensor:
    return _local(x, 2)


@SLOT_OPS[2].register("local_s4")
def local_s4(x: torch.Tensor, **_) -> torch.Tensor:
    return _local(x, 4)


@SLOT_OPS[2].register("affine")
def affine(x: torch.Tensor, **_) -> torch.Tensor:
    return (x + 1) / 2


# ---- slot 3: normalise / reshape -------------------------------------------------------
@SLOT_OPS[3].register("batch")
def to_batch(x: torch.Tensor, **_) -> torch.Tensor:
    return x.flatten(1)  # (N, C*H*W)


@SLOT_OPS[3].register("channel")
def to_channel(x: torch.Tensor, **_) -> torch.Tensor:
    return x.flatten(2)  # (N, C, H*W)


_AXES = {"N": (0,), "C": (1,), "HW": (2, 3)}


def _over(axis: str, fn):
    def op(x: torch.Tensor, **_) -> torch.Tensor:
        dims = _AXES[axis]
        if len(dims) == 1:
            return fn(x, dims[0])
        n, c, h, w = x.shape
        return fn(x.flatten(2), 2).view(n, c, h, w)
    return op


for _axis in ("N", "C", "HW"):
    SLOT_OPS[3].register(f"norm_{_axis}")(_over(_axis, lambda x, d: F.normalize(x, dim=d)))
    SLOT_OPS[3].register(f"softmax_{_axis}")(_over(_axis, lambda x, d: torch.softmax(x, dim=d)))
    SLOT_OPS[3].register(f"logsoftmax_{_axis}")(
        _over(_axis, lambda x, d: torch.log_softmax(x, dim=d)))

#: slot-3 ops whose output is a distribution (``kl`` needs one), with its axis.
DISTRIBUTION_OPS = {f"{kind}_{axis}": axis for kind in ("softmax", "logsoftmax")
                    for axis in ("N", "C", "HW")}


@SLOT_OPS[3].register("min_max")
def min_max(x: torch.Tensor, **_) -> torch.Tensor:
    """Per sample, rescale to [0, 1]."""
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).view_as(x)


@SLOT_OPS[3].register("batchnorm")
def batch_standardise(x: torch.Tensor, **_) -> torch.Tensor:
    """Per channel, standardise with the batch's statistics (no parameters)."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


# ---- distances (mean over elements unless stated) --------------------------------------
@DISTANCES.register("l1")
def l1(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return (s - t).abs().mean()


@DISTANCES.register("l2")
def l2(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return (s - t).pow(2).mean()


@DISTANCES.register("smooth_l1")
def smooth_l1(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return F.smooth_l1_loss(s, t, beta=1.0)


@DISTANCES.register("kl")
def kl(s: torch.Tensor, t: torch.Tensor, axis: str = "C", log_inputs: bool = False,
       **_) -> torch.Tensor:
    """KL(t || s) between distributions along ``axis``, averaged over the other positions.

    Inputs are probabilities (``softmax_*`` slot 3) or log-probabilities (``logsoftmax_*``).
    """
    log_s, log_t = (s, t) if log_inputs else (s.clamp(min=1e-12).log(), t.clamp(min=1e-12).log())
    if axis == "HW" and s.dim() == 4:
        log_s, log_t = log_s.flatten(2), log_t.flatten(2)
    dim = {"N": 0, "C": 1, "HW": 2}[axis]
    per_position = (log_t.exp() * (log_t - log_s)).sum(dim=dim)
    return per_position.mean()


@DISTANCES.register("cos")
def cosine_distance(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """1 - cosine similarity of the per-sample flattened tensors, averaged over the batch."""
    return (1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


@DISTANCES.register("pearson")
def pearson(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """1 - Pearson correlation (cosine of centred vectors) per sample, averaged."""
    s, t = s.flatten(1), t.flatten(1)
    return cosine_distance(s - s.mean(dim=1, keepdim=True), t - t.mean(dim=1, keepdim=True))


@DISTANCES.register("correlation")
def correlation(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """Cross-correlation loss of batch-standardised features: mean (1 - diag)^2 + off-diag^2
    / D^2 of the (D, D) correlation matrix C = S^T T / N between student and teacher features
    (N, D); batch >= 4.

    C is never materialised (D = C*H*W of a feature map: a P3 map of 128 x 18 x 24 would need
    12 GB): its diagonal is sum_n s_n * t_n / N and its squared Frobenius norm equals
    sum(G_S * G_T) / N^2 with the (N, N) Gram matrices G_S = S S^T, G_T = T T^T.
    """
    s, t = s.flatten(1), t.flatten(1)
    n, d = s.shape
    s = (s - s.mean(0)) / s.std(0).clamp(min=1e-6)
    t = (t - t.mean(0)) / t.std(0).clamp(min=1e-6)
    diagonal = (s * t).sum(0) / n  # (D,)
    frobenius_sq = ((s @ s.t()) * (t @ t.t())).sum() / n ** 2
    on = (diagonal - 1).pow(2).mean()
    off = (frobenius_sq - diagonal.pow(2).sum()) / d ** 2
    return on + off
