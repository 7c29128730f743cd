"""Student-only weights in plain detectron2 keys (``model_final_student.pth``).

A distillation checkpoint stores ``student.*`` (the detector) and ``heads.*`` (distillation
heads) tensors. The export keeps the student, strips the ``student.`` prefix, and so loads
into a vanilla detectron2 model built from the student's own config.
"""
import logging
from typing import Dict

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..compat.distributed import unwrap_ddp
from ..utils.io import atomic_save

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


def student_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``student.*`` tensors without the prefix; a plain detector's state passes unchanged."""
    if not any(k.startswith(STUDENT_PREFIX) for k in state):
        return dict(state)
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def export_student(checkpoint_path: str, output_path: str) -> Dict[str, torch.Tensor]:
    """Write the student of ``checkpoint_path`` to ``output_path``; returns its state dict."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    student = student_state_dict(checkpoint["model"])
    atomic_save({"model": student, "__author__": "d2kd export_student",
                 "iteration": checkpoint.get("iteration")}, output_path)
    logger.info("Wrote %d student tensors to %s", len(student), output_path)
    return student


def save_student(model: torch.nn.Module, output_path: str, iteration: int) -> None:
    """Write the student of a (possibly DDP-wrapped) distillation model to ``output_path``."""
    state = student_state_dict(unwrap_ddp(model).state_dict())
    atomic_save({"model": state, "__author__": "d2kd DistillTrainer", "iteration": iteration},
                output_path)
    logger.info("Wrote the student-only weights to %s", output_path)


class StudentExportHook(HookBase):
    """After a completed training, write ``OUTPUT_DIR/model_final_student.pth`` (main process)."""

    def __init__(self, output_path: str):
        self.output_path = output_path

    def after_train(self) -> None:
        if self.trainer.iter < self.trainer.max_iter or not comm.is_main_process():
            return  # detectron2 sets iter = max_iter only after the last step succeeded
        save_student(self.trainer.model, self.output_path, self.trainer.iter)
