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


def clipped_optimizer(optimizer_class: type, *, clip_type: str = "norm",
                      clip_value: float = 10.0, norm_type: float = 2.0,
                      **kwargs) -> torch.optim.Optimizer:
    """``optimizer_class(**kwargs)`` with detectron2's gradient clipping — what
    ``SOLVER.CLIP_GRADIENTS`` gives a yacs run — for LazyConfig recipes:
    ``L(clipped_optimizer)(optimizer_class=torch.optim.AdamW, params=..., lr=...)``.

    ``clip_type``: "value", "norm" (each parameter's gradient) or "full_model"."""
    clipping = CfgNode({"SOLVER": {"CLIP_GRADIENTS": {
        "ENABLED": True, "CLIP_TYPE": clip_type, "CLIP_VALUE": clip_value,
        "NORM_TYPE": norm_type}}})
    return maybe_add_gradient_clipping(clipping, optimizer_class)(**kwargs)

