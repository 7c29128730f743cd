"""Optimizers from ``SOLVER.OPTIMIZER``: detectron2's SGD, or AdamW for from-scratch CPU recipes."""
import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's parameter groups (norm/bias decay and LR factors) and gradient clipping."""
    solver = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
    )
    if solver.OPTIMIZER == "SGD":
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
            params, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )
    if solver.OPTIMIZER == "AdamW":
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=solver.BASE_LR, betas=tuple(solver.BETAS), weight_decay=solver.WEIGHT_DECAY,
        )
    raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r} is not one of 'SGD', 'AdamW'.")
