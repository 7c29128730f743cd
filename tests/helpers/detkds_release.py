"""DetKDS's released operations, transcribed in plain torch: the independent reference the
fidelity tests of tests/heads/detkds/ compare d2kd's ops, distances and distillers against.

Reference: github.com/lliai/DetKDS at commit a7d2127f360bfe243125025a94e3e843aa9741e8,
mmdet/distillation/losses/operations.py: the transforms (_TRANS_FUNC1/2/3) and distances
(_DIS_FUNC), each reduced by ``no_weight`` (a mean). The ``release_*`` functions transcribe its
shapes, reductions, constants and order of operations.
"""
import itertools
from typing import Iterator, List

import torch

TAU = 0.5  # operations.py: T=0.5 of trans_satt / trans_natt / trans_catt
MASK_THRESHOLD = 0.65  # operations.py: trans_mask(f, threshold=0.65)
REL_TOL = 1e-12


class Masks:
    """The random masks of ``trans_mask``: ``torch.rand((N, 1, H, W))``, 0 where the draw
    exceeds 1 - 0.65, else 1. ``draw`` hands a new one to d2kd (it replaces
    d2kd.heads.masks.random_keep_mask) and records it; ``replay`` gives the release the same
    masks in the same order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: List[torch.Tensor] = []

    def draw(self, x: torch.Tensor, drop_ratio: float) -> torch.Tensor:
        assert drop_ratio == MASK_THRESHOLD
        n, _, h, w = x.shape
        u = torch.rand((n, 1, h, w), generator=self.generator, dtype=torch.float64)
        mask = torch.where(u > 1 - MASK_THRESHOLD, 0.0, 1.0).to(x.dtype)
        self.drawn.append(mask)
        return mask

    def replay(self) -> Iterator[torch.Tensor]:
        return iter(self.drawn)


def release_satt(f, masks=None):
    n, _, h, w = f.shape
    channel_mean = f.abs().mean(dim=1, keepdim=True)
    weights = h * w * torch.softmax((channel_mean / TAU).view(n, -1), dim=1)
    return f * torch.sqrt(weights.view(n, h, w)[:, None])


def release_catt(f, masks=None):
    c = f.shape[1]
    spatial_mean = f.abs().mean(dim=2).mean(dim=2)
    weights = c * torch.softmax(spatial_mean / TAU, dim=1)
    return f * torch.sqrt(weights[:, :, None, None])


def release_natt(f, masks=None):
    return f.shape[0] * torch.softmax(f / TAU, dim=0)


def release_mask(f, masks):
    mask = next(masks)
    assert mask.shape == (f.shape[0], 1) + tuple(f.shape[2:])
    return f * mask


def _pad(f, p):
    """Zeros appended at the right and bottom up to a multiple of p."""
    n, c, h, w = f.shape
    out = f.new_zeros(n, c, h + (p - h % p) % p, w + (p - w % p) % p)
    out[:, :, :h, :w] = f
    return out


def release_scale(p):
    """trans_multi_scale_r<p>: 'b c (h1 h2) (w1 w2) -> b c h1 w1', max, h2 = w2 = p."""
    def op(f, masks=None):
        f = _pad(f, p)
        n, c, h, w = f.shape
        return f.reshape(n, c, h // p, p, w // p, p).amax(dim=(3, 5))
    return op


def release_local(p):
    """trans_local_s<p>: 'b c (h hp) (w wp) -> b (c h w) hp wp', hp = wp = p."""
    def op(f, masks=None):
        f = _pad(f, p)
        n, c, h, w = f.shape
        rows, cols = h // p, w // p
        out = f.new_empty(n, c * rows * cols, p, p)
        for ci, i, j in itertools.product(range(c), range(rows), range(cols)):
            out[:, (ci * rows + i) * cols + j] = f[:, ci, i * p:(i + 1) * p, j * p:(j + 1) * p]
        return out
    return op


def release_normalize(dims):
    """F.normalize(f, p=2, dim=dims): f / max(||f||_2 over dims, 1e-12)."""
    def op(f, masks=None):
        return f / f.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp(min=1e-12)
    return op


def release_softmax(dim, log=False):
    """trans_(log)softmax_N / _C / _HW; HW: (N, C, H, W) -> (N, C, H*W) first."""
    def op(f, masks=None):
        if dim == "HW":
            f, d = f.reshape(f.shape[0], f.shape[1], -1), 2
        else:
            d = dim
        return torch.log_softmax(f, dim=d) if log else torch.softmax(f, dim=d)
    return op


def release_min_max(f, masks=None):
    return (f - f.min()) / (f.max() - f.min() + 1e-9)


def release_batchnorm(f, masks=None):
    """A new nn.BatchNorm2d in training mode: batch statistics (biased variance), eps 1e-5,
    weight 1, bias 0."""
    mean = f.mean(dim=(0, 2, 3), keepdim=True)
    var = (f - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (f - mean) / torch.sqrt(var + 1e-5)


def identity(f, masks=None):
    return f


RELEASE_TRANS1 = {"no": identity, "satt": release_satt, "natt": release_natt,
                  "catt": release_catt, "mask": release_mask}
RELEASE_TRANS2 = {"no": identity, "scale_r1": release_scale(1), "scale_r2": release_scale(2),
                  "multi_scale_r4": release_scale(4), "local_s1": release_local(1),
                  "local_s2": release_local(2), "local_s4": release_local(4),
                  "scale": lambda f, masks=None: (f + 1.0) / 2.0}
RELEASE_TRANS3 = {"no": identity,
                  "batch": lambda f, masks=None: f.reshape(f.shape[0], -1),
                  "channel": lambda f, masks=None: f.reshape(f.shape[0], f.shape[1], -1),
                  "norm_HW": release_normalize((2, 3)), "norm_C": release_normalize(1),
                  "norm_N": release_normalize(0),
                  "softmax_N": release_softmax(0), "softmax_C": release_softmax(1),
                  "softmax_HW": release_softmax("HW"),
                  "logsoftmax_N": release_softmax(0, log=True),
                  "logsoftmax_C": release_softmax(1, log=True),
                  "logsoftmax_HW": release_softmax("HW", log=True),
                  "min_max_normalize": release_min_max, "batchnorm": release_batchnorm}


def release_l1(s, t):
    return (s - t).abs().mean()


def release_l2(s, t):
    return (s - t).pow(2).mean()


def release_smooth_l1(s, t):
    d = (s - t).abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()


def release_cos(s, t):
    """F.cosine_similarity(f_s, f_t, eps=1e-8) (dim 1), averaged: the similarity itself."""
    dot = (s * t).sum(dim=1)
    return (dot / (s.norm(dim=1).clamp(min=1e-8) * t.norm(dim=1).clamp(min=1e-8))).mean()


def release_pear(s, t):
    s = s - s.mean(1).unsqueeze(1)
    t = t - t.mean(1).unsqueeze(1)
    return (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1) + 1e-8)).mean()


def release_cor(s, t):
    n = s.shape[0]
    s = ((s - s.mean(0)) / s.std(0)).reshape(n, -1)
    t = ((t - t.mean(0)) / t.std(0)).reshape(n, -1)
    c = (s * t).sum(dim=0) / n
    return torch.log2(((c - 1).abs().pow(2.0).pow(1.01)).sum())


def release_kl(s, t):
    """F.kl_div(f_s, f_t, reduction='none'), averaged: t * (log t - s) (0 where t = 0)."""
    return torch.where(t > 0, t * (t.clamp(min=1e-300).log() - s), torch.zeros_like(t)).mean()


RELEASE_DIS = {"l1": release_l1, "l2": release_l2, "kl": release_kl,
               "smooth_l1": release_smooth_l1, "cos": release_cos, "pear": release_pear,
               "cor": release_cor}

def release_as_loss(dis: str):
    """The release's distance as d2kd's loss: ``cos`` turned into 1 - cosine (the release
    returns the similarity; d2kd's decision, docs/methods/detkds.md), the others as they are."""
    if dis == "cos":
        return lambda s, t: 1 - release_cos(s, t)
    return RELEASE_DIS[dis]


#: d2kd's token -> the release's, where they differ
RELEASE_TOKEN = {"scale_r4": "multi_scale_r4", "affine": "scale", "min_max": "min_max_normalize",
                 "pearson": "pear", "correlation": "cor"}


def release_token(name: str) -> str:
    return RELEASE_TOKEN.get(name, name)
