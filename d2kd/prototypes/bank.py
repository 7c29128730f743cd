"""The prototype bank: PGM prototypes per level and class, in fixed-shape buffers.

Buffers (all persistent, so checkpoints carry the bank and ``--resume`` restores it):
``teacher`` (L, C, K, D_t) and ``student`` (L, C, K, D_s) raw prototype features, ``valid``
(L, C) bool (a class without valid instances keeps no prototypes), ``version`` () long,
incremented by every refresh.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeBank(nn.Module):
    def __init__(self, levels: Sequence[str], num_classes: int, k: int, teacher_dim: int,
                 student_dim: int):
        super().__init__()
        self.levels = list(levels)
        self.register_buffer("teacher", torch.zeros(len(levels), num_classes, k, teacher_dim))
        self.register_buffer("student", torch.zeros(len(levels), num_classes, k, student_dim))
        self.register_buffer("valid", torch.zeros(len(levels), num_classes, dtype=torch.bool))
        self.register_buffer("version", torch.zeros((), dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return self.valid.shape[1]

    def set_prototypes(self, level: int, cls: int, teacher: torch.Tensor,
                       student: torch.Tensor) -> None:
        """Store (K, D_t) / (K, D_s) prototypes of one level and class."""
        self.teacher[level, cls] = teacher
        self.student[level, cls] = student
        self.valid[level, cls] = True

    def max_cosine(self, features: torch.Tensor, classes: torch.Tensor, level: int,
                   space: str) -> torch.Tensor:
        """(M,) max_k cos(f_m, P_{level, c_m, k}) in ``space`` ("teacher" or "student")."""
        prototypes = getattr(self, space)[level, classes]  # (M, K, D)
        cos = F.cosine_similarity(features[:, None, :], prototypes, dim=-1)  # (M, K)
        return cos.amax(dim=1)

    def robustness_weight(self, f_s: torch.Tensor, f_t: torch.Tensor, classes: torch.Tensor,
                          level: int) -> torch.Tensor:
        """Eq. 8, detached, not clipped: ``w = 1 - |max_k cos(f^s, P^s) - max_k cos(f^t, P^t)|``.

        Instances of a class without valid prototypes get w = 1.
        """
        with torch.no_grad():
            w = 1.0 - (self.max_cosine(f_s, classes, level, "student")
                       - self.max_cosine(f_t, classes, level, "teacher")).abs()
            return torch.where(self.valid[level, classes], w, torch.ones_like(w))

    def all_relations(self, features: torch.Tensor, level: int, space: str) -> torch.Tensor:
        """(M, C*K) cosines of each feature to every prototype slot of the level, valid or not
        (fixed shape, no host synchronisation; :meth:`valid_columns` marks the valid ones)."""
        prototypes = getattr(self, space)[level].flatten(0, 1)  # (C*K, D)
        return F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).t()

    def valid_columns(self, level: int) -> torch.Tensor:
        """(C*K,) bool: the columns of :meth:`all_relations` that belong to valid classes."""
        k = self.teacher.shape[2]
        return self.valid[level][:, None].expand(-1, k).reshape(-1)
