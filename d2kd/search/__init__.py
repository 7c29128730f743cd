"""DetKDS search: an Optuna application that searches distiller formulas for a teacher-student
pair (driver, proxy trainings, samplers, storage, reports). The formula language itself lives
with its head in :mod:`d2kd.heads.detkds`; its names are re-exported here."""
from ..heads.detkds import (
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
from . import config  # noqa: F401  (registers DISTILL.DETKDS.SEARCH)

__all__ = ["DISTANCES", "KNOWLEDGE_INPUTS", "SLOT_OPS", "WEIGHTS", "Formula", "Genome",
           "GenomeError", "apply_formula", "dry_run", "format_genome", "parse_genome"]
