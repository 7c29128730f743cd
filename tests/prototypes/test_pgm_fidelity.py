"""Global knowledge's prototype generation (PGM: the density filter and the matching pursuit,
d2kd/prototypes/selection.py) against the authors' released code, transcribed here.

Release: github.com/hikvision-research/DAVAR-Lab-ML, commit
545c886cf8162edb77ef7b517ecba6a1f8d56e2b, folder ECCV22_Distilling_Object_Detectors_with_Global_
Knowledge/ObjectPerceptron/ (``KD`` below: mmdetection/third_party/kd/mmdet/). Each ``release_*``
function restates, in plain float64 torch written for this test, what one piece of that code
computes; the file and function are named in its docstring. The release runs the prototype
selection in half precision on a GPU; the transcriptions compute the same formulas in float64.
docs/methods/global_knowledge.md ("Fidelity") lists these checks and their measured errors (the
losses and response weights: tests/heads/test_global_knowledge_fidelity.py).
"""
from typing import List

import torch
import torch.nn.functional as F

from d2kd.prototypes import density_candidates, select_prototypes


# ---- transcriptions of the release ---------------------------------------------------------
def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def release_density_candidates(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """KD/strategy/prototype_generation_module.py, ``_generate_prototypes_single``: per space
    the density of each normalised instance, sum_j exp(-((1 - x_i.x_j) / 0.1)^2); the bound is
    the sorted densities' entry at int(0.4 n); candidates exceed both spaces' bounds."""
    keep = torch.ones(len(x_a), dtype=torch.bool)
    for x in (_unit_rows(x_a), _unit_rows(x_b)):
        rho = torch.exp(-((1 - x @ x.t()) / 0.1) ** 2).sum(dim=1)
        bound = torch.sort(rho).values[int(len(rho) * 0.4)]
        keep &= rho > bound
    return keep.nonzero().squeeze(1)


def release_pgm(x_a: torch.Tensor, x_b: torch.Tensor, k: int, alpha: float) -> List[int]:
    """Same function: matching pursuit over the candidates. Each step scores every candidate
    p by ||w_a p_a - r_a||^2 + ||w_b p_b - r_b||^2 + alpha ||w_a - w_b||^2 summed over the
    instances, with w_a = (alpha (c_a + c_b) + c_a) / (1 + 2 alpha) (w_b alike) and
    c = <p, r>; the argmin is picked (repeats allowed) and removed from the residuals."""
    candidates = release_density_candidates(x_a, x_b)
    res_a, res_b = _unit_rows(x_a), _unit_rows(x_b)  # (N, D) residuals
    atoms_a, atoms_b = res_a[candidates], res_b[candidates]  # (P, D)
    picks = []
    for _ in range(k):
        c_a, c_b = atoms_a @ res_a.t(), atoms_b @ res_b.t()  # (P, N)
        w_a = (alpha * (c_a + c_b) + c_a) / (1 + 2 * alpha)
        w_b = (alpha * (c_a + c_b) + c_b) / (1 + 2 * alpha)
        err = (((w_a[:, :, None] * atoms_a[:, None, :] - res_a[None]) ** 2).sum(dim=(1, 2))
               + ((w_b[:, :, None] * atoms_b[:, None, :] - res_b[None]) ** 2).sum(dim=(1, 2))
               + alpha * ((w_a - w_b) ** 2).sum(dim=1))
        best = int(torch.argmin(err))
        picks.append(int(candidates[best]))
        res_a = res_a - w_a[best][:, None] * atoms_a[best][None]
        res_b = res_b - w_b[best][:, None] * atoms_b[best][None]
    return picks



# ---- the density filter and the pursuit --------------------------------------------------
def _draw(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 60, (1,), generator=g))
    centres = torch.randn(3, 6, generator=g)  # clustered, like one class's instances
    x_t = centres[torch.randint(0, 3, (n,), generator=g)] + 0.6 * torch.randn(n, 6, generator=g)
    x_s = x_t[:, :5] + 0.4 * torch.randn(n, 5, generator=g)
    return x_t.double(), x_s.double()


def test_density_filter_keeps_what_the_release_keeps_and_quantile_keeps_more():
    changed = 0
    for seed in range(200):
        x_t, x_s = _draw(seed)
        xt_hat, xs_hat = F.normalize(x_t, dim=1), F.normalize(x_s, dim=1)
        release = release_density_candidates(x_t, x_s)
        expected = release if len(release) else torch.arange(len(x_t))  # d2kd: all if none
        assert density_candidates(xt_hat, xs_hat).tolist() == expected.tolist()
        quantile = density_candidates(xt_hat, xs_hat, "quantile")
        assert set(expected.tolist()) <= set(quantile.tolist())
        changed += quantile.tolist() != expected.tolist()
    assert changed > 0  # the switch keeps d2kd's earlier rule, which differs


def test_pgm_picks_what_the_release_picks():
    for seed in range(60):
        x_t, x_s = _draw(seed)
        if len(release_density_candidates(x_t, x_s)) == 0:
            continue  # the release fails there (argmin of nothing); d2kd takes every instance
        for alpha in (1.0, 10.0):
            assert (select_prototypes(x_t, x_s, 5, alpha).tolist()
                    == release_pgm(x_t, x_s, 5, alpha)), (seed, alpha)
