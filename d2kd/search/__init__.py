"""DetKDS: the search space of distiller formulas (ops, distances, genomes)."""
from .genome import (Formula, Genome, GenomeError, apply_formula, dry_run, format_genome,
                     parse_genome)
from .registry import DISTANCES, KNOWLEDGE_INPUTS, SLOT_OPS, WEIGHTS

__all__ = ["DISTANCES", "KNOWLEDGE_INPUTS", "SLOT_OPS", "WEIGHTS", "Formula", "Genome",
           "GenomeError", "apply_formula", "dry_run", "format_genome", "parse_genome"]
