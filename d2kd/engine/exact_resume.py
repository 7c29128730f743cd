"""Bit-exact ``--resume``: random state and data position as functions of the iteration.

detectron2 restores the model, optimizer and scheduler on resume, but not the random number
generators (MGD's masks, data augmentation, re-initialised heads) nor the position of the
data stream: a resumed run restarts the sampler. This hook makes both a function of the
iteration: every step starts from RNGs seeded with ``(seed, iteration, rank)``, and a resumed
run replays the data stream up to its start iteration (batch ``i`` loaded under the seeds of
step ``i``, as in an uninterrupted run), so that it continues exactly where it stopped. Two
more states detectron2 leaves out are handled: the dense detectors' loss-normaliser moving
averages (Python attributes, not buffers) go into the checkpoint, and TorchScript graph
optimisation is off during training (focal loss is scripted; its optimised graph, used from
the second call on, rounds differently from the first calls a resumed process makes).
"""
import logging
import time
from typing import Dict

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..compat.distributed import unwrap_ddp
from ..compat.engine import data_loader_iterator

logger = logging.getLogger(__name__)


EMA_ATTRIBUTE = "loss_normalizer"  # DenseDetector._ema_update's moving average


def step_seed(base_seed: int, iteration: int, rank: int) -> int:
    """A 31-bit seed for one step of one process."""
    return int(np.random.SeedSequence([base_seed, iteration, rank]).generate_state(1)[0] >> 1)


class ExactResumeHook(HookBase):
    """Reseeds every step; on resume, fast-forwards the data iterator. Register it first so
    that it seeds before any other hook's ``before_step``."""

    def __init__(self, seed: int):
        """``seed < 0``: a random base seed, drawn once and kept in the checkpoints."""
        self.seed = seed if seed >= 0 else comm.shared_random_seed()
        self._no_jit_optimization = torch.jit.optimized_execution(False)

    def _dense_detectors(self) -> Dict[str, DenseDetector]:
        model = unwrap_ddp(self.trainer.model)
        return {name: m for name, m in model.named_modules() if isinstance(m, DenseDetector)}

    def _reseed(self, iteration: int) -> None:
        seed_all_rng(step_seed(self.seed, iteration, comm.get_rank()))

    def before_train(self) -> None:
        self._no_jit_optimization.__enter__()
        start = self.trainer.iter
        if start == 0:
            return
        began = time.perf_counter()
        data = data_loader_iterator(self.trainer)
        for iteration in range(start):
            self._reseed(iteration)
            next(data)
        logger.info("Replayed the data stream up to iteration %d in %.1f s (exact resume)",
                    start, time.perf_counter() - began)

    def before_step(self) -> None:
        self._reseed(self.trainer.iter)

    def after_train(self) -> None:
        self._no_jit_optimization.__exit__(None, None, None)

    def state_dict(self):
        normalizers = {name: getattr(m, EMA_ATTRIBUTE) for name, m in
                       self._dense_detectors().items() if hasattr(m, EMA_ATTRIBUTE)}
        return {"seed": self.seed, "loss_normalizers": normalizers}

    def load_state_dict(self, state_dict) -> None:
        self.seed = state_dict["seed"]
        detectors = self._dense_detectors()
        for name, value in state_dict.get("loss_normalizers", {}).items():
            setattr(detectors[name], EMA_ATTRIBUTE, value)
