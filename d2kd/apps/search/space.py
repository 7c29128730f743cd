"""The genes of a DetKDS search: what one study searches, as Optuna categorical parameters.

A *space* names the genes of a study (``{name: choices}``), turns gene values (an Optuna
``params`` dict) into a canonical genome string and says whether they are valid (the genome
rules plus the dry run of d2kd/heads/detkds/genome.py). Stage 1 searches the formula + weight of one
knowledge input (:class:`FormulaSpace`), stage 2 the weights of the surviving formulas
(:class:`WeightSpace`, where 0 switches an input off).
"""
import abc
import itertools
import math
import random
from dataclasses import replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from optuna.distributions import CategoricalDistribution

from ...heads.detkds.genome import (
    RESHAPING_SLOT3,
    SIZE_CHANGING_SLOT2,
    SLOT3_ONLY_INPUTS,
    Formula,
    Genome,
    GenomeError,
    check_rules,
    dry_run,
    format_genome,
    parse_genome,
)
from ...heads.detkds.registry import DISTANCES, KNOWLEDGE_INPUTS, SLOT_OPS, WEIGHTS
from ...structures import StudentKind

Params = Dict[str, object]

#: the genome of the no-distillation baseline trial
BASELINE = "none"


def genome_inputs(genome: str) -> str:
    """The knowledge inputs of a genome joined by ``+`` (``"none"`` for the baseline)."""
    if genome == BASELINE:
        return "none"
    return "+".join(f.input for f in parse_genome(genome).formulas)


class GenomeSpace(abc.ABC):
    """Genes ``{name: choices}`` of one study and their meaning as a genome."""

    genes: Dict[str, Tuple]

    def __init__(self, batch_size: int):
        self.batch_size = batch_size  # of the dry run (the correlation distances need >= 2, 4)
        self._validity: Dict[str, bool] = {}

    @abc.abstractmethod
    def genome(self, params: Params) -> str:
        """The canonical genome string of ``params``."""

    @abc.abstractmethod
    def check(self, params: Params) -> None:
        """Raise :class:`GenomeError` when ``params`` do not make a valid genome."""

    def is_valid(self, params: Params) -> bool:
        key = repr(sorted(params.items()))
        if key not in self._validity:
            try:
                self.check(params)
                self._validity[key] = True
            except GenomeError:
                self._validity[key] = False
        return self._validity[key]

    def distributions(self) -> Dict[str, CategoricalDistribution]:
        return {name: CategoricalDistribution(choices) for name, choices in self.genes.items()}

    def suggest(self, trial) -> Params:
        """The genes of an Optuna trial (values come from the sampler or enqueued params)."""
        return {name: trial.suggest_categorical(name, choices)
                for name, choices in self.genes.items()}

    def random_params(self, rng: random.Random) -> Params:
        """Uniform over each gene, redrawn until valid."""
        for _ in range(10000):
            params = {name: rng.choice(choices) for name, choices in self.genes.items()}
            if self.is_valid(params):
                return params
        raise RuntimeError(f"{type(self).__name__}: no valid genome in 10000 draws.")

    def grid(self) -> Iterator[Params]:
        """Every valid point, in a fixed order."""
        names = list(self.genes)
        for values in itertools.product(*(self.genes[n] for n in names)):
            params = dict(zip(names, values))
            if self.is_valid(params):
                yield params


def snap_weight(weight: float, choices: Sequence[float] = WEIGHTS) -> float:
    """The choice closest to ``weight`` on a log scale (e.g. the released 6 -> 5)."""
    positive = [c for c in choices if c > 0]
    return min(positive, key=lambda c: abs(math.log(c) - math.log(max(weight, 1e-12))))


class FormulaSpace(GenomeSpace):
    """Stage 1: the slot ops, distance and weight of one knowledge input.

    The ops and distances of the paper's space (the authors' release), and with
    ``extra_ops`` every other registered one too (d2kd's variants, projects' registrations;
    ``DISTILL.DETKDS.SEARCH.EXTRA_OPS``). ``logit`` and ``loc`` only have slot 3; ``instance``
    only offers the ops that keep the spatial layout (no size-changing slot 2, no reshaping
    slot 3).
    """

    def __init__(self, knowledge_input: str, batch_size: int, extra_ops: bool = False):
        super().__init__(batch_size)
        if knowledge_input not in KNOWLEDGE_INPUTS:
            raise ValueError(f"Unknown knowledge input {knowledge_input!r}; choose from "
                             f"{list(KNOWLEDGE_INPUTS)}.")
        self.knowledge_input = knowledge_input
        paper_only = not extra_ops
        slot2 = [op for op in SLOT_OPS[2].names(paper_only)
                 if not (knowledge_input == "instance" and op in SIZE_CHANGING_SLOT2)]
        slot3 = [op for op in SLOT_OPS[3].names(paper_only)
                 if not (knowledge_input == "instance" and op in RESHAPING_SLOT3)]
        genes = {} if knowledge_input in SLOT3_ONLY_INPUTS else {
            "slot1": tuple(SLOT_OPS[1].names(paper_only)), "slot2": tuple(slot2)}
        genes.update(slot3=tuple(slot3), distance=tuple(DISTANCES.names(paper_only)),
                     weight=WEIGHTS)
        self.genes = genes

    def formula(self, params: Params) -> Formula:
        return Formula(self.knowledge_input, params.get("slot1", "no"), params.get("slot2", "no"),
                       params["slot3"], params["distance"], float(params["weight"]))

    def genome(self, params: Params) -> str:
        return format_genome(Genome((self.formula(params),)))

    def check(self, params: Params) -> None:
        formula = self.formula(params)
        check_rules(formula)
        dry_run(Genome((formula,)), self.batch_size)

    def params_of(self, genome_text: str) -> Optional[Params]:
        """The genes of this input's formula in ``genome_text`` (weight snapped to the weight
        set), or None when the genome has no valid formula for it."""
        genome = parse_genome(genome_text)
        formula = next((f for f in genome.formulas if f.input == self.knowledge_input), None)
        if formula is None:
            return None
        params = {"slot1": formula.slot1, "slot2": formula.slot2, "slot3": formula.slot3,
                  "distance": formula.distance, "weight": snap_weight(formula.weight)}
        params = {name: params[name] for name in self.genes}
        ok = all(params[n] in c for n, c in self.genes.items()) and self.is_valid(params)
        return params if ok else None


class WeightSpace(GenomeSpace):
    """Stage 2: one weight gene ``w_<input>`` per fixed formula; 0 leaves the input out."""

    def __init__(self, formulas: Sequence[Formula], batch_size: int):
        super().__init__(batch_size)
        self.formulas = {f.input: f for f in formulas}
        self.genes = {f"w_{f.input}": (0,) + WEIGHTS for f in formulas}

    def genome(self, params: Params) -> str:
        kept = tuple(replace(f, weight=float(params[f"w_{name}"]))
                     for name, f in self.formulas.items() if params[f"w_{name}"] > 0)
        return format_genome(Genome(kept)) if kept else BASELINE

    def check(self, params: Params) -> None:
        if all(params[name] == 0 for name in self.genes):
            raise GenomeError("stage 2: every weight is 0 (that is the baseline).")


def student_can_use(cfg, knowledge_input: str) -> bool:
    """``logit``/``loc`` need a dense head (RetinaNet, FCOS) or an RPN; the others need FPN
    maps, which every d2kd distillation pair has."""
    if knowledge_input not in SLOT3_ONLY_INPUTS:
        return True
    kind = StudentKind.from_config(cfg)
    return kind.dense or kind.has_rpn


def search_inputs(cfg) -> Tuple[List[str], List[str]]:
    """(inputs to search, inputs skipped because the student cannot use them)."""
    wanted = list(cfg.DISTILL.DETKDS.SEARCH.INPUTS)
    unknown = [i for i in wanted if i not in KNOWLEDGE_INPUTS]
    if unknown or not wanted:
        raise ValueError(f"DISTILL.DETKDS.SEARCH.INPUTS: unknown or no inputs {unknown or wanted}; "
                         f"choose from {list(KNOWLEDGE_INPUTS)}.")
    usable = [i for i in wanted if student_can_use(cfg, i)]
    return usable, [i for i in wanted if i not in usable]
