"""PGM selection speed: the vectorised cheap rule vs evaluating the full objective per candidate."""
import argparse
import logging
import statistics
import time
from typing import Dict

import torch
import torch.nn.functional as F
from tabulate import tabulate

from d2kd.prototypes.selection import coupled_coefficients, density_candidates, select_prototypes
from d2kd.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def brute_force_selection(x_t: torch.Tensor, x_s: torch.Tensor, k: int,
                          alpha: float) -> torch.Tensor:
    """Reference: for every candidate, the closed-form coefficients and the full objective
    ``||R^t - w^t a^t||^2 + ||R^s - w^s a^s||^2 + alpha ||w^t - w^s||^2`` (vectorised over
    instances only)."""
    xt, xs = F.normalize(x_t.double(), dim=1), F.normalize(x_s.double(), dim=1)
    candidates = density_candidates(xt, xs)
    rt, rs, picks = xt.clone(), xs.clone(), []
    for _ in range(k):
        values = []
        for j in candidates.tolist():
            wt, ws = coupled_coefficients(rt @ xt[j], rs @ xs[j], alpha)
            values.append(((rt - wt[:, None] * xt[j]) ** 2).sum()
                          + ((rs - ws[:, None] * xs[j]) ** 2).sum()
                          + alpha * ((wt - ws) ** 2).sum())
        best = int(candidates[int(torch.stack(values).argmin())])
        wt, ws = coupled_coefficients(rt @ xt[best], rs @ xs[best], alpha)
        rt, rs = rt - wt[:, None] * xt[best], rs - ws[:, None] * xs[best]
        picks.append(best)
    return torch.tensor(picks)


def run_pgm_benchmark(json_path: str, markdown_path: str, n: int = 4000, d: int = 256,
                      k: int = 10, alpha: float = 10.0, seed: int = 0, repeats: int = 7) -> Dict:
    """Time ``select_prototypes`` (median of ``repeats`` calls) and the brute-force reference
    (one call) on ``n`` clustered random instances of ``d`` dimensions per space."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g)  # clustered instances, like real features
    x_t = centres[torch.randint(0, 20, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    x_s = x_t @ torch.randn(d, d, generator=g) / d ** 0.5 + 0.3 * torch.randn(n, d, generator=g)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fast = select_prototypes(x_t, x_s, k, alpha)
        times.append(time.perf_counter() - start)
    t_select = statistics.median(times)
    start = time.perf_counter()
    reference = brute_force_selection(x_t, x_s, k, alpha)
    t_brute = time.perf_counter() - start
    result = {"n": n, "d": d, "k": k, "alpha": alpha, "threads": torch.get_num_threads(),
              "t_select_seconds": round(t_select, 4), "t_select_min_seconds": round(min(times), 4),
              "t_brute_force_seconds": round(t_brute, 2),
              "speedup": round(t_brute / t_select, 1),
              "same_indices": fast.tolist() == reference.tolist()}
    atomic_write_json(json_path, result)
    table = tabulate([[n, d, k, alpha, result["threads"], result["t_select_seconds"],
                       result["t_select_min_seconds"], result["t_brute_force_seconds"],
                       result["speedup"], result["same_indices"]]],
                     headers=["N", "D", "K", "alpha", "threads", f"select s (median of {repeats})",
                              "select s (min)", "brute force s", "speed-up (median)",
                              "same indices"], tablefmt="github")
    atomic_write_text(markdown_path, table + "\n")
    return result


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py pgm``."""
    pgm = subparsers.add_parser("pgm",
                                help="PGM selection time vs brute-force objective evaluation")
    pgm.add_argument("--json", required=True)
    pgm.add_argument("--markdown", required=True)
    pgm.add_argument("--n", type=int, default=4000)
    pgm.add_argument("--d", type=int, default=256)
    pgm.add_argument("--k", type=int, default=10)
    pgm.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    logger.info("%s", run_pgm_benchmark(args.json, args.markdown, args.n, args.d, args.k))
