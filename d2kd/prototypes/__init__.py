"""Prototype machinery of global-knowledge distillation (PGM)."""
from .bank import PrototypeBank
from .pooling import batched_box_pool, box_cells, box_pool, roi_align_mean
from .selection import (
    coupled_coefficients,
    density_candidates,
    kmeans_prototypes,
    select_prototypes,
)

__all__ = ["PrototypeBank", "batched_box_pool", "box_cells", "box_pool", "coupled_coefficients",
           "kmeans_prototypes", "density_candidates", "roi_align_mean", "select_prototypes"]
