"""DFD head: partition, constraints and gradients against independent references."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from d2kd.config import get_d2kd_cfg
from d2kd.heads import DFDHead, TeacherOutputs
from d2kd.heads.dfd import shifted_pseudo_huber, upper_quantile
from d2kd.structures import StudentTaps
from d2kd.utils.step_scalars import flush_tensor_scalars

STRIDE = 8


def _head(**dfd):
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = ["p3"]
    cfg.DISTILL.DFD.ALPHA = 1.0
    cfg.DISTILL.DFD.STATS_PERIOD = 1
    for key, value in dfd.items():
        cfg.DISTILL.DFD[key] = value
    shapes = {"p3": ShapeSpec(channels=4, stride=STRIDE)}
    return DFDHead(cfg, shapes, shapes)


def _taps(s, image_sizes):
    n, _, h, w = s.shape
    gt = []
    for _ in range(n):
        inst = Instances((h * STRIDE, w * STRIDE))
        inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
        gt.append(inst)
    images = ImageList(torch.zeros(n, 3, h * STRIDE, w * STRIDE), image_sizes)
    return StudentTaps(images=images, gt_instances=gt, features={"p3": s})


def _maps(seed, n=2, h=9, w=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, h, w, generator=g), torch.randn(n, 4, h, w, generator=g)


def _run(head, s, t, sizes):
    with EventStorage() as storage:
        loss = head(_taps(s, sizes), TeacherOutputs(features={"p3": t}))["loss_kd_dfd_feat"]
        flush_tensor_scalars(storage)  # as DistillationDetector does once per step
        return loss, storage


def test_identical_maps_give_zero_loss():
    s, _ = _maps(0)
    for lenient in ("pseudo_huber", "downweight", "cosine"):
        loss, _ = _run(_head(LENIENT=lenient), s, s.clone(), [(72, 88), (72, 88)])
        assert loss.item() == pytest.approx(0.0, abs=1e-6), lenient


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5])
def test_measured_hard_fraction_is_rho_within_one_cell_per_image(rho):
    s, t = _maps(1)
    sizes = [(72, 88), (40, 56)]  # second image padded: 5 x 7 valid cells of 9 x 11
    head = _head(HARD_FRACTION=rho)
    d = (t - s).pow(2).mean(dim=1)
    from d2kd.heads.masks import box_cell_masks, valid_cell_masks

    valid = valid_cell_masks(sizes, t.shape, STRIDE)[:, 0]
    fg = box_cell_masks(_taps(s, sizes).gt_instances, t.shape, STRIDE)[:, 0].bool()
    hard, _ = head.partition(d, valid, fg)
    for i in range(2):
        count = int(valid[i].sum())
        assert abs(int(hard[i].sum()) - rho * count) <= 1
        assert not (hard[i] & ~valid[i]).any(), "padded cells are never hard"


@pytest.mark.parametrize("options", [{"KAPPA_SCALE": 1e9}, {"HARD_FRACTION": 0.0}],
                         ids=["kappa_to_infinity", "no_hard_cells"])
def test_plain_mse_limits_on_valid_cells(options):
    s, t = _maps(2)
    sizes = [(72, 88), (48, 64)]
    loss, _ = _run(_head(**options), s, t, sizes)
    expected = 0.0
    for i, (h, w) in enumerate(sizes):
        for y in range(math.ceil(h / STRIDE)):
            for x in range(math.ceil(w / STRIDE)):
                expected += sum((t[i, c, y, x] - s[i, c, y, x]).item() ** 2 for c in range(4))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-4)


def test_pseudo_huber_value_and_slope_are_continuous_at_the_threshold():
    e_theta, kappa = torch.tensor(2.5, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    e = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    value = shifted_pseudo_huber(e, e_theta, kappa)
    (slope,) = torch.autograd.grad(value.sum(), e)
    assert value.item() == pytest.approx(2.5)  # strict side: phi_S(e) = e
    assert slope.item() == pytest.approx(1.0)  # strict side slope
    big = torch.tensor([1e4], dtype=torch.float64, requires_grad=True)
    (big_slope,) = torch.autograd.grad(shifted_pseudo_huber(big, e_theta, kappa).sum(), big)
    assert big_slope.item() < 0.05, "lenient: the gradient of a huge gap is damped"
    # d/dS of phi(e) with e = |S - T|^2 stays bounded: phi'(e) * 2 sqrt(e) -> 2 sqrt(kappa)
    assert big_slope.item() * 2 * math.sqrt(1e4) == pytest.approx(2 * math.sqrt(2.5), rel=0.05)


def test_padded_cells_never_count():
    s, t = _maps(3, n=1)
    sizes = [(40, 48)]  # valid cells: 5 x 6
    loss_a, _ = _run(_head(), s, t, sizes)
    s2, t2 = s.clone(), t.clone()
    s2[:, :, 5:, :] += 100.0  # change only padded rows / columns
    s2[:, :, :, 6:] -= 50.0
    loss_b, _ = _run(_head(), s2, t2, sizes)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)


def test_upper_quantile_is_the_kth_value():
    v = torch.tensor([[[5.0, 1.0, 3.0], [4.0, 2.0, 6.0]]])
    mask = torch.ones_like(v, dtype=torch.bool)
    assert upper_quantile(v, mask, 1 / 3).item() == 4.0  # 2 of 6 strictly above
    assert (v > upper_quantile(v, mask, 1 / 3)).sum() == 2


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5, 0.97, 1.0])
def test_upper_quantile_matches_a_per_image_brute_force(rho):
    """Reference: per image, sort the masked values and count round(rho * n) above."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4, 5, 7, generator=g)
    mask = torch.rand(4, 5, 7, generator=g) > 0.3
    mask[2] = False  # an image without valid cells
    got = upper_quantile(values, mask, rho)
    for image in range(4):
        chosen = sorted(values[image][mask[image]].tolist())
        if not chosen:
            assert got[image].item() == float("inf")
            continue
        above = int(round(rho * len(chosen)))
        assert (values[image][mask[image]] > got[image]).sum().item() == above
        if above < len(chosen):
            assert got[image].item() == chosen[len(chosen) - above - 1]


def test_gradients_reach_student_and_adapters_only():
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = ["p3"]
    head = DFDHead(cfg, {"p3": ShapeSpec(channels=3, stride=STRIDE)},
                   {"p3": ShapeSpec(channels=4, stride=STRIDE)})
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, generator=g)  # teacher maps come from a no-grad forward
    with EventStorage():
        loss = head(_taps(s, [(48, 48), (48, 48)]), TeacherOutputs(features={"p3": t}))
    loss["loss_kd_dfd_feat"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert head.aligner.adapters["p3"].weight.grad.abs().sum() > 0
    assert t.grad is None


def test_reversed_and_stats():
    s, t = _maps(5)
    sizes = [(72, 88), (72, 88)]
    normal, storage = _run(_head(), s, t, sizes)
    reversed_, _ = _run(_head(REVERSED=True), s, t, sizes)
    assert normal.item() != pytest.approx(reversed_.item())
    logged = storage.latest()
    for key in ("hard_fraction", "d_easy", "d_hard", "theta"):
        assert f"kd/dfd/{key}/p3" in logged
    assert logged["kd/dfd/d_hard/p3"][0] > logged["kd/dfd/d_easy/p3"][0]


def test_unshifted_pseudo_huber_is_the_specs_literal_formula():
    from d2kd.heads.dfd import shifted_pseudo_huber

    e = torch.tensor([0.0, 0.5, 3.0, 40.0], dtype=torch.float64)
    kappa = torch.full_like(e, 2.0)
    expected = 2 * 2.0 * (torch.sqrt(1 + e / 2.0) - 1)  # 2 kappa (sqrt(1 + e / kappa) - 1)
    torch.testing.assert_close(shifted_pseudo_huber(e, torch.zeros_like(e), kappa), expected)
