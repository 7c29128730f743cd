"""Public API: the DetKDS genome language under its documented name.

The language (parsing, formatting and dry-running a genome, the tables of ops, distances,
inputs and weights) lives with its head in :mod:`d2kd.heads.detkds`; the search application
that explores it is :mod:`d2kd.apps.search` (``tools/search_net.py``).
"""
from .heads.detkds import (
    DISTANCES,
    KNOWLEDGE_INPUTS,
    SLOT_OPS,
    WEIGHTS,
    Formula,
    Genome,
    GenomeError,
    apply_formula,
    dry_run,
    format_genome,
    parse_genome,
)

__all__ = ["DISTANCES", "KNOWLEDGE_INPUTS", "SLOT_OPS", "WEIGHTS", "Formula", "Genome",
           "GenomeError", "apply_formula", "dry_run", "format_genome", "parse_genome"]
