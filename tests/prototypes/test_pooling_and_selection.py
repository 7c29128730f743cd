"""PGM prototypes: box pooling and selection against brute-force references."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cosine

from d2kd.prototypes import (
    batched_box_pool,
    box_pool,
    coupled_coefficients,
    density_candidates,
    select_prototypes,
)


def _naive_box_pool(feature, boxes, stride):
    c, h, w = feature.shape
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        cx0 = min(max(math.floor(x1 / stride), 0), w - 1)
        cy0 = min(max(math.floor(y1 / stride), 0), h - 1)
        cx1 = max(min(max(math.floor(x2 / stride), 0), w - 1), cx0)
        cy1 = max(min(max(math.floor(y2 / stride), 0), h - 1), cy0)
        cells = [feature[:, y, x] for y in range(cy0, cy1 + 1) for x in range(cx0, cx1 + 1)]
        out.append(torch.stack(cells).mean(dim=0))
    return torch.stack(out)


def test_box_pool_matches_a_naive_loop_including_edge_and_tiny_boxes():
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(5, 7, 9, generator=g)
    boxes = torch.tensor([
        [0.0, 0.0, 71.9, 55.9],     # the whole map
        [10.0, 12.0, 30.0, 40.0],   # interior
        [3.0, 3.0, 4.0, 4.5],       # tiny: inside one cell
        [-20.0, -5.0, 9.0, 7.0],    # partly outside (top-left)
        [60.0, 50.0, 500.0, 300.0], # partly outside (bottom-right)
        [31.9, 16.0, 32.1, 16.0],   # straddles a cell border, zero height
    ])
    ours = box_pool(feature, boxes, stride=8)
    assert torch.allclose(ours, _naive_box_pool(feature, boxes, 8), atol=1e-6)
    assert box_pool(feature, torch.zeros(0, 4), 8).shape == (0, 5)


def test_batched_box_pool_pools_each_box_from_its_own_image():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(3, 4, 6, 8, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 10.0], [4.0, 8.0, 30.0, 23.0], [8.0, 0.0, 9.0, 1.0],
                          [0.0, 0.0, 31.9, 23.9]])
    images = torch.tensor([2, 0, 2, 1])
    expected = torch.cat([_naive_box_pool(features[i], boxes[k:k + 1], 4)
                          for k, i in enumerate(images.tolist())])
    assert torch.allclose(batched_box_pool(features, boxes, images, 4), expected, atol=1e-6)
    assert batched_box_pool(features, torch.zeros(0, 4), images[:0], 4).shape == (0, 4)


def test_box_pool_gradient():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[2.0, 3.0, 17.0, 30.0], [0.0, 0.0, 3.0, 3.0], [12.0, 4.0, 40.0, 44.0]],
                         dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: box_pool(f, boxes, 4), (feature,))


def _objective_terms(rt, rs, at, as_, wt, ws, alpha):
    return ((rt - wt[:, None] * at) ** 2).sum() + ((rs - ws[:, None] * as_) ** 2).sum() + \
        alpha * ((wt - ws) ** 2).sum()


@pytest.mark.parametrize("alpha", [0.0, 1.0, 10.0])
def test_closed_form_coefficients_are_the_minimiser(alpha):
    g = torch.Generator().manual_seed(2)
    rt, rs = (torch.randn(6, 4, generator=g, dtype=torch.float64),
              torch.randn(6, 3, generator=g, dtype=torch.float64))
    at = F.normalize(torch.randn(4, generator=g, dtype=torch.float64), dim=0)
    as_ = F.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    wt, ws = coupled_coefficients(rt @ at, rs @ as_, alpha)
    # numerical optimum by gradient descent on the (convex) objective
    w = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = _objective_terms(rt, rs, at, as_, w[0], w[1], alpha)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(wt, w[0].detach(), atol=1e-6)
    assert torch.allclose(ws, w[1].detach(), atol=1e-6)


def _brute_force_selection(x_t, x_s, k, alpha, candidates, allow_duplicates=True):
    """Evaluate the full objective for every candidate at every step."""
    xt, xs = F.normalize(x_t.double(), dim=1), F.normalize(x_s.double(), dim=1)
    rt, rs = xt.clone(), xs.clone()
    picks = []
    for _ in range(k):
        best, best_value = None, float("inf")
        for j in candidates.tolist():
            if not allow_duplicates and j in picks:
                continue
            wt, ws = coupled_coefficients(rt @ xt[j], rs @ xs[j], alpha)
            value = _objective_terms(rt, rs, xt[j], xs[j], wt, ws, alpha).item()
            if value < best_value - 1e-12:
                best, best_value = j, value
        wt, ws = coupled_coefficients(rt @ xt[best], rs @ xs[best], alpha)
        rt = rt - wt[:, None] * xt[best]
        rs = rs - ws[:, None] * xs[best]
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed, alpha", [(0, 10.0), (1, 1.0), (2, 50.0)])
def test_cheap_rule_picks_what_brute_force_objective_picks(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    x_t, x_s = torch.randn(40, 8, generator=g), torch.randn(40, 6, generator=g)
    ours = select_prototypes(x_t, x_s, k=6, alpha=alpha, density_filter=False)
    assert ours.tolist() == _brute_force_selection(x_t, x_s, 6, alpha, torch.arange(40))
    with_filter = select_prototypes(x_t, x_s, k=6, alpha=alpha)
    candidates = density_candidates(F.normalize(x_t.double(), dim=1),
                                    F.normalize(x_s.double(), dim=1))
    assert with_filter.tolist() == _brute_force_selection(x_t, x_s, 6, alpha, candidates)


@pytest.mark.parametrize("rule", ["rank", "quantile"])
def test_density_filter_matches_its_definition(rule):
    g = torch.Generator().manual_seed(3)
    x_t = F.normalize(torch.randn(30, 5, generator=g, dtype=torch.float64), dim=1)
    x_s = F.normalize(torch.randn(30, 4, generator=g, dtype=torch.float64), dim=1)
    keep = []
    rhos = []
    for x in (x_t, x_s):
        rho = [sum(math.exp(-((1 - float(x[i] @ x[j])) / 0.1) ** 2) for j in range(30))
               for i in range(30)]
        rhos.append(rho)
    # "rank": above the 13th smallest (index int(0.4 * 30)); "quantile": above the value
    # interpolated at position 0.4 * 29 = 11.6 of the sorted densities.
    bounds = [sorted(r)[12] if rule == "rank" else torch.quantile(torch.tensor(r), 0.4).item()
              for r in rhos]
    for i in range(30):
        if all(r[i] > bound for r, bound in zip(rhos, bounds)):
            keep.append(i)
    assert density_candidates(x_t, x_s, rule).tolist() == keep


def test_alpha_zero_is_independent_energy_matching_pursuit():
    g = torch.Generator().manual_seed(4)
    x_t, x_s = torch.randn(30, 5, generator=g), torch.randn(30, 7, generator=g)
    xt, xs = F.normalize(x_t.double(), dim=1), F.normalize(x_s.double(), dim=1)
    rt, rs, picks = xt.clone(), xs.clone(), []
    for _ in range(5):  # each space: projection coefficients; pick the most energy captured
        energy = ((rt @ xt.t()) ** 2).sum(0) + ((rs @ xs.t()) ** 2).sum(0)
        j = int(energy.argmax())
        rt = rt - (rt @ xt[j])[:, None] * xt[j]
        rs = rs - (rs @ xs[j])[:, None] * xs[j]
        picks.append(j)
    assert select_prototypes(x_t, x_s, 5, alpha=0.0, density_filter=False).tolist() == picks


def test_duplicates_are_allowed_by_default_and_excluded_by_the_switch():
    found = False
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        x_t, x_s = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
        picks = select_prototypes(x_t, x_s, 6, alpha=50.0, density_filter=False).tolist()
        distinct = select_prototypes(x_t, x_s, 6, alpha=50.0, density_filter=False,
                                     allow_duplicates=False).tolist()
        assert len(set(distinct)) == 6
        if len(set(picks)) < len(picks):
            found = True
            assert distinct != picks
    assert found, "the coupled coefficients make repeated picks possible"
    with pytest.raises(ValueError, match="distinct prototypes requested"):
        select_prototypes(torch.randn(3, 2), torch.randn(3, 2), 4, 1.0, density_filter=False,
                          allow_duplicates=False)


def test_bank_robustness_weight_and_relations_follow_eq_8():
    from d2kd.prototypes import PrototypeBank

    g = torch.Generator().manual_seed(5)
    bank = PrototypeBank(["p3", "p4"], num_classes=3, k=2, teacher_dim=4, student_dim=3)
    for cls in (0, 2):  # class 1 has no prototypes on level 1
        bank.set_prototypes(1, cls, torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g))
    f_t, f_s = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)
    classes = torch.tensor([0, 1, 2])
    w = bank.robustness_weight(f_s, f_t, classes, level=1)
    for m, c in enumerate(classes.tolist()):
        if c == 1:
            assert w[m].item() == 1.0
            continue
        best_s = max(cosine(f_s[m], bank.student[1, c, k]) for k in range(2))
        best_t = max(cosine(f_t[m], bank.teacher[1, c, k]) for k in range(2))
        assert w[m].item() == pytest.approx(1 - abs(best_s - best_t), abs=1e-6)
    rel = bank.all_relations(f_t, level=1, space="teacher")
    assert rel.shape == (3, 3 * 2)  # every class x K, valid or not
    assert bank.valid_columns(1).tolist() == [True, True, False, False, True, True]
    assert rel[0, 5].item() == pytest.approx(cosine(f_t[0], bank.teacher[1, 2, 1]), abs=1e-6)
    # identical spaces give w == 1
    same = PrototypeBank(["p3"], 1, 2, 3, 3)
    protos = torch.randn(2, 3, generator=g)
    same.set_prototypes(0, 0, protos, protos)
    f = torch.randn(4, 3, generator=g)
    assert torch.allclose(same.robustness_weight(f, f, torch.zeros(4, dtype=torch.long), 0),
                          torch.ones(4))


def test_bank_lives_in_the_state_dict():
    from d2kd.prototypes import PrototypeBank

    bank = PrototypeBank(["p3"], 2, 3, 4, 5)
    bank.set_prototypes(0, 1, torch.ones(3, 4), torch.ones(3, 5))
    bank.version += 1
    restored = PrototypeBank(["p3"], 2, 3, 4, 5)
    restored.load_state_dict(bank.state_dict())
    assert restored.valid.tolist() == [[False, True]] and int(restored.version) == 1
    assert torch.equal(restored.teacher, bank.teacher)
