"""Build and refresh the prototype banks of a :class:`DistillationDetector` (PGM, Alg. 2).

One refresh: every rank extracts the instance features of its shard of the instance index
(the live student's every time; the active teacher's once, then from a cache file that also
survives a resume), rank 0 selects K prototypes per level and class for every bank and the
banks are broadcast from rank 0, so that all ranks hold identical banks. A class without
indexed instances keeps its previous prototypes (invalid until it has some).
"""
import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.utils import comm

from ..utils.io import atomic_save
from .bank import PrototypeBank
from .extraction import extract_features
from .index import build_instance_index, instances_per_class
from .selection import kmeans_prototypes, select_prototypes

logger = logging.getLogger(__name__)


def prototype_banks(model: torch.nn.Module) -> List[PrototypeBank]:
    """Every distinct :class:`PrototypeBank` inside ``model``."""
    return list({id(m): m for m in model.modules() if isinstance(m, PrototypeBank)}.values())


def refresh_period(cfg: CfgNode, num_train_images: int) -> int:
    """``DISTILL.PROTOTYPES.REFRESH_PERIOD``, or one epoch when it is 0."""
    period = cfg.DISTILL.PROTOTYPES.REFRESH_PERIOD
    return period if period > 0 else max(1, -(-num_train_images // cfg.SOLVER.IMS_PER_BATCH))


class PrototypeRefresher:
    """Refreshes the banks of one distillation model (the module inside DDP, if any)."""

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, dataset_dicts: List[Dict]):
        self.cfg = cfg
        self.model = model
        self.options = cfg.DISTILL.PROTOTYPES
        num_classes = self.banks[0].num_classes
        self.index = build_instance_index(dataset_dicts, num_classes, self.options.MIN_BOX_SIZE,
                                          self.options.MAX_IMAGES_PER_CLASS,
                                          self.options.INDEX_SEED)
        self.counts = instances_per_class(self.index, num_classes)
        if not self.index:
            raise ValueError(
                f"The prototype instance index is empty: no training box of "
                f"{list(cfg.DATASETS.TRAIN)} is larger than DISTILL.PROTOTYPES.MIN_BOX_SIZE = "
                f"{self.options.MIN_BOX_SIZE} px in both sides; lower it.")
        self.classes = torch.cat([image.classes for image in self.index])
        self.cache_dir = os.path.join(cfg.OUTPUT_DIR, "prototypes")
        self._teacher_features: Dict[str, torch.Tensor] = {}
        self._teacher_key = ""
        self.total_seconds = 0.0

    @property
    def banks(self) -> List[PrototypeBank]:
        """The model's banks now (a teacher-schedule stage builds new heads, so new banks)."""
        return prototype_banks(self.model)

    @property
    def levels(self) -> List[str]:
        """The levels the current banks hold prototypes of."""
        return sorted({level for bank in self.banks for level in bank.levels})

    # ---- features --------------------------------------------------------------------------
    def _teacher_cache_key(self) -> Tuple[str, str]:
        """(key, cache file) of the active teacher's instance features: a digest of what they
        are computed from, by content (a teacher retrained at the same path is another key):
        the teacher's weights file (SHA-256) and architecture (parameter names and shapes),
        the levels, test size, input format and the index (files, boxes, classes)."""
        teacher = self.model.teachers[self.model.active_teacher]
        sha = hashlib.sha1(json.dumps({
            "weights": teacher.weights_sha256(), "architecture": teacher.architecture(),
            "levels": self.levels,
            "test_size": [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST],
            "format": self.model.input_format}, sort_keys=True).encode())
        for image in self.index:  # the index itself: files, boxes and classes
            sha.update(image.record["file_name"].encode())
            sha.update(image.boxes.numpy().tobytes())
            sha.update(image.classes.numpy().tobytes())
        key = sha.hexdigest()[:16]
        return key, os.path.join(self.cache_dir, f"teacher_features_{key}.pth")

    def _encoders(self, with_teacher: bool):
        model, student = self.model, self.model.student
        encoders = {"student": lambda images: student.backbone(images.tensor)}
        strides = {"student": {l: student.backbone.output_shape()[l].stride for l in self.levels}}
        if with_teacher:
            teacher = model.teachers[model.active_teacher]
            encoders["teacher"] = lambda images: teacher.features(teacher.normalize(
                images, student.pixel_mean, student.pixel_std, model.input_format))
            strides["teacher"] = {l: teacher.backbone_shapes[l].stride for l in self.levels}
        return encoders, strides

    def _extract(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(teacher, student) level -> (M, D) features; valid on rank 0 only."""
        key, cache_file = self._teacher_cache_key()
        if comm.is_main_process() and key != self._teacher_key and os.path.isfile(cache_file):
            self._teacher_features = torch.load(cache_file, map_location="cpu", weights_only=True)
            self._teacher_key = key
            logger.info("Teacher instance features loaded from %s", cache_file)
        # Rank 0 holds the features, so its answer decides for every rank.
        need_teacher = comm.all_gather(key != self._teacher_key)[0]
        encoders, strides = self._encoders(need_teacher)
        student = self.model.student
        self._share_student_buffers()
        was_training = student.training
        student.eval()
        try:
            features = extract_features(
                self.index, student, encoders, strides, self.model.input_format,
                self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST,
                self.options.EXTRACT_BATCH_SIZE, self.cfg.DATALOADER.NUM_WORKERS)
        finally:
            student.train(was_training)
        if need_teacher and comm.is_main_process():
            self._teacher_features, self._teacher_key = features["teacher"], key
            atomic_save(self._teacher_features, cache_file)
        return self._teacher_features, features.get("student", {})

    def _share_student_buffers(self) -> None:
        """Every rank extracts its shard with rank 0's student buffers (BatchNorm's running
        statistics, which the extraction's eval mode uses). Training keeps each rank's own
        (detectron2's DDP does not broadcast buffers), so without this the shards would be
        pooled by slightly different models, and a resumed run, whose ranks all restart from
        rank 0's checkpointed buffers, would select other prototypes."""
        if comm.get_world_size() == 1:
            return
        for buffer in self.model.student.buffers():
            dist.broadcast(buffer, src=0)

    # ---- selection -------------------------------------------------------------------------
    def _choose(self, x_t: torch.Tensor, x_s: torch.Tensor, k: int):
        if self.options.SELECTION == "kmeans":
            return kmeans_prototypes(x_t, x_s, k, seed=self.options.INDEX_SEED)
        picks = select_prototypes(x_t, x_s, k, self.options.ALPHA,
                                  density_filter=self.options.DENSITY_FILTER,
                                  allow_duplicates=self.options.ALLOW_DUPLICATES,
                                  threshold_rule=self.options.DENSITY_THRESHOLD)
        return x_t[picks], x_s[picks]

    def _select(self, teacher: Dict[str, torch.Tensor], student: Dict[str, torch.Tensor]):
        """Fill every bank on this (main) rank; returns the fraction of distinct prototypes."""
        distinct, total = 0, 0
        for bank in self.banks:
            k = bank.teacher.shape[2]
            for level_index, level in enumerate(bank.levels):
                for cls in range(bank.num_classes):
                    members = (self.classes == cls).nonzero().squeeze(1)
                    if len(members) == 0:
                        continue
                    p_t, p_s = self._choose(teacher[level][members], student[level][members], k)
                    bank.set_prototypes(level_index, cls, p_t.to(bank.teacher),
                                        p_s.to(bank.student))
                    distinct += len(torch.unique(p_t, dim=0))
                    total += k
        return distinct / max(total, 1)

    def _broadcast(self) -> None:
        if comm.get_world_size() == 1:
            return
        for bank in self.banks:
            for buffer in bank.buffers():
                dist.broadcast(buffer, src=0)

    def refresh(self) -> Dict[str, float]:
        """Rebuild every bank; returns statistics (also logged)."""
        start = time.perf_counter()
        teacher, student = self._extract()
        unique = 0.0
        if comm.is_main_process():
            unique = self._select(teacher, student)
        for bank in self.banks:
            bank.version += 1
        self._broadcast()
        seconds = time.perf_counter() - start
        self.total_seconds += seconds
        logger.info("Prototype refresh %d: %d images, instances per class %s, distinct "
                    "prototypes %.0f%%, %.1f s", int(self.banks[0].version), len(self.index),
                    self.counts, 100 * unique, seconds)
        return {"seconds": seconds, "unique_fraction": unique}
