"""Optuna samplers over genome spaces: genetic, random and exhaustive (grid).

All three sample a whole genome at once (Optuna's *relative* sampling over the space's genes),
always valid (the space's rules and dry run) and, while the space allows, never a genome any
trial of the study already has (running, finished or queued). Their randomness is seeded by
``(seed, study, trial number)``, so a resumed search proposes what the first run would have.

:class:`GeneticSampler` is a generational GA that works with asynchronous workers: a trial
joins the newest generation until that holds ``population`` trials; a trial of generation
g > 0 is bred from the parents: the ``elites`` best trials of all earlier generations plus the
evaluated trials of generation g - 1 (tournament selection, uniform crossover, per-gene
mutation). Generation 0 is random, after any enqueued seed genomes.
"""
import abc
import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from .space import GenomeSpace, Params

GENERATION_KEY = "ga:generation"
#: status of a trial that lost the race for its stage's last slot (DetKDSSearch.is_surplus):
#: never trained, so samplers and tables ignore it
SURPLUS = "surplus"
ATTEMPTS = 200  # breeding attempts before falling back to a random novel genome


def fitness(trial: FrozenTrial) -> float:
    """Box AP of a finished trial: its value, the last reported AP when pruned, else -inf."""
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return -math.inf


def tournament(rng: random.Random, candidates: Sequence[Tuple[Params, float]], size: int) -> Params:
    """The fittest of ``size`` candidates drawn without replacement."""
    drawn = rng.sample(list(candidates), min(size, len(candidates)))
    return max(drawn, key=lambda c: c[1])[0]


def uniform_crossover(rng: random.Random, a: Params, b: Params, prob: float) -> Params:
    """With probability ``prob`` each gene from either parent (1/2 each), else a copy of a."""
    if rng.random() >= prob:
        return dict(a)
    return {name: (a if rng.random() < 0.5 else b)[name] for name in a}


def mutate(rng: random.Random, params: Params, space: GenomeSpace, prob: float) -> Params:
    """Each gene, with probability ``prob``, replaced by another of its choices."""
    out = dict(params)
    for name, choices in space.genes.items():
        others = [c for c in choices if c != out[name]]
        if others and rng.random() < prob:
            out[name] = rng.choice(others)
    return out


def _generation(trial: FrozenTrial) -> int:
    """Enqueued trials with every gene fixed never reach the sampler: generation 0."""
    return trial.system_attrs.get(GENERATION_KEY, 0)


def _queued_params(trial: FrozenTrial) -> Dict:
    return trial.params or trial.system_attrs.get("fixed_params", {})


class GenomeSampler(BaseSampler):
    """Base: relative sampling of every gene of ``space``; subclasses :meth:`propose`."""

    def __init__(self, space: GenomeSpace, seed: int = 0):
        self.space = space
        self.seed = seed

    def infer_relative_search_space(self, study, trial):
        return self.space.distributions()

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise RuntimeError(f"{param_name!r} is not a gene of this study's genome space "
                           f"({sorted(self.space.genes)}).")

    def sample_relative(self, study, trial: FrozenTrial, search_space) -> Params:
        if not search_space:
            return {}
        rng = random.Random(f"{self.seed}/{study.study_name}/{trial.number}")
        history = [t for t in study.get_trials(deepcopy=False)
                   if t.number != trial.number and t.user_attrs.get("status") != SURPLUS]
        seen = set()
        for t in history:
            params = _queued_params(t)
            if set(params) >= set(self.space.genes):
                seen.add(self.space.genome(params))
        return self.propose(rng, study, trial, history, seen)

    @abc.abstractmethod
    def propose(self, rng: random.Random, study, trial: FrozenTrial, history: List[FrozenTrial],
                seen: Set[str]) -> Params:
        """The parameters of ``trial``: a valid genome not in ``seen``."""

    def novel(self, rng: random.Random, seen: Set[str],
              breed: Optional[Callable[[], Params]] = None) -> Params:
        """A valid genome not in ``seen``: bred when ``breed`` is given, else random; a seen
        one (a cache hit, not a second training) only when the space is exhausted."""
        for make in ([breed] if breed else []) + [lambda: self.space.random_params(rng)]:
            for _ in range(ATTEMPTS):
                params = make()
                if self.space.is_valid(params) and self.space.genome(params) not in seen:
                    return params
        return next((p for p in self.space.grid() if self.space.genome(p) not in seen),
                    self.space.random_params(rng))


class RandomGenomeSampler(GenomeSampler):
    """Uniform random valid genomes (the random-search arm)."""

    def propose(self, rng, study, trial, history, seen):
        return self.novel(rng, seen)


class GridGenomeSampler(GenomeSampler):
    """Every valid point of the space in a fixed order (exhaustive stage 2)."""

    def propose(self, rng, study, trial, history, seen):
        return next((p for p in self.space.grid() if self.space.genome(p) not in seen),
                    next(self.space.grid()))


class GeneticSampler(GenomeSampler):
    """Generational GA (see the module docstring)."""

    def __init__(self, space: GenomeSpace, seed: int = 0, population: int = 10, elites: int = 2,
                 tournament_size: int = 3, crossover_prob: float = 0.9,
                 mutation_prob: float = 0.2):
        super().__init__(space, seed)
        if population < 2 or elites < 0 or tournament_size < 1:
            raise ValueError(f"GA: need population >= 2, elites >= 0, tournament >= 1; got "
                             f"{population}, {elites}, {tournament_size}.")
        self.population = population
        self.elites = elites
        self.tournament_size = tournament_size
        self.crossover_prob = crossover_prob
        self.mutation_prob = mutation_prob

    def generation_of_new_trial(self, history: List[FrozenTrial]) -> int:
        generations = [_generation(t) for t in history]
        if not generations:
            return 0
        newest = max(generations)
        return newest + 1 if generations.count(newest) >= self.population else newest

    def parents(self, history: List[FrozenTrial], generation: int) -> List[Tuple[Params, float]]:
        """The ``elites`` best evaluated trials before ``generation`` plus the evaluated
        trials of ``generation - 1``, as (params, fitness)."""
        evaluated = [t for t in history if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                     and _generation(t) < generation
                     and set(t.params) >= set(self.space.genes)]
        ranked = sorted(evaluated, key=fitness, reverse=True)
        chosen = {t.number: t for t in ranked[:self.elites]}
        chosen.update({t.number: t for t in evaluated
                       if _generation(t) == generation - 1})
        return [(dict(t.params), fitness(t)) for t in chosen.values()]

    def breed(self, rng: random.Random, parents: List[Tuple[Params, float]]) -> Params:
        a = tournament(rng, parents, self.tournament_size)
        b = tournament(rng, parents, self.tournament_size)
        child = uniform_crossover(rng, a, b, self.crossover_prob)
        return mutate(rng, child, self.space, self.mutation_prob)

    def propose(self, rng, study, trial, history, seen):
        generation = self.generation_of_new_trial(history)
        study._storage.set_trial_system_attr(trial._trial_id, GENERATION_KEY, generation)
        parents = self.parents(history, generation) if generation > 0 else []
        if len(parents) < 2:
            return self.novel(rng, seen)
        return self.novel(rng, seen, breed=lambda: self.breed(rng, parents))
