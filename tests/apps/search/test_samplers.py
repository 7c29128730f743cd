"""DetKDS search's genetic operators and samplers (d2kd/apps/search/samplers.py, space.py):
tournament, crossover and mutation respect their parents and choices, bred genomes are valid and
new, generations fill up to the population with the seeds first, the weight space."""
import random

import optuna
import pytest
from conftest import assert_valid_genome

from d2kd.apps.search.samplers import (
    GENERATION_KEY,
    GeneticSampler,
    mutate,
    tournament,
    uniform_crossover,
)
from d2kd.apps.search.space import FormulaSpace, WeightSpace
from d2kd.search import parse_genome

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_tournament_returns_the_fittest_of_the_drawn():
    candidates = [({"g": i}, float(f)) for i, f in enumerate([3, 9, 1, 7])]
    rng = random.Random(0)
    assert tournament(rng, candidates, size=4) == {"g": 1}  # everyone drawn: the best
    assert {tournament(rng, candidates, 1)["g"] for _ in range(200)} == {0, 1, 2, 3}
    # size 2: the worst (fitness 1) can never win a pair
    assert 2 not in {tournament(rng, candidates, 2)["g"] for _ in range(200)}


def test_crossover_and_mutation_respect_parents_and_choices():
    space = FormulaSpace("global", batch_size=2)
    rng = random.Random(1)
    a = {"slot1": "catt", "slot2": "scale_r2", "slot3": "norm_N", "distance": "l1", "weight": 5}
    b = {"slot1": "satt", "slot2": "local_s4", "slot3": "norm_HW", "distance": "l2", "weight": 2}
    assert uniform_crossover(rng, a, b, prob=0.0) == a
    children = [uniform_crossover(rng, a, b, prob=1.0) for _ in range(100)]
    assert all(c[g] in (a[g], b[g]) for c in children for g in a)
    assert {c["slot1"] for c in children} == {"catt", "satt"}
    assert mutate(rng, a, space, prob=0.0) == a
    changed = mutate(rng, a, space, prob=1.0)
    assert all(changed[g] != a[g] and changed[g] in space.genes[g] for g in a)


@pytest.mark.parametrize("knowledge_input", ["global", "instance", "logit"])
def test_bred_genomes_are_valid_and_new(knowledge_input):
    space = FormulaSpace(knowledge_input, batch_size=2)
    sampler = GeneticSampler(space, seed=0, population=4, mutation_prob=0.5)
    rng = random.Random(0)
    parents = [(space.random_params(rng), float(i)) for i in range(6)]
    seen = {space.genome(p) for p, _ in parents}
    for _ in range(30):
        child = sampler.novel(rng, seen, breed=lambda: sampler.breed(rng, parents))
        assert_valid_genome(space, child)
        assert space.genome(child) not in seen
        seen.add(space.genome(child))
    # instance keeps the spatial layout; logit has slot 3 only
    assert "slot2" not in space.genes or "scale_r2" not in space.genes["slot2"] or \
        knowledge_input != "instance"
    assert ("slot1" in space.genes) == (knowledge_input != "logit")


def test_ga_generations_fill_up_to_the_population_and_seeds_come_first():
    space = FormulaSpace("global", batch_size=2)
    study = optuna.create_study(direction="maximize",
                                sampler=GeneticSampler(space, seed=0, population=3, elites=1))
    seed = {"slot1": "catt", "slot2": "scale_r2", "slot3": "norm_N", "distance": "l1", "weight": 5}
    study.enqueue_trial(seed)
    genomes = []
    for i in range(9):
        trial = study.ask()
        params = space.suggest(trial)
        assert_valid_genome(space, params)
        genomes.append(space.genome(params))
        study.tell(trial, float(i % 4))
    assert genomes[0] == "global:catt|scale_r2|norm_N|l1|w=5"
    assert len(set(genomes)) == len(genomes)
    generations = [t.system_attrs.get(GENERATION_KEY, 0) for t in study.trials]
    assert generations == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_weight_space_drops_zero_weights_and_forbids_all_zero():
    f = parse_genome("global:catt|scale_r2|norm_N|l1|w=5;fgbg:no|local_s4|norm_HW|l1|w=2").formulas
    space = WeightSpace(f, batch_size=2)
    assert space.genome({"w_global": 10, "w_fgbg": 0}) == "global:catt|scale_r2|norm_N|l1|w=10"
    assert not space.is_valid({"w_global": 0, "w_fgbg": 0})
    assert sum(1 for _ in space.grid()) == 9 * 9 - 1
