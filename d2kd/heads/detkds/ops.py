"""DetKDS search space: transform ops (three slots) and distances, as registries.

Every op maps a tensor to a tensor and is applied identically and independently to the
student and the teacher tensor; a formula is ``distance(slot3(slot2(slot1(S))),
slot3(slot2(slot1(T))))``. Ops take (N, C, H, W) maps; slot 2 may change the layout
(``local_s*``: (N, C*H/p*W/p, p, p)), slot 3 may reshape to (N, C*H*W) (``batch``) or
(N, C, H*W) (``channel``).

The ops and distances registered with ``paper=True`` compute what the authors' release
computes (lliai/DetKDS, mmdet/distillation/losses/operations.py, commit a7d2127f; checked by
tests/heads/detkds/test_ops_fidelity.py), except the two decisions of docs/methods/detkds.md
(``cos`` is 1 - cosine, ``kl`` a true KL). The others are d2kd's variants, each a token of its own
(docs/methods/detkds.md, "d2kd's variants"). Third-party ops and distances register with
``SLOT_OPS[slot].register(name)`` / ``DISTANCES.register(name)`` (d2kd.heads.detkds.registry).
"""
import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from ..masks import random_keep_mask
from .registry import DISTANCES, SLOT_OPS

TAU = 0.5  # attention temperature of slot 1
MASK_RATIO = 0.65  # fraction of positions dropped by slot-1 "mask"
MIN_MAX_EPS = 1e-9  # added to max - min by "min_max" (the release's)
PEARSON_EPS = 1e-8  # added to the product of the norms by "pearson" (the release's)
CORRELATION_ALPHA = 1.01  # "correlation" raises |C_ii - 1|^2 to this power (the release's)
STD_FLOOR = 1e-6  # floor of the batch standard deviation of the correlation distances
#: slot-1 ops whose random mask is drawn once for student and teacher (the caller passes it)
SHARED_MASK_OPS = ("mask_shared",)
#: the smallest batch each distance needs (batch statistics)
MIN_BATCH = {"correlation": 2, "correlation_full": 4}


# ---- slot 1: attention / masking -------------------------------------------------------
@SLOT_OPS[1].register("no", paper=True)
@SLOT_OPS[2].register("no", paper=True)
@SLOT_OPS[3].register("no", paper=True)
def identity(x: torch.Tensor, **_) -> torch.Tensor:
    return x


def _sqrt_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """sqrt(softmax(logits)) as exp(log_softmax / 2): where softmax underflows to 0, sqrt's
    gradient would be infinite (and the step NaN); this form stays finite."""
    return torch.exp(0.5 * torch.log_softmax(logits, dim=dim))


@SLOT_OPS[1].register("satt", paper=True)
def spatial_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """F * sqrt(HW * softmax_HW(mean_c |F| / tau))."""
    n, _, h, w = x.shape
    a = _sqrt_softmax(x.abs().mean(dim=1).flatten(1) / TAU, dim=1).view(n, 1, h, w)
    return x * math.sqrt(h * w) * a


@SLOT_OPS[1].register("catt", paper=True)
def channel_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """F * sqrt(C * softmax_C(mean_HW |F| / tau))."""
    c = x.shape[1]
    g = _sqrt_softmax(x.abs().mean(dim=(2, 3)) / TAU, dim=1)[:, :, None, None]
    return x * math.sqrt(c) * g


@SLOT_OPS[1].register("natt", paper=True)
def batch_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """N * softmax_N(F / tau), elementwise: each value becomes its attention weight over the
    batch (the release's; F's values themselves are not kept)."""
    return x.shape[0] * torch.softmax(x / TAU, dim=0)


@SLOT_OPS[1].register("natt_pooled")
def pooled_batch_attention(x: torch.Tensor, **_) -> torch.Tensor:
    """d2kd's variant: F * N * softmax_N(mean_CHW |F| / tau), one weight per sample that
    scales F (the pattern of ``satt`` / ``catt`` on the batch axis)."""
    n = x.shape[0]
    a = torch.softmax(x.abs().mean(dim=(1, 2, 3)) / TAU, dim=0)[:, None, None, None]
    return x * n * a


@SLOT_OPS[1].register("mask", paper=True)
@SLOT_OPS[1].register("mask_shared")
def random_mask(x: torch.Tensor, mask: torch.Tensor = None, **_) -> torch.Tensor:
    """Zero a random 65 % of the positions: x * mask with ``mask`` (N, 1, H, W) drawn here
    (:func:`draw_mask`) unless given. ``mask`` draws one per tensor, so student and teacher
    lose different positions (the release); for ``mask_shared`` (d2kd's variant) the caller
    draws one and passes it to both (:data:`SHARED_MASK_OPS`)."""
    return x * (draw_mask(x) if mask is None else mask)


def draw_mask(x: torch.Tensor) -> torch.Tensor:
    return random_keep_mask(x, MASK_RATIO)


# ---- slot 2: scale / locality ----------------------------------------------------------
def _pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    """Zeros on the right and at the bottom up to a multiple of p (the release's padding)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % p, 0, (-h) % p))


def _max_pool(x: torch.Tensor, p: int) -> torch.Tensor:
    """p x p max-pool: (N, C, ceil(H/p), ceil(W/p))."""
    return F.max_pool2d(_pad_to_multiple(x, p), p)


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """p x p patches, each kept spatial, the patch grid moved into the channel axis:
    (N, C, H, W) -> (N, C*H'*W', p, p) with H' = ceil(H/p), W' = ceil(W/p); channel
    c*H'*W' + i*W' + j holds patch (i, j) of channel c (the release's ``local_s<p>``)."""
    x = _pad_to_multiple(x, p)
    n, c, h, w = x.shape
    x = x.view(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(n, c * (h // p) * (w // p), p, p)


def _space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """d2kd's variant: the p x p offsets moved into the channel axis, the patch grid kept
    spatial: (N, C, H, W) -> (N, C*p*p, H', W'); channel c*p*p + u*p + v holds offset (u, v)."""
    x = _pad_to_multiple(x, p)
    n, c, h, w = x.shape
    x = x.view(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * p * p, h // p, w // p)


def _sized(fn: Callable[[torch.Tensor, int], torch.Tensor], p: int):
    def op(x: torch.Tensor, **_) -> torch.Tensor:
        return fn(x, p)
    op.__doc__ = f"{fn.__name__} with p = {p}."
    return op


for _p in (1, 2, 4):
    SLOT_OPS[2].register(f"scale_r{_p}", paper=True)(_sized(_max_pool, _p))
    SLOT_OPS[2].register(f"local_s{_p}", paper=True)(_sized(_patches, _p))
for _p in (2, 4):
    SLOT_OPS[2].register(f"s2d_s{_p}")(_sized(_space_to_depth, _p))


@SLOT_OPS[2].register("affine", paper=True)
def affine(x: torch.Tensor, **_) -> torch.Tensor:
    return (x + 1) / 2


# ---- slot 3: normalise / reshape -------------------------------------------------------
@SLOT_OPS[3].register("batch", paper=True)
def to_batch(x: torch.Tensor, **_) -> torch.Tensor:
    return x.flatten(1)  # (N, C*H*W)


@SLOT_OPS[3].register("channel", paper=True)
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
    SLOT_OPS[3].register(f"norm_{_axis}", paper=True)(
        _over(_axis, lambda x, d: F.normalize(x, dim=d)))
    SLOT_OPS[3].register(f"softmax_{_axis}", paper=True)(
        _over(_axis, lambda x, d: torch.softmax(x, dim=d)))
    SLOT_OPS[3].register(f"logsoftmax_{_axis}", paper=True)(
        _over(_axis, lambda x, d: torch.log_softmax(x, dim=d)))

#: slot-3 ops whose output is a distribution (``kl`` needs one), with its axis.
DISTRIBUTION_OPS = {f"{kind}_{axis}": axis for kind in ("softmax", "logsoftmax")
                    for axis in ("N", "C", "HW")}


def _min_max(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """(x - min) / (max - min + 1e-9), min and max over ``dims``."""
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo + MIN_MAX_EPS)


@SLOT_OPS[3].register("min_max", paper=True)
def min_max(x: torch.Tensor, **_) -> torch.Tensor:
    """Rescale to [0, 1] with the minimum and maximum of the whole batch tensor (the
    release's)."""
    return _min_max(x, tuple(range(x.dim())))


@SLOT_OPS[3].register("min_max_sample")
def min_max_sample(x: torch.Tensor, **_) -> torch.Tensor:
    """d2kd's variant: rescale each sample to [0, 1] with its own minimum and maximum."""
    return _min_max(x, tuple(range(1, x.dim())))


@SLOT_OPS[3].register("batchnorm", paper=True)
def batch_standardise(x: torch.Tensor, **_) -> torch.Tensor:
    """Per channel, standardise with the batch's statistics (no parameters)."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


# ---- distances (mean over elements unless stated) --------------------------------------
@DISTANCES.register("l1", paper=True)
def l1(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return (s - t).abs().mean()


@DISTANCES.register("l2", paper=True)
def l2(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return (s - t).pow(2).mean()


@DISTANCES.register("smooth_l1", paper=True)
def smooth_l1(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    return F.smooth_l1_loss(s, t, beta=1.0)


@DISTANCES.register("kl", paper=True)
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


@DISTANCES.register("cos", paper=True)
def cosine_distance(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """1 - cosine similarity along axis 1, averaged over the other positions: along the
    channels at each cell of a map (N, C, H, W) or (N, C, HW), over the whole sample of a
    ``batch`` tensor (N, CHW)."""
    return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


@DISTANCES.register("cos_flat")
def flat_cosine_distance(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """d2kd's variant: 1 - cosine similarity of the per-sample flattened tensors, averaged
    over the batch."""
    return cosine_distance(s.flatten(1), t.flatten(1))


@DISTANCES.register("pearson", paper=True)
def pearson(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """1 - Pearson correlation along axis 1 (like ``cos``), averaged over the other positions:
    1 - <s - mean_1 s, t - mean_1 t> / (|s - mean_1 s| |t - mean_1 t| + 1e-8)."""
    s = s - s.mean(dim=1, keepdim=True)
    t = t - t.mean(dim=1, keepdim=True)
    r = (s * t).sum(dim=1) / (s.norm(dim=1) * t.norm(dim=1) + PEARSON_EPS)
    return (1.0 - r).mean()


@DISTANCES.register("pearson_flat")
def flat_pearson(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """d2kd's variant: 1 - Pearson correlation of the per-sample flattened tensors."""
    return pearson(s.flatten(1), t.flatten(1))


def _standardise_over_batch(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D): flattened, each of the D elements standardised over the batch
    (unbiased standard deviation, floored at 1e-6)."""
    x = x.flatten(1)
    return (x - x.mean(0)) / x.std(0).clamp(min=STD_FLOOR)


@DISTANCES.register("correlation", paper=True)
def correlation(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """log2 sum_i |C_ii - 1|^2.02 (the release's): C_ii = sum_n s_ni t_ni / N, the correlation
    of element i between the batch-standardised student and teacher tensors (N, D); the
    diagonal of the cross-correlation matrix only. Batch >= 2; may be negative."""
    s, t = _standardise_over_batch(s), _standardise_over_batch(t)
    diagonal = (s * t).sum(0) / s.shape[0]  # (D,)
    return torch.log2((diagonal - 1).pow(2).pow(CORRELATION_ALPHA).sum())


@DISTANCES.register("correlation_full")
def full_correlation(s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """d2kd's variant, the cross-correlation loss of batch-standardised features with the
    off-diagonal terms: mean (1 - diag)^2 + off-diag^2 / D^2 of the (D, D) correlation
    matrix C = S^T T / N between student and teacher features (N, D); batch >= 4.

    C is never materialised (D = C*H*W of a feature map: a P3 map of 128 x 18 x 24 would need
    12 GB): its diagonal is sum_n s_n * t_n / N and its squared Frobenius norm equals
    sum(G_S * G_T) / N^2 with the (N, N) Gram matrices G_S = S S^T, G_T = T T^T.
    """
    s, t = _standardise_over_batch(s), _standardise_over_batch(t)
    n, d = s.shape
    diagonal = (s * t).sum(0) / n  # (D,)
    frobenius_sq = ((s @ s.t()) * (t @ t.t())).sum() / n ** 2
    on = (diagonal - 1).pow(2).mean()
    off = (frobenius_sq - diagonal.pow(2).sum()) / d ** 2
    return on + off
