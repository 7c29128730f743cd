"""Multi-fidelity proxy trials: Optuna's pruner of a search and the iterations at which a trial
evaluates box AP and reports it to that pruner.

``DISTILL.DETKDS.SEARCH.PRUNER`` picks one of Optuna's pruners; the budgets it compares
trials at are proxy iterations:

- ``median``: :class:`optuna.pruners.MedianPruner`, one evaluation after ``PRUNE_AT`` of
  ``PROXY_ITERS`` (a trial below the median of the earlier trials there stops);
- ``successive_halving``: :class:`optuna.pruners.SuccessiveHalvingPruner`, rungs after
  ``r, r·η, r·η², ...`` iterations below ``PROXY_ITERS``, with ``r = PRUNE_AT · PROXY_ITERS``
  and ``η = PRUNE_REDUCTION_FACTOR``: a trial goes on past a rung only while it is in the best
  ``1/η`` of the trials that reached it, so most trials cost ``r`` iterations and only the
  promising ones the whole proxy;
- ``hyperband``: :class:`optuna.pruners.HyperbandPruner` over the same rungs (brackets of
  successive halving that start at ``r, r·η, ...``, a trial's bracket drawn by Optuna).

``PRUNE_AT <= 0`` turns pruning off. Each report is an evaluation on the proxy's ``VAL_IMAGES``
(its cost is in the trial's seconds). The divide-and-conquer stages of DetKDS are unchanged:
each stage's study has its own pruner.
"""
from typing import List

import optuna
from detectron2.config import CfgNode

PRUNERS = ("median", "successive_halving", "hyperband")


def first_report_iteration(node: CfgNode) -> int:
    """Iterations before the first evaluation: ``PRUNE_AT`` of ``PROXY_ITERS``, at least 1."""
    return max(1, int(round(node.PRUNE_AT * node.PROXY_ITERS)))


def report_iterations(node: CfgNode) -> List[int]:
    """The iterations after which a proxy trial evaluates box AP and reports it: none without
    pruning; ``PRUNE_AT`` of ``PROXY_ITERS`` for the median pruner; that and every rung after it
    (× ``PRUNE_REDUCTION_FACTOR``) for successive halving and Hyperband. All are below
    ``PROXY_ITERS`` (the final evaluation is the trial's value)."""
    if node.PRUNE_AT <= 0:
        return []
    at = first_report_iteration(node)
    iterations = []
    while at < node.PROXY_ITERS:
        iterations.append(at)
        if node.PRUNER == "median":
            break
        at *= node.PRUNE_REDUCTION_FACTOR
    return iterations


def search_pruner(node: CfgNode) -> optuna.pruners.BasePruner:
    """The Optuna pruner of the ``DISTILL.DETKDS.SEARCH`` node ``node`` (see the module
    docstring); none when ``PRUNE_AT <= 0``."""
    if node.PRUNE_AT <= 0:
        return optuna.pruners.NopPruner()
    if node.PRUNER == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=node.PRUNER_STARTUP_TRIALS)
    first = first_report_iteration(node)
    if node.PRUNER == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=node.PRUNE_REDUCTION_FACTOR)
    return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=node.PROXY_ITERS,
                                          reduction_factor=node.PRUNE_REDUCTION_FACTOR)
