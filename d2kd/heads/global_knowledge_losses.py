"""RDM losses of global-knowledge distillation (Tang et al., ECCV 2022), as functions.

Transcribed from docs/methods/global_knowledge.md (Eq. 6-8). The head that applies them
to a detector's KD instances builds on these; each is tested against an independent
element-by-element transcription.
"""
import torch
import torch.nn.functional as F

from ..prototypes.bank import PrototypeBank


def global_relation_loss(f_s: torch.Tensor, f_t: torch.Tensor, w: torch.Tensor,
                         bank: PrototypeBank, level: int) -> torch.Tensor:
    """Eq. 6 on one level: mean smooth-L1 (beta 1) between ``w * A^s`` and ``w * A^t``, where
    A (M, V*K) are the cosines of each instance to every valid prototype of the level.

    Args:
        f_s: (M, D_s), f_t: (M, D_t) pooled instance features; w: (M,) robustness weights.

    Computed over every prototype slot with the invalid classes' columns masked out (fixed
    shapes: no boolean indexing, no host synchronisation); 0 without valid prototypes.
    """
    a_s = bank.all_relations(f_s, level, "student")  # (M, C*K)
    a_t = bank.all_relations(f_t, level, "teacher")
    valid = bank.valid_columns(level)  # (C*K,)
    elementwise = F.smooth_l1_loss(w[:, None] * a_s, w[:, None] * a_t, beta=1.0, reduction="none")
    total = torch.where(valid, elementwise, elementwise.new_zeros(())).sum()
    return total / (len(f_s) * valid.sum()).clamp(min=1)


def local_feature_loss(student: torch.Tensor, teacher: torch.Tensor, fg_weights: torch.Tensor,
                       fg_lambda: float, bg_lambda: float) -> torch.Tensor:
    """Eq. 7 on one level.

    ``fg_lambda * sum(d^2 M) / max(1, 2 D sum M) + bg_lambda * sum(d^2 B) / max(1, 2 D sum B)``
    with d = adapted student - teacher (N, D, H, W), M (N, 1, H, W) the foreground mask holding
    each KD box's robustness weight, and B the cells where M <= 0 (background; as released, a
    cell holding a negative weight is in both terms).
    """
    channels = student.shape[1]
    background = (fg_weights <= 0).to(fg_weights.dtype)
    # Both terms as one per-cell weight on the channel-summed squares (N, 1, H, W): the masks
    # do not depend on the channel, and full-size products would cost more than the loss.
    cell_weights = (fg_lambda * fg_weights / torch.clamp(2 * channels * fg_weights.sum(), min=1.0)
                    + bg_lambda * background
                    / torch.clamp(2 * channels * background.sum(), min=1.0))
    return ((student - teacher).pow(2).sum(dim=1, keepdim=True) * cell_weights).sum()


def weighted_response_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         w: torch.Tensor, temperature: float) -> torch.Tensor:
    """Local response loss: ``(1/R) sum_r w_r T^2 mean_c p^t (log p^t - log p^s)`` with
    ``p = softmax(z / T)`` over the K class logits (R, K)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    per_instance = (log_p_t.exp() * (log_p_t - log_p_s)).mean(dim=1)
    return (w * per_instance).mean() * temperature ** 2
