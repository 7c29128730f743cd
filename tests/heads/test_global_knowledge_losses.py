"""RDM loss terms against element-by-element transcriptions of Eq. 6-7 and the response loss."""
import math

import pytest
import torch
from conftest import cosine

from d2kd.heads.global_knowledge_losses import (
    global_relation_loss,
    local_feature_loss,
    weighted_response_kl,
)
from d2kd.prototypes import PrototypeBank


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _bank(seed):
    g = torch.Generator().manual_seed(seed)
    bank = PrototypeBank(["p3"], num_classes=2, k=2, teacher_dim=4, student_dim=3)
    for cls in range(2):
        bank.set_prototypes(0, cls, torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g))
    return bank, g


def test_global_relation_loss_transcription():
    bank, g = _bank(0)
    f_s, f_t = torch.randn(3, 3, generator=g), torch.randn(3, 4, generator=g)
    w = torch.tensor([1.0, 0.5, 0.8])
    loss = global_relation_loss(f_s, f_t, w, bank, level=0)
    terms = []
    for m in range(3):
        for cls in range(2):
            for k in range(2):
                a_s = cosine(f_s[m], bank.student[0, cls, k])
                a_t = cosine(f_t[m], bank.teacher[0, cls, k])
                terms.append(_smooth_l1(w[m].item() * a_s - w[m].item() * a_t))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_identical_spaces_give_unit_weights_and_zero_global_loss():
    g = torch.Generator().manual_seed(1)
    bank = PrototypeBank(["p3"], 1, 3, 4, 4)
    protos = torch.randn(3, 4, generator=g)
    bank.set_prototypes(0, 0, protos, protos)
    f = torch.randn(5, 4, generator=g)
    classes = torch.zeros(5, dtype=torch.long)
    w = bank.robustness_weight(f, f, classes, 0)
    assert torch.allclose(w, torch.ones(5))
    assert global_relation_loss(f, f, w, bank, 0).item() == 0.0


def test_local_feature_loss_transcription():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 2, 3, 3, generator=g), torch.randn(1, 2, 3, 3, generator=g)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 0, 0], mask[0, 0, 1, 2] = 0.9, 0.4
    loss = local_feature_loss(s, t, mask, fg_lambda=1.0, bg_lambda=4.0)
    fg_num = fg_den = bg_num = bg_den = 0.0
    for y in range(3):
        for x in range(3):
            sq = sum((s[0, c, y, x].item() - t[0, c, y, x].item()) ** 2 for c in range(2))
            m = mask[0, 0, y, x].item()
            if m > 0:
                fg_num += sq * m
                fg_den += m
            else:
                bg_num += sq
                bg_den += 1
    expected = fg_num / max(1, 2 * 2 * fg_den) + 4.0 * bg_num / max(1, 2 * 2 * bg_den)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_weighted_response_kl_transcription():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    w = torch.tensor([1.0, 0.2, 0.7, 0.0])
    loss = weighted_response_kl(zs, zt, w, temperature=2.0)
    total = 0.0
    for r in range(4):
        ps = [math.exp(v / 2) for v in zs[r].tolist()]
        pt = [math.exp(v / 2) for v in zt[r].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        kl_mean = sum(a * math.log(a / b) for a, b in zip(pt, ps)) / 3
        total += w[r].item() * 4.0 * kl_mean
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)
