"""Teacher ordering by adaptation cost (MTPD): how cheaply can the student imitate a teacher?

Per distilled level, a 1x1 adapter ``A(x) = W x + b`` from the student's FPN map (bilinearly
resized to the teacher's stride) to the teacher's is fitted by **least squares in closed form**
(normal equations accumulated over the probe images: exact, cheaper than SGD and identical on
every process after one all-reduce). The cost of a teacher is the normalised residual

    c = sum_levels sum_{cells, channels} (A(F_S) - F_T)^2 / sum_levels sum (F_T - mean F_T)^2

with the mean per level and channel (so c = 0: a linear map of the student; c = 1: no better
than the teacher's channel means). Order: the non-target teachers by increasing cost, then the
target (the last-listed teacher, the strongest) last.
"""
import functools
import itertools
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class AdapterFit:
    """Sufficient statistics of one level's least-squares 1x1 adapter, accumulated in float64.

    The accumulators live on the device of the features (``device``, or that of the first
    batch given to :meth:`add`), so that accumulating is device-local and the all-reduce uses
    tensors on the process group's device (NCCL: CUDA). Nothing is read back to the host until
    :meth:`residual_and_total`, once per fit.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 device: Optional[torch.device] = None):
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.xx = self.xy = self.yy = self.y = self.count = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        d = self.student_channels + 1  # + bias
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.xx = zeros(d, d)  # sum [x;1][x;1]^T
        self.xy = zeros(d, self.teacher_channels)  # sum [x;1] y^T
        self.yy = zeros(self.teacher_channels)  # sum y_c^2
        self.y = zeros(self.teacher_channels)  # sum y_c
        self.count = zeros(())  # cells

    @property
    def device(self) -> Optional[torch.device]:
        """Where the statistics live (None before the first batch when built without one)."""
        return None if self.xx is None else self.xx.device

    def add(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Add one batch: student (N, C_s, H_s, W_s), teacher (N, C_t, H_t, W_t)."""
        if self.xx is None:
            self._allocate(teacher.device)
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear",
                                    align_corners=False)
        x = student.permute(0, 2, 3, 1).reshape(-1, student.shape[1]).double()
        x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        y = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).double()
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += y.pow(2).sum(0)
        self.y += y.sum(0)
        self.count += len(y)

    def all_reduce(self) -> None:
        """Sum the statistics over processes (every process then fits the same adapter).

        Every process must hold statistics (built with ``device`` or given a batch): a process
        with none would leave the others waiting in the collective."""
        if comm.get_world_size() > 1:
            if self.xx is None:
                raise RuntimeError("AdapterFit.all_reduce before any batch: build it with a "
                                   "device, or add at least one batch on every process.")
            for tensor in (self.xx, self.xy, self.yy, self.y, self.count):
                dist.all_reduce(tensor)

    def residual_and_total_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sum of squared residuals of the best adapter, sum of squares about the mean) as
        0-dim float64 tensors on the statistics' device (no host read)."""
        if self.xx is None:
            raise RuntimeError("AdapterFit has no statistics: add at least one batch.")
        w = torch.linalg.pinv(self.xx) @ self.xy  # (C_s + 1, C_t), minimum-norm LS solution
        residual = self.yy.sum() - 2 * (w * self.xy).sum() + (w * (self.xx @ w)).sum()
        total = (self.yy - self.y.pow(2) / self.count).sum()
        return residual.clamp(min=0.0), total

    def residual_and_total(self) -> Tuple[float, float]:
        """:meth:`residual_and_total_tensors` as floats: one host read, once per fit."""
        residual, total = torch.stack(self.residual_and_total_tensors()).tolist()
        return residual, total


def normalized_residual(fits: Iterable[AdapterFit]) -> float:
    """``c`` of the module docstring over the levels of one teacher."""
    residual = total = 0.0
    for fit in fits:
        r, t = fit.residual_and_total()
        residual, total = residual + r, total + t
    return residual / max(total, 1e-12)


def greedy_order(costs: Dict[int, float], target: int) -> List[int]:
    """Cheapest first, the target last."""
    return sorted((i for i in costs if i != target), key=lambda i: (costs[i], i)) + [target]


@torch.no_grad()
def adaptation_costs(model, batches: Sequence[List[Dict]], candidates: Sequence[int],
                     levels: Sequence[str], load_teacher) -> Dict[int, float]:
    """Cost ``c`` of each candidate teacher for the model's current student.

    Args:
        model: a :class:`DistillationDetector` (its student runs in eval mode here; its
            training mode is restored).
        batches: lists of dataset dicts (detectron2 format) to probe on.
        candidates: teacher indices; ``load_teacher(i)`` returns a :class:`FrozenTeacher`,
            held one at a time.
        levels: FPN levels to fit (``DISTILL.IN_FEATURES``).
    """
    student = model.student
    was_training = student.training
    student.eval()
    try:
        probes = []
        for batch in batches:
            images = student.preprocess_image(batch)
            features = student.backbone(images.tensor)
            probes.append((images, {level: features[level] for level in levels}))
    finally:
        student.train(was_training)
    costs = {}
    for index in candidates:
        teacher = load_teacher(index)
        missing = [level for level in levels if level not in teacher.backbone_shapes]
        if missing:
            raise ValueError(f"DISTILL.SCHEDULE.ORDER 'adaptation_cost' fits DISTILL.IN_FEATURES "
                             f"on every teacher; teacher {index} ({teacher.name}) has no level "
                             f"matching {missing}; distil levels every teacher has, or use "
                             "ORDER 'given'.")
        fits = None
        for images, student_features in probes:
            teacher_features = teacher.features(teacher.normalize(
                images, student.pixel_mean, student.pixel_std, model.input_format),
                student_features)
            if fits is None:
                fits = {level: AdapterFit(student_features[level].shape[1],
                                          teacher_features[level].shape[1],
                                          device=teacher_features[level].device)
                        for level in levels}
            for level in levels:
                fits[level].add(student_features[level], teacher_features[level])
        del teacher
        for fit in fits.values():
            fit.all_reduce()
        costs[index] = normalized_residual(fits.values())
        logger.info("Adaptation cost of teacher %d: %.4f", index, costs[index])
    return costs


def probe_batches(loader: Iterable, num_images: int) -> List[List[Dict]]:
    """The first batches of ``loader`` holding ``num_images`` images (at least one batch)."""
    batches, seen = [], 0
    for batch in itertools.islice(loader, max(num_images, 1)):
        batches.append(batch)
        seen += len(batch)
        if seen >= num_images:
            break
    return batches
