"""DetKDS search: an Optuna application that searches distiller formulas for a teacher-student
pair (driver, proxy trainings, samplers, storage, reports). The formula language it searches
lives with its head in :mod:`d2kd.heads.detkds` (public as :mod:`d2kd.search`)."""
from . import config  # noqa: F401  (registers DISTILL.DETKDS.SEARCH)
