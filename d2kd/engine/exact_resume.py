"""Exact, cheap ``--resume``: random state and data position as functions of the iteration.

detectron2 restores the model, optimizer and scheduler on resume, but not the random number
generators (MGD's masks, re-initialised heads) nor the position of the data stream: a resumed
run restarts its sampler. With this hook both are functions of the iteration:

- the training loader is d2kd's :func:`~d2kd.data.step_loader.build_step_train_loader`, whose
  batch of iteration ``i`` (images and their augmentation) depends on ``(SEED, i)`` only; a
  resumed run positions it at its start iteration in O(1): no past batch is loaded again;
- every step starts from RNGs seeded with ``(SEED, iteration, rank)``.

Two more states detectron2 leaves out are handled: the dense detectors' loss-normaliser
moving averages (Python attributes, not buffers, and each process's own: its images' positive
anchors) go into the checkpoint, every rank's (gathered on the steps a checkpoint follows),
and TorchScript graph optimisation is off during training (focal loss is scripted; its
optimised graph, used from the second call on, rounds differently from the first calls a
resumed process makes). On CPU
with ``DATALOADER.NUM_WORKERS`` of any value the resumed run is bit-identical to an
uninterrupted one (every image is augmented from its own seed, whichever process maps it);
on CUDA, kernels that are not deterministic (atomics in backward passes) make it close, not
bit-identical, unless ``torch.use_deterministic_algorithms`` is on.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..compat.cpu_distributed import unwrap_ddp
from ..compat.trainer_internals import restart_data_loader
from ..data.step_sampler import StepBatchSampler, derived_seed

logger = logging.getLogger(__name__)


EMA_ATTRIBUTE = "loss_normalizer"  # DenseDetector._ema_update's moving average
_STEP = 5  # derived_seed key of per-step model randomness (after step_sampler's)


def step_seed(base_seed: int, iteration: int, rank: int) -> int:
    """A 31-bit seed for one step of one process."""
    return derived_seed(base_seed, _STEP, iteration, rank)


class ExactResumeHook(HookBase):
    """Reseeds every step; positions the training stream at the start iteration. Register it
    first so that it seeds before any other hook's ``before_step``.

    Args:
        sampler: the training loader's batch sampler.
        checkpoint_period: ``SOLVER.CHECKPOINT_PERIOD``; with ``max_iter``, which steps
            detectron2's ``PeriodicCheckpointer`` follows with a checkpoint.
        max_iter: the run's last iteration + 1.
    """

    def __init__(self, sampler: StepBatchSampler, checkpoint_period: int, max_iter: int):
        self.sampler = sampler
        self.checkpoint_period = checkpoint_period
        self.max_iter = max_iter
        self._no_jit_optimization = torch.jit.optimized_execution(False)
        self._gathered_normalizers: Optional[List[Dict[str, float]]] = None

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def _dense_detectors(self) -> Dict[str, DenseDetector]:
        model = unwrap_ddp(self.trainer.model)
        return {name: m for name, m in model.named_modules() if isinstance(m, DenseDetector)}

    def _reseed(self, iteration: int) -> None:
        seed_all_rng(step_seed(self.seed, iteration, comm.get_rank()))

    def before_train(self) -> None:
        self._no_jit_optimization.__enter__()
        if self.sampler.start_iter != self.trainer.iter:
            self.sampler.start_iter = self.trainer.iter
            restart_data_loader(self.trainer)
            logger.info("Training stream positioned at iteration %d (exact resume)",
                        self.trainer.iter)

    def before_step(self) -> None:
        self._reseed(self.trainer.iter)

    def after_step(self) -> None:
        # Runs before the checkpointer's after_step (this hook is first): every rank's moving
        # averages reach rank 0, which writes the checkpoint. One gather per checkpoint.
        iteration = self.trainer.iter
        if comm.get_world_size() > 1 and ((iteration + 1) % self.checkpoint_period == 0
                                          or iteration >= self.max_iter - 1):
            self._gathered_normalizers = comm.all_gather(self._normalizers())

    def after_train(self) -> None:
        self._no_jit_optimization.__exit__(None, None, None)

    def _normalizers(self) -> Dict[str, float]:
        return {name: getattr(m, EMA_ATTRIBUTE) for name, m in
                self._dense_detectors().items() if hasattr(m, EMA_ATTRIBUTE)}

    def state_dict(self):
        per_rank = self._gathered_normalizers or [self._normalizers()]
        return {"seed": self.seed, "loss_normalizers": per_rank}

    def load_state_dict(self, state_dict) -> None:
        self.sampler.seed = state_dict["seed"]  # a drawn SEED (< 0 in the config) persists
        per_rank = state_dict.get("loss_normalizers", [])
        if isinstance(per_rank, dict):  # written by d2kd 0.1 (one process's) -- still read
            per_rank = [per_rank]
        if not per_rank:
            return
        rank = comm.get_rank()  # another number of processes resumes from rank 0's
        detectors = self._dense_detectors()
        for name, value in per_rank[rank if rank < len(per_rank) else 0].items():
            setattr(detectors[name], EMA_ATTRIBUTE, value)
