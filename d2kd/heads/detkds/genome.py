"""DetKDS genomes: a distiller as text, e.g.
``global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2``.

Each ``;``-separated formula is ``<input>:<slot1>|<slot2>|<slot3>|<distance>|w=<weight>``.
:func:`format_genome` is canonical (inputs in ``KNOWLEDGE_INPUTS`` order, weights in ``%g``
form), so ``format_genome(parse_genome(s)) == s`` for canonical ``s`` and the string is a
cache key. Invalid genomes raise :class:`GenomeError` naming the bad token.
"""
from dataclasses import dataclass
from typing import Tuple

import torch

from . import ops  # noqa: F401  (registers the built-in ops and distances)
from .ops import DISTRIBUTION_OPS, MIN_BATCH, SHARED_MASK_OPS, draw_mask
from .registry import DISTANCES, KNOWLEDGE_INPUTS, SLOT_OPS

#: slot-2 ops that change the spatial layout (the ``instance`` input's RoIs need it kept)
SIZE_CHANGING_SLOT2 = ("scale_r2", "scale_r4", "local_s1", "local_s2", "local_s4", "s2d_s2",
                       "s2d_s4")
RESHAPING_SLOT3 = ("batch", "channel")
SLOT3_ONLY_INPUTS = ("logit", "loc")


class GenomeError(ValueError):
    """A malformed or invalid genome string; the message names the bad token."""


@dataclass(frozen=True)
class Formula:
    input: str
    slot1: str
    slot2: str
    slot3: str
    distance: str
    weight: float

    def __str__(self) -> str:
        return (f"{self.input}:{self.slot1}|{self.slot2}|{self.slot3}|{self.distance}"
                f"|w={self.weight:g}")


@dataclass(frozen=True)
class Genome:
    formulas: Tuple[Formula, ...]

    def formula(self, knowledge_input: str) -> Formula:
        return next(f for f in self.formulas if f.input == knowledge_input)


def _choice(token: str, registry, what: str, context: str) -> str:
    if token not in registry:
        raise GenomeError(f"{context}: unknown {what} {token!r}; choose from {registry.names()}.")
    return token


def _parse_formula(text: str) -> Formula:
    if ":" not in text:
        raise GenomeError(f"Formula {text!r} has no '<input>:' prefix.")
    name, body = text.split(":", 1)
    if name not in KNOWLEDGE_INPUTS:
        raise GenomeError(f"Unknown knowledge input {name!r}; "
                          f"choose from {list(KNOWLEDGE_INPUTS)}.")
    tokens = body.split("|")
    if len(tokens) != 5:
        raise GenomeError(f"{name}: expected slot1|slot2|slot3|distance|w=<weight>, got {body!r}.")
    slot1, slot2, slot3, distance, weight = tokens
    context = f"{name}"
    _choice(slot1, SLOT_OPS[1], "slot-1 op", context)
    _choice(slot2, SLOT_OPS[2], "slot-2 op", context)
    _choice(slot3, SLOT_OPS[3], "slot-3 op", context)
    _choice(distance, DISTANCES, "distance", context)
    if not weight.startswith("w="):
        raise GenomeError(f"{name}: weight token {weight!r} must read w=<number>.")
    try:
        value = float(weight[2:])
    except ValueError:
        raise GenomeError(f"{name}: weight token {weight!r} is not a number.") from None
    if not value >= 0:
        raise GenomeError(f"{name}: weight token {weight!r} must be >= 0.")
    formula = Formula(name, slot1, slot2, slot3, distance, value)
    check_rules(formula)
    return formula


def check_rules(formula: Formula) -> None:
    """The validity rules that need no tensor (see docs/methods/detkds.md)."""
    name = formula.input
    if formula.distance == "kl" and formula.slot3 not in DISTRIBUTION_OPS:
        raise GenomeError(f"{name}: distance 'kl' needs a distribution slot 3 "
                          f"({sorted(DISTRIBUTION_OPS)}), got {formula.slot3!r}.")
    if name == "instance" and formula.slot2 in SIZE_CHANGING_SLOT2:
        raise GenomeError(f"instance: slot 2 {formula.slot2!r} changes the spatial layout.")
    if name == "instance" and formula.slot3 in RESHAPING_SLOT3:
        raise GenomeError(f"instance: slot 3 {formula.slot3!r} reshapes the map.")
    if name in SLOT3_ONLY_INPUTS and (formula.slot1, formula.slot2) != ("no", "no"):
        raise GenomeError(f"{name}: only slot 3 applies; slots 1 and 2 must be 'no', got "
                          f"{formula.slot1!r}, {formula.slot2!r}.")


def parse_genome(text: str) -> Genome:
    parts = [p for p in text.strip().split(";") if p]
    if not parts:
        raise GenomeError("Empty genome string.")
    formulas = [_parse_formula(p) for p in parts]
    names = [f.input for f in formulas]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GenomeError(f"Knowledge input(s) {duplicates} appear more than once.")
    formulas.sort(key=lambda f: KNOWLEDGE_INPUTS.index(f.input))
    return Genome(tuple(formulas))


def format_genome(genome: Genome) -> str:
    ordered = sorted(genome.formulas, key=lambda f: KNOWLEDGE_INPUTS.index(f.input))
    return ";".join(str(f) for f in ordered)


def transform(formula: Formula, student: torch.Tensor, teacher: torch.Tensor,
              slots=(1, 2, 3)) -> Tuple[torch.Tensor, torch.Tensor]:
    """The slot cascade applied identically and independently to both tensors. A random mask
    of slot 1 is drawn for each tensor (student first), one for both with ``mask_shared``."""
    mask = draw_mask(teacher) if formula.slot1 in SHARED_MASK_OPS and 1 in slots else None
    names = {1: formula.slot1, 2: formula.slot2, 3: formula.slot3}
    for slot in slots:
        op = SLOT_OPS[slot].get(names[slot])
        student, teacher = op(student, mask=mask), op(teacher, mask=mask)
    return student, teacher


def distance(formula: Formula, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``weight * distance(student, teacher)`` of already transformed tensors."""
    kwargs = {}
    if formula.slot3 in DISTRIBUTION_OPS:
        kwargs = {"axis": DISTRIBUTION_OPS[formula.slot3],
                  "log_inputs": formula.slot3.startswith("log")}
    return formula.weight * DISTANCES.get(formula.distance)(student, teacher, **kwargs)


def apply_formula(formula: Formula, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``weight * distance(T(student), T(teacher))`` with T the whole slot cascade."""
    return distance(formula, *transform(formula, student, teacher))


def dry_run(genome: Genome, batch_size: int, channels: int = 8, size: int = 8) -> None:
    """Evaluate every formula on random (N, C, S, S) CPU tensors: a finite scalar or
    GenomeError. A build-time check: the tensors are made on the CPU explicitly, whatever the
    default device (``with torch.device("cuda"):`` around model building)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for formula in genome.formulas:
        least = MIN_BATCH.get(formula.distance, 1)
        if batch_size < least:
            raise GenomeError(f"{formula.input}: distance {formula.distance!r} needs a batch of "
                              f"at least {least}, got {batch_size}.")
        s = torch.randn(batch_size, channels, size, size, generator=g, device="cpu")
        t = torch.randn(batch_size, channels, size, size, generator=g, device="cpu")
        value = apply_formula(formula, s, t)
        if value.dim() != 0 or not torch.isfinite(value):
            raise GenomeError(f"{formula}: the dry run gave {value}, not a finite scalar.")
