"""Multi-fidelity proxy trials (d2kd/apps/search/pruning.py): the rungs a trial reports at, and
successive halving in the driver against a transcription of its promotion rule."""
import os
from collections import defaultdict

import optuna
import pytest
from conftest import search_cfg

from d2kd.apps.search.driver import DetKDSSearch
from d2kd.apps.search.proxy import TrialOutcome
from d2kd.apps.search.pruning import report_iterations, search_pruner
from d2kd.config import ConfigError
from d2kd.config.ranges import check_key_ranges

optuna.logging.set_verbosity(optuna.logging.WARNING)


def node(pruner, prune_at, proxy_iters, eta=3):
    return search_cfg("DISTILL.DETKDS.SEARCH.PRUNER", pruner, "DISTILL.DETKDS.SEARCH.PRUNE_AT",
                      str(prune_at), "DISTILL.DETKDS.SEARCH.PROXY_ITERS", str(proxy_iters),
                      "DISTILL.DETKDS.SEARCH.PRUNE_REDUCTION_FACTOR", str(eta)
                      ).DISTILL.DETKDS.SEARCH


@pytest.mark.parametrize("pruner, prune_at, proxy_iters, eta, expected", [
    ("median", 0.5, 100, 3, [50]),
    ("median", 0.0, 100, 3, []),
    ("successive_halving", 0.1, 100, 3, [10, 30, 90]),
    ("successive_halving", 0.1, 90, 3, [9, 27, 81]),
    ("successive_halving", 0.1, 100, 2, [10, 20, 40, 80]),
    ("hyperband", 0.04, 100, 3, [4, 12, 36]),
    ("hyperband", 0.0, 100, 3, []),
])
def test_a_trial_reports_at_every_rung_below_its_budget(pruner, prune_at, proxy_iters, eta,
                                                        expected):
    assert report_iterations(node(pruner, prune_at, proxy_iters, eta)) == expected


def test_each_pruner_is_optunas_own():
    assert isinstance(search_pruner(node("median", 0.5, 100)), optuna.pruners.MedianPruner)
    assert isinstance(search_pruner(node("median", 0.0, 100)), optuna.pruners.NopPruner)
    assert isinstance(search_pruner(node("successive_halving", 0.1, 100)),
                      optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(search_pruner(node("hyperband", 0.1, 100)), optuna.pruners.HyperbandPruner)


@pytest.mark.parametrize("key, value", [("PRUNER", "asha"), ("PRUNE_REDUCTION_FACTOR", "1")])
def test_a_pruner_setting_out_of_range_is_one_line(key, value):
    cfg = search_cfg(f"DISTILL.DETKDS.SEARCH.{key}", value)
    with pytest.raises(ConfigError, match=rf"^DISTILL\.DETKDS\.SEARCH\.{key} = .*: must be "):
        check_key_ranges(cfg)


class LearningCurves:
    """A fake proxy: genome g's AP after ``step`` of ``budget`` iterations is
    quality(g) · step / budget; reports at the rungs, stops when told to; records every answer
    as (stage, step, AP, prune?)."""

    def __init__(self, rungs, budget):
        self.rungs, self.budget, self.answers = rungs, budget, []

    def __call__(self, genome, output_dir, report):
        stage = os.path.basename(os.path.dirname(output_dir))
        quality = 10.0 if genome is None else 5.0 + sum(map(ord, genome)) % 23
        for step in self.rungs:
            ap = quality * step / self.budget
            prune = report(step, ap)
            self.answers.append((stage, step, ap, prune))
            if prune:
                return TrialOutcome("pruned", ap, 0.01)
        return TrialOutcome("ok", quality, 0.01)


def successive_halving_answers(answers, eta):
    """Transcription of the asynchronous successive-halving rule (Li et al., "A System for
    Massively Parallel Hyperparameter Tuning", MLSys 2020, the promotion in Algorithm 2): a
    trial that reaches a rung goes on iff its value is among the best ⌊n/η⌋ of the n values
    recorded at that rung so far, itself included (the best one while n < η)."""
    at_rung = defaultdict(list)
    expected = []
    for stage, step, ap, _ in answers:
        values = at_rung[stage, step]
        values.append(ap)
        best = sorted(values, reverse=True)[:max(len(values) // eta, 1)]
        expected.append((stage, step, ap, ap < min(best)))
    return expected


def search_with_learning_curves(tmp_path, pruner):
    """24 stage-1 trials of the GA on the logit input, 90 proxy iterations with rungs at
    9 / 27 / 81 (η = 3), proxied by :class:`LearningCurves`."""
    cfg = search_cfg("DISTILL.DETKDS.SEARCH.INPUTS", "['logit']",
                     "DISTILL.DETKDS.SEARCH.PRUNER", pruner,
                     "DISTILL.DETKDS.SEARCH.PROXY_ITERS", "90",
                     "DISTILL.DETKDS.SEARCH.PRUNE_AT", "0.1", "DISTILL.DETKDS.SEARCH.SEED_GENOMES",
                     "[]", "DISTILL.DETKDS.SEARCH.POPULATION", "6")
    curves = LearningCurves([9, 27, 81], 90)
    search = DetKDSSearch(cfg, optuna.storages.InMemoryStorage(), str(tmp_path), "ga", 0, 24,
                          curves)
    search.run_worker()
    return search, curves


def test_successive_halving_sends_the_best_third_of_each_rung_on(tmp_path):
    search, curves = search_with_learning_curves(tmp_path, "successive_halving")
    assert curves.answers == successive_halving_answers(curves.answers, eta=3)
    trials = [t for t in search.trials("stage1-logit") if t.user_attrs["status"] != "cached"]
    full = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 1 <= len(full) <= len(trials) // 3  # most trials stop at the first rung
    stopped_at = {max(t.intermediate_values) for t in trials if t not in full}
    assert stopped_at <= {9, 27, 81} and 9 in stopped_at


def test_hyperband_prunes_at_the_rungs_of_its_brackets(tmp_path):
    search, curves = search_with_learning_curves(tmp_path, "hyperband")
    trials = [t for t in search.trials("stage1-logit") if t.user_attrs["status"] != "cached"]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and len(pruned) < len(trials)
    assert {max(t.intermediate_values) for t in pruned} <= {9, 27, 81}
