"""PGM prototype selection (Tang et al., ECCV 2022; docs/global_knowledge.md).

Per class and level, choose K real instances Γ whose teacher and student features jointly
reconstruct all instances in both spaces:

    min  ||X^t - X^t_Γ W^t||^2 + ||X^s - X^s_Γ W^s||^2 + alpha ||W^t - W^s||^2,  |Γ| = K

by greedy matching pursuit on L2-normalised features. For an atom (a^t, a^s) and residuals
(r^t_n, r^s_n) with correlations c^t = <a^t, r^t_n>, c^s = <a^s, r^s_n>, the coupled
coefficients minimising the objective are

    w^t = ((1 + alpha) c^t + alpha c^s) / (1 + 2 alpha),
    w^s = ((1 + alpha) c^s + alpha c^t) / (1 + 2 alpha),

and the objective then equals sum_n ||r_n||^2 - (w^t c^t + w^s c^s): the best atom maximises
sum_n (w^t c^t + w^s c^s) (the "cheap" rule). Nothing loops over candidates or instances: a
D x D Gram matrix of the instances per space pair, then a few matrix-vector products per pick;
memory grows linearly with the class's instances (the density filter works in row blocks).
"""
import torch
import torch.nn.functional as F

DENSITY_BANDWIDTH = 0.1
DENSITY_PERCENTILE = 0.4
#: rules of the density filter's threshold (:func:`density_threshold`)
DENSITY_THRESHOLDS = ("rank", "quantile")
# Largest temporary of the density filter, in elements (16 MB of float32).
_BLOCK_ELEMENTS = 2**22


def density(x_hat: torch.Tensor) -> torch.Tensor:
    """(N,) rho_i = sum_j exp(-((1 - x_i . x_j) / 0.1)^2) for L2-normalised rows (N, D).

    Computed in blocks of rows, so memory is O(N) per block, never N x N."""
    n = len(x_hat)
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    rho = torch.empty(n, dtype=torch.float64, device=x_hat.device)
    for start in range(0, n, rows):
        kernel = x_hat[start:start + rows] @ x_hat.t()  # (rows, N), transformed in place
        # Exponents are capped at 80: exp(-80) ~ 2e-35 is still a normal float32, so the
        # (slow) denormal range is never entered; the error is below 1e-31 per instance.
        kernel.sub_(1.0).div_(DENSITY_BANDWIDTH).square_().clamp_(max=80.0).neg_().exp_()
        rho[start:start + rows] = kernel.sum(dim=1, dtype=torch.float64)
    return rho


def density_threshold(rho: torch.Tensor, rule: str = "rank") -> torch.Tensor:
    """() the density an instance must exceed to be a candidate, from the densities (N,).

    ``"rank"`` (the released code): ``sorted(rho)[int(0.4 N)]``, the (int(0.4 N) + 1)-th
    smallest. ``"quantile"`` (d2kd's earlier rule): ``torch.quantile(rho, 0.4)``, linearly
    interpolated at position 0.4 (N - 1); never above the rank rule's, so it can keep more.
    """
    if rule == "rank":
        return rho.sort().values[int(len(rho) * DENSITY_PERCENTILE)]
    if rule == "quantile":
        return torch.quantile(rho, DENSITY_PERCENTILE)
    raise ValueError(f"Unknown density threshold rule {rule!r}; one of {DENSITY_THRESHOLDS}.")


def density_candidates(xt_hat: torch.Tensor, xs_hat: torch.Tensor,
                       threshold_rule: str = "rank") -> torch.Tensor:
    """Indices whose density exceeds the :func:`density_threshold` (``threshold_rule``) in
    both spaces; all indices if none does (the released code has no candidate then)."""
    dense = torch.ones(len(xt_hat), dtype=torch.bool, device=xt_hat.device)
    for x in (xt_hat, xs_hat):
        rho = density(x)
        dense &= rho > density_threshold(rho, threshold_rule)
    candidates = dense.nonzero().squeeze(1)
    return candidates if len(candidates) else torch.arange(len(xt_hat), device=xt_hat.device)


def coupled_coefficients(ct: torch.Tensor, cs: torch.Tensor, alpha: float):
    """The closed-form (w^t, w^s) for correlations ``ct``, ``cs`` (any equal shapes)."""
    wt = ((1 + alpha) * ct + alpha * cs) / (1 + 2 * alpha)
    ws = ((1 + alpha) * cs + alpha * ct) / (1 + 2 * alpha)
    return wt, ws


def select_prototypes(x_t: torch.Tensor, x_s: torch.Tensor, k: int, alpha: float,
                      density_filter: bool = True, allow_duplicates: bool = True,
                      threshold_rule: str = "rank") -> torch.Tensor:
    """Indices (LongTensor[k], selection order) of the K prototypes among N instances.

    Args:
        x_t: (N, D_t) raw teacher features of one class and level.
        x_s: (N, D_s) raw student features of the same instances.
        k: number of prototypes. With ``allow_duplicates=False`` at most N can be chosen (an
            error otherwise); if the density filter leaves fewer than k, all N are candidates.
        alpha: coupling weight of the two spaces' coefficients.
        density_filter: restrict candidates to instances dense in both spaces.
        allow_duplicates: the released code can pick an instance twice (faithful default).
        threshold_rule: the density filter's threshold, see :func:`density_threshold`
            ("rank" as released, "quantile" d2kd's earlier rule).
    """
    if x_t.shape[0] != x_s.shape[0] or x_t.shape[0] == 0:
        raise ValueError(f"Need the same N > 0 instances in both spaces, got {x_t.shape[0]} "
                         f"and {x_s.shape[0]}.")
    xt_hat, xs_hat = F.normalize(x_t.float(), dim=1), F.normalize(x_s.float(), dim=1)
    candidates = (density_candidates(xt_hat, xs_hat, threshold_rule) if density_filter
                  else torch.arange(len(x_t), device=x_t.device))
    if not allow_duplicates and k > len(candidates):
        # d2kd's decision (docs/methods/global_knowledge.md): k distinct prototypes need k
        # candidates; when the density filter leaves fewer, every instance is a candidate
        # (the pre-start check ensures each class has k instances).
        candidates = torch.arange(len(x_t), device=x_t.device)
    if not allow_duplicates and k > len(candidates):
        raise ValueError(f"k={k} distinct prototypes requested among {len(candidates)} "
                         "candidates; allow duplicates or lower k.")
    picks = _greedy_pursuit(xt_hat, xs_hat, xt_hat[candidates], xs_hat[candidates], k, alpha,
                            allow_duplicates)
    return candidates[picks]


def _greedy_pursuit(xt: torch.Tensor, xs: torch.Tensor, atoms_t: torch.Tensor,
                    atoms_s: torch.Tensor, k: int, alpha: float,
                    allow_duplicates: bool) -> torch.Tensor:
    """Picks (indices into the atoms) of the cheap rule, with low-rank residual bookkeeping.

    With correlations C0 = X A^T (N, |C|), coefficient matrices W^t, W^s (N, m) after m picks
    and the picked atoms' Gram rows G (m, |C|), the residual correlations are
    C^t = C0^t - W^t G^t (likewise s). The gain needs only their column sums of squares and
    cross products, which expand into C0 terms and (m, |C|) projections W^T C0. None of them
    needs C0 itself: its column sums of squares are diag(A (X^T X) A^T) (a D x D Gram of the
    instances), a projection W^T C0 is (W^T X) A^T, and the picked column X a. Memory is
    O((N + |C|) (D + k)), never N x |C| or |C| x |C|.
    """
    xt, xs = xt.double(), xs.double()
    atoms_t, atoms_s = atoms_t.double(), atoms_s.double()
    base_tt = ((atoms_t @ (xt.t() @ xt)) * atoms_t).sum(1)
    base_ss = ((atoms_s @ (xs.t() @ xs)) * atoms_s).sum(1)
    base_ts = ((atoms_t @ (xt.t() @ xs)) * atoms_s).sum(1)
    n, num_atoms = len(xt), len(atoms_t)
    wt, ws = xt.new_zeros(n, 0), xt.new_zeros(n, 0)
    gram_t, gram_s = xt.new_zeros(0, num_atoms), xt.new_zeros(0, num_atoms)  # picked rows
    proj = {key: xt.new_zeros(0, num_atoms) for key in ("tt", "ts", "st", "ss")}  # W^T C0
    available = torch.ones(num_atoms, dtype=torch.bool, device=xt.device)
    picks = []
    for _ in range(k):
        s_tt = (base_tt - 2 * (gram_t * proj["tt"]).sum(0)
                + (gram_t * ((wt.t() @ wt) @ gram_t)).sum(0))
        s_ss = (base_ss - 2 * (gram_s * proj["ss"]).sum(0)
                + (gram_s * ((ws.t() @ ws) @ gram_s)).sum(0))
        s_ts = (base_ts - (gram_s * proj["st"]).sum(0) - (gram_t * proj["ts"]).sum(0)
                + (gram_t * ((wt.t() @ ws) @ gram_s)).sum(0))
        gain = ((1 + alpha) * (s_tt + s_ss) + 2 * alpha * s_ts) / (1 + 2 * alpha)
        if not allow_duplicates:
            gain = gain.masked_fill(~available, float("-inf"))
        best = int(torch.argmax(gain))
        ct_best = xt @ atoms_t[best] - wt @ gram_t[:, best]
        cs_best = xs @ atoms_s[best] - ws @ gram_s[:, best]
        w_t, w_s = coupled_coefficients(ct_best, cs_best, alpha)
        wt = torch.cat([wt, w_t[:, None]], dim=1)
        ws = torch.cat([ws, w_s[:, None]], dim=1)
        gram_t = torch.cat([gram_t, (atoms_t @ atoms_t[best])[None]])
        gram_s = torch.cat([gram_s, (atoms_s @ atoms_s[best])[None]])
        for key, w, x, atoms in (("tt", w_t, xt, atoms_t), ("ts", w_t, xs, atoms_s),
                                 ("st", w_s, xt, atoms_t), ("ss", w_s, xs, atoms_s)):
            proj[key] = torch.cat([proj[key], ((w @ x) @ atoms.t())[None]])
        available[best] = False
        picks.append(best)
    return torch.tensor(picks, device=xt.device)


def kmeans_prototypes(x_t: torch.Tensor, x_s: torch.Tensor, k: int, seed: int = 0):
    """Ablation of PGM: K-means centres (scikit-learn) instead of selected real instances.

    Clustering runs on the concatenation of both L2-normalised spaces, so that a centre is one
    point seen in both; its two halves are the teacher (K, D_t) and student (K, D_s)
    prototypes. With fewer than K distinct instances the centres repeat cyclically.
    Clustering runs on the host (scikit-learn); the centres come back on ``x_t``'s device.
    """
    from sklearn.cluster import KMeans

    joint = torch.cat([F.normalize(x_t.float(), dim=1), F.normalize(x_s.float(), dim=1)], 1)
    joint = joint.double().cpu()
    clusters = min(k, len(torch.unique(joint, dim=0)))
    centres = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(
        joint.numpy()).cluster_centers_
    centres = torch.as_tensor(centres, dtype=x_t.dtype)[torch.arange(k) % clusters]
    centres = centres.to(x_t.device)
    return centres[:, :x_t.shape[1]], centres[:, x_t.shape[1]:]
