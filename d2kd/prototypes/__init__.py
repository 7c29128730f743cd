"""Prototype machinery of global-knowledge distillation (PGM)."""
from .bank import PrototypeBank
from .pooling import box_cells, box_pool
from .selection import coupled_coefficients, density_candidates, select_prototypes

__all__ = ["PrototypeBank", "box_cells", "box_pool", "coupled_coefficients",
           "density_candidates", "select_prototypes"]
