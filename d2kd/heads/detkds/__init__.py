"""DetKDS: a distiller written as a formula in a small language, and the head that runs it.

The language — genomes (``genome.py``), the operations of each transform slot and the
distances (``ops.py``), their registries (``registry.py``) — is what a training needs, so it
lives with its head; the search over formulas (Optuna driver, proxy, samplers, reports) is an
application on top of it, ``d2kd.apps.search``.
"""
from .genome import (
    Formula,
    Genome,
    GenomeError,
    apply_formula,
    dry_run,
    format_genome,
    parse_genome,
)
from .head import DetKDSHead
from .registry import DISTANCES, KNOWLEDGE_INPUTS, SLOT_OPS, WEIGHTS

__all__ = ["DISTANCES", "KNOWLEDGE_INPUTS", "SLOT_OPS", "WEIGHTS", "DetKDSHead", "Formula",
           "Genome", "GenomeError", "apply_formula", "dry_run", "format_genome", "parse_genome"]
