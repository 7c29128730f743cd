"""Untrained teachers saved to files, for benchmarks whose cost does not depend on weights."""
import os
import pickle
from dataclasses import replace
from typing import List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode

from d2kd.config.teachers import teacher_specs
from d2kd.modeling.teacher import build_teacher_model
from d2kd.utils.io import atomic_path


def save_random_teachers(cfg: CfgNode, directory: str, model_zoo_format: bool = False,
                         seed: int = 0) -> List[str]:
    """One randomly initialised checkpoint per teacher of ``cfg``, in ``directory``: a d2kd
    ``.pth`` checkpoint, or (``model_zoo_format``) a ``.pkl`` as detectron2's model zoo
    distributes trained models (numpy arrays in a pickle). Returns the paths, in teacher
    order."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"  # the teachers' device (a COCO config may say cuda)
    paths = []
    for spec in teacher_specs(cfg):
        torch.manual_seed(seed + spec.index)
        model = build_teacher_model(replace(spec, weights="(random)"), cfg)[0]
        name = f"teacher{spec.index}"
        if model_zoo_format:
            state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            path = os.path.join(directory, name + ".pkl")
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                pickle.dump({"model": state, "__author__": "d2kd random teacher"}, f)
        else:
            DetectionCheckpointer(model, save_dir=directory).save(name)
            path = os.path.join(directory, name + ".pth")
        paths.append(path)
    return paths
