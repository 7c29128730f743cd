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
import itertools
import logging
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class AdapterFit:
    """Sufficient statistics of one level's least-squares 1x1 adapter, accumulated in float64."""

    def __init__(self, student_channels: int, teacher_channels: int):
        d = student_channels + 1  # + bias
        self.xx = torch.zeros(d, d, dtype=torch.float64)  # sum [x;1][x;1]^T
        self.xy = torch.zeros(d, teacher_channels, dtype=torch.float64)  # sum [x;1] y^T
        self.yy = torch.zeros(teacher_channels, dtype=torch.float64)  # sum y_c^2
        self.y = torch.zeros(teacher_channels, dtype=torch.float64)  # sum y_c
        self.count = torch.zeros((), dtype=torch.float64)  # cells

    def add(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Add one batch: student (N, C_s, H_s, W_s), teacher (N, C_t, H_t, W_t)."""
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
        """Sum the statistics over processes (every process then fits the same adapter)."""
        if comm.get_world_size() > 1:
            for tensor in (self.xx, self.xy, self.yy, self.y, self.count):
                dist.all_reduce(tensor)

    def residual_and_total(self) -> Tuple[float, float]:
        """(sum of squared residuals of the best adapter, sum of squares about the mean)."""
        w = torch.linalg.pinv(self.xx) @ self.xy  # (C_s + 1, C_t), minimum-norm LS solution
        residual = self.yy.sum() - 2 * (w * self.xy).sum() + (w * (self.xx @ w)).sum()
        total = (self.yy - self.y.pow(2) / self.count).sum()
        return max(float(residual), 0.0), float(total)


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
        fits = None
        for images, student_features in probes:
            teacher_features = teacher.features(teacher.normalize(
                images, student.pixel_mean, student.pixel_std, model.input_format))
            if fits is None:
                fits = {level: AdapterFit(student_features[level].shape[1],
                                          teacher_features[level].shape[1]) for level in levels}
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
