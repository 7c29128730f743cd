"""Student-only weights in plain detectron2 keys (``model_final_student.pth``).

A distillation checkpoint stores ``student.*`` (the detector) and ``heads.*`` (distillation
heads) tensors. The export keeps the student, strips the ``student.`` prefix, and so loads
into a vanilla detectron2 model built from the student's own config, which is written next
to the weights when the distillation config is given (:mod:`.student_config`).
"""
import logging
from typing import Dict, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch import nn

from ..compat.cpu_distributed import unwrap_ddp
from ..modeling.weights import STUDENT_PREFIX
from ..utils.io import atomic_save
from .student_config import write_student_config

logger = logging.getLogger(__name__)



def student_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``student.*`` tensors without the prefix; a plain detector's state passes unchanged."""
    if not any(k.startswith(STUDENT_PREFIX) for k in state):
        return dict(state)
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def build_student(cfg: CfgNode, checkpoint_path: str) -> nn.Module:
    """The model of the student config ``cfg`` with the student tensors of ``checkpoint_path``
    (a distillation checkpoint or student-only weights) loaded strictly, in eval mode."""
    model = build_model(cfg)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(student_state_dict(checkpoint["model"]))
    return model.eval()


def export_student(checkpoint_path: str, output_path: str,
                   cfg: Optional[CfgNode] = None) -> Dict[str, torch.Tensor]:
    """Write the student of ``checkpoint_path`` to ``output_path`` and, given the run's config
    ``cfg``, the student's plain config next to it; returns the student's state dict."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    student = student_state_dict(checkpoint["model"])
    atomic_save({"model": student, "__author__": "d2kd export_student",
                 "iteration": checkpoint.get("iteration")}, output_path)
    logger.info("Wrote %d student tensors to %s", len(student), output_path)
    if cfg is not None:
        write_student_config(cfg, output_path)
    return student


def save_student(model: nn.Module, output_path: str, iteration: int,
                 cfg: Optional[CfgNode] = None) -> None:
    """Write the student of a (possibly DDP-wrapped) distillation model to ``output_path`` and,
    given the model's config ``cfg``, the student's plain config next to it."""
    state = student_state_dict(unwrap_ddp(model).state_dict())
    atomic_save({"model": state, "__author__": "d2kd DistillTrainer", "iteration": iteration},
                output_path)
    logger.info("Wrote the student-only weights to %s", output_path)
    if cfg is not None:
        write_student_config(cfg, output_path)


class StudentExportHook(HookBase):
    """After a completed training, write ``OUTPUT_DIR/model_final_student.pth`` and its plain
    config ``model_final_student.yaml`` (main process). A failed or interrupted run never
    writes it, and neither does a resumed run that had nothing left to train (the export of
    the finished run stays as it was)."""

    def __init__(self, output_path: str):
        self.output_path = output_path

    def after_train(self) -> None:
        if self.trainer.iter < self.trainer.max_iter or not comm.is_main_process():
            return  # detectron2 sets iter = max_iter only after the last step succeeded
        if self.trainer.start_iter >= self.trainer.max_iter:
            return  # nothing trained here: a finished run, resumed
        save_student(self.trainer.model, self.output_path, self.trainer.iter, self.trainer.cfg)
