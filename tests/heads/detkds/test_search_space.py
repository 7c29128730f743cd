"""DetKDS search space: ops, distances and genomes against independent references."""
import itertools
import math

import pytest
import torch

from d2kd.heads.detkds.genome import Formula
from d2kd.search import (
    DISTANCES,
    SLOT_OPS,
    GenomeError,
    apply_formula,
    dry_run,
    format_genome,
    parse_genome,
)

X = torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(0))


def test_the_space_has_the_papers_size():
    sizes = [len(SLOT_OPS[s].names(paper_only=True)) for s in (1, 2, 3)]
    sizes.append(len(DISTANCES.names(paper_only=True)))
    assert sizes == [5, 8, 14, 7] and math.prod(sizes) == 3920


def test_d2kds_variants_are_tokens_of_their_own():
    variants = {1: {"natt_pooled", "mask_shared"}, 2: {"s2d_s2", "s2d_s4"},
                3: {"min_max_sample"}}
    for slot, names in variants.items():
        assert set(SLOT_OPS[slot].names()) - set(SLOT_OPS[slot].names(paper_only=True)) == names
    assert (set(DISTANCES.names()) - set(DISTANCES.names(paper_only=True))
            == {"cos_flat", "pearson_flat", "correlation_full"})


def test_a_search_draws_from_the_papers_space_unless_told_otherwise():
    from d2kd.apps.search.space import FormulaSpace

    paper, extended = FormulaSpace("global", 4), FormulaSpace("global", 4, extra_ops=True)
    assert paper.genes["slot2"] == tuple(SLOT_OPS[2].names(paper_only=True))
    assert paper.genes["distance"] == tuple(DISTANCES.names(paper_only=True))
    assert extended.genes["slot1"] == tuple(SLOT_OPS[1].names())
    assert "s2d_s2" in extended.genes["slot2"] and "cos_flat" in extended.genes["distance"]
    assert "local_s1" not in FormulaSpace("instance", 4).genes["slot2"]


@pytest.mark.parametrize("slot, name, shape", [
    (1, "satt", (4, 3, 6, 5)), (1, "catt", (4, 3, 6, 5)), (1, "natt", (4, 3, 6, 5)),
    (1, "natt_pooled", (4, 3, 6, 5)),
    (2, "scale_r2", (4, 3, 3, 3)), (2, "scale_r4", (4, 3, 2, 2)), (2, "local_s1", (4, 90, 1, 1)),
    (2, "local_s2", (4, 27, 2, 2)), (2, "local_s4", (4, 12, 4, 4)), (2, "s2d_s2", (4, 12, 3, 3)),
    (2, "s2d_s4", (4, 48, 2, 2)), (2, "affine", (4, 3, 6, 5)),
    (3, "batch", (4, 90)), (3, "channel", (4, 3, 30)), (3, "norm_HW", (4, 3, 6, 5)),
    (3, "softmax_N", (4, 3, 6, 5)), (3, "min_max", (4, 3, 6, 5)),
    (3, "min_max_sample", (4, 3, 6, 5)), (3, "batchnorm", (4, 3, 6, 5)),
])
def test_op_output_shapes(slot, name, shape):
    assert tuple(SLOT_OPS[slot].get(name)(X).shape) == shape


def test_attention_ops_match_their_formulas():
    x = X
    a = x.abs().mean(dim=1)  # (N, H, W)
    for n in range(2):
        weights = torch.softmax(a[n].flatten() / 0.5, dim=0).view(6, 5)
        expected = x[n] * torch.sqrt(30 * weights)
        assert torch.allclose(SLOT_OPS[1].get("satt")(x)[n], expected, atol=1e-6)
    g = torch.softmax(x.abs().mean(dim=(2, 3)) / 0.5, dim=1)
    assert torch.allclose(SLOT_OPS[1].get("catt")(x), x * torch.sqrt(3 * g)[:, :, None, None],
                          atol=1e-6)
    # natt (the release's): every value replaced by N * its softmax over the batch
    e = torch.exp(x / 0.5)
    assert torch.allclose(SLOT_OPS[1].get("natt")(x), 4 * e / e.sum(dim=0), atol=1e-6)
    # natt_pooled (d2kd's variant): one weight per sample, from mean |F|, scaling F
    w = torch.softmax(x.abs().mean(dim=(1, 2, 3)) / 0.5, dim=0)
    assert torch.allclose(SLOT_OPS[1].get("natt_pooled")(x), x * 4 * w[:, None, None, None])


def test_local_keeps_each_patch_spatial_and_moves_the_patch_grid_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = SLOT_OPS[2].get("local_s2")(x)
    # channel i*2 + j holds patch (i, j) of the 2x2 grid: patch (0, 1) is x[0:2, 2:4]
    assert y.shape == (1, 4, 2, 2)
    assert y[0, 1].tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert y[0, 2].tolist() == [[8.0, 9.0], [12.0, 13.0]]
    assert SLOT_OPS[2].get("local_s1")(x).flatten().tolist() == x.flatten().tolist()


def test_space_to_depth_moves_the_offsets_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = SLOT_OPS[2].get("s2d_s2")(x)
    # cell (0, 0) of the 2x2 grid holds x[0:2, 0:2] = [0, 1, 4, 5] across the 4 channels
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_normalisations_and_distributions():
    assert torch.allclose(SLOT_OPS[3].get("norm_C")(X).norm(dim=1), torch.ones(4, 6, 5), atol=1e-5)
    assert torch.allclose(SLOT_OPS[3].get("norm_N")(X).norm(dim=0), torch.ones(3, 6, 5), atol=1e-5)
    sm = SLOT_OPS[3].get("softmax_HW")(X)
    assert torch.allclose(sm.flatten(2).sum(-1), torch.ones(4, 3), atol=1e-5)
    mm = SLOT_OPS[3].get("min_max")(X)  # over the whole batch tensor
    assert mm.min().item() == 0.0 and mm.max().item() == pytest.approx(1.0)
    assert (mm.flatten(1).max(1).values < 1 - 1e-6).any()
    mm = SLOT_OPS[3].get("min_max_sample")(X).flatten(1)  # per sample
    assert (torch.allclose(mm.min(1).values, torch.zeros(4))
            and torch.allclose(mm.max(1).values, torch.ones(4)))


@pytest.mark.parametrize("name", ["l1", "l2", "smooth_l1", "cos", "cos_flat", "pearson",
                                  "pearson_flat", "kl"])
def test_identical_inputs_give_zero(name):
    p = torch.softmax(X, dim=1)
    assert DISTANCES.get(name)(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_is_a_true_kl_and_cos_is_one_minus_cosine():
    g = torch.Generator().manual_seed(1)
    s, t = (torch.softmax(torch.randn(2, 3, generator=g), 1),
            torch.softmax(torch.randn(2, 3, generator=g), 1))
    expected = sum(sum(t[i, c] * math.log(t[i, c] / s[i, c]) for c in range(3))
                   for i in range(2)) / 2
    assert DISTANCES.get("kl")(s, t, axis="C").item() == pytest.approx(float(expected), rel=1e-5)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    cos = [float(a[i] @ b[i]) / float(a[i].norm() * b[i].norm()) for i in range(3)]
    assert DISTANCES.get("cos")(a, b).item() == pytest.approx(sum(1 - c for c in cos) / 3, rel=1e-5)
    assert DISTANCES.get("kl")(s, t, axis="C").item() > 0


def test_cos_and_pearson_measure_along_channels_their_flat_variants_per_sample():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    cells = [(a[n, :, i, j], b[n, :, i, j]) for n in range(2) for i in range(4) for j in range(5)]
    per_cell = [1 - float(u @ v) / float(u.norm() * v.norm()) for u, v in cells]
    assert DISTANCES.get("cos")(a, b).item() == pytest.approx(sum(per_cell) / 40, rel=1e-5)
    ac, bc = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    assert DISTANCES.get("pearson")(a, b).item() == pytest.approx(
        DISTANCES.get("cos")(ac, bc).item(), rel=1e-5)
    fa, fb = a.flatten(1), b.flatten(1)
    assert DISTANCES.get("cos_flat")(a, b).item() == pytest.approx(
        DISTANCES.get("cos")(fa, fb).item(), rel=1e-6)
    assert DISTANCES.get("pearson_flat")(a, b).item() == pytest.approx(
        DISTANCES.get("cos")(fa - fa.mean(1, keepdim=True), fb - fb.mean(1, keepdim=True)).item(),
        rel=1e-5)


def test_l1_l2_smooth_l1_references():
    a, b = torch.tensor([0.0, 2.0, -0.5]), torch.tensor([0.5, 0.0, -0.5])
    assert DISTANCES.get("l1")(a, b).item() == pytest.approx((0.5 + 2 + 0) / 3)
    assert DISTANCES.get("l2")(a, b).item() == pytest.approx((0.25 + 4 + 0) / 3)
    assert DISTANCES.get("smooth_l1")(a, b).item() == pytest.approx((0.125 + 1.5 + 0) / 3)


CANONICAL = [
    "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2",
    "instance:catt|scale_r1|norm_C|l1|w=50",
    "global:mask|scale_r1|softmax_C|kl|w=0.5;logit:no|no|no|l2|w=1",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_genome_round_trip_and_dry_run(text):
    genome = parse_genome(text)
    assert format_genome(genome) == text
    dry_run(genome, batch_size=4)


def test_non_canonical_order_is_canonicalised():
    text = "fgbg:no|local_s4|norm_HW|l1|w=2.0;global:catt|scale_r2|norm_N|l1|w=6"
    assert format_genome(parse_genome(text)) == CANONICAL[0]


@pytest.mark.parametrize("text, bad", [
    ("global:catt|scale_r3|norm_N|l1|w=6", "'scale_r3'"),
    ("global:catt|scale_r2|norm_N|l7|w=6", "'l7'"),
    ("globl:catt|scale_r2|norm_N|l1|w=6", "'globl'"),
    ("global:catt|scale_r2|norm_N|l1|x=6", "'x=6'"),
    ("global:catt|scale_r2|norm_N|l1|w=abc", "'w=abc'"),
    ("global:catt|scale_r2|norm_N|l1", "expected slot1|slot2|slot3|distance|w=<weight>"),
    ("global:catt|scale_r2|norm_N|kl|w=1", "'kl' needs a distribution slot 3"),
    ("instance:catt|scale_r2|norm_C|l1|w=1", "'scale_r2' changes the spatial layout"),
    ("instance:catt|local_s1|norm_C|l1|w=1", "'local_s1' changes the spatial layout"),
    ("instance:catt|s2d_s2|norm_C|l1|w=1", "'s2d_s2' changes the spatial layout"),
    ("instance:catt|no|batch|l1|w=1", "'batch' reshapes"),
    ("logit:catt|no|no|l1|w=1", "only slot 3 applies"),
    ("global:no|no|no|l1|w=1;global:no|no|no|l2|w=1", "more than once"),
])
def test_invalid_genomes_name_the_bad_token(text, bad):
    with pytest.raises(GenomeError, match=bad.replace("|", r"\|").replace("(", r"\(")):
        parse_genome(text)


@pytest.mark.parametrize("name, least", [("correlation", 2), ("correlation_full", 4)])
def test_correlation_needs_a_batch(name, least):
    genome = parse_genome(f"global:no|no|no|{name}|w=1")
    dry_run(genome, batch_size=least)
    with pytest.raises(GenomeError, match=f"at least {least}"):
        dry_run(genome, batch_size=least - 1)


def test_every_valid_formula_of_the_space_dry_runs():
    """Exhaustive over slots and distances (d2kd's variants included) for the global input."""
    count = 0
    s, t = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    for s1, s2, s3, d in itertools.product(SLOT_OPS[1].names(), SLOT_OPS[2].names(),
                                           SLOT_OPS[3].names(), DISTANCES.names()):
        try:
            formula = parse_genome(f"global:{s1}|{s2}|{s3}|{d}|w=1").formulas[0]
        except GenomeError:
            continue
        value = apply_formula(formula, s, t)
        assert value.dim() == 0 and torch.isfinite(value), str(formula)
        count += 1
    assert count > 3000
    assert isinstance(formula, Formula)


def test_bad_genome_in_a_config_fails_at_build_time():
    from detectron2.layers import ShapeSpec

    from d2kd.config import get_d2kd_cfg
    from d2kd.heads import DetKDSHead

    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = ["p3"]
    cfg.DISTILL.DETKDS.GENOME = "global:catt|scale_r2|norm_Q|l1|w=6"
    shapes = {"p3": ShapeSpec(channels=4, stride=8)}
    with pytest.raises(ValueError,
                       match="DISTILL.DETKDS.GENOME: global: unknown slot-3 op 'norm_Q'"):
        DetKDSHead(cfg, shapes, shapes)


def test_global_input_is_the_formula_on_the_aligned_maps():
    from detectron2.layers import ShapeSpec

    from d2kd.config import get_d2kd_cfg
    from d2kd.heads import DetKDSHead, TeacherOutputs
    from d2kd.structures import StudentTaps

    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = ["p3", "p4"]
    cfg.DISTILL.DETKDS.GENOME = "global:catt|scale_r2|norm_N|l1|w=6"
    shapes = {"p3": ShapeSpec(channels=4, stride=8), "p4": ShapeSpec(channels=4, stride=16)}
    head = DetKDSHead(cfg, shapes, shapes)
    g = torch.Generator().manual_seed(7)
    s = {l: torch.randn(2, 4, 6, 6, generator=g) for l in ("p3", "p4")}
    t = {l: torch.randn(2, 4, 6, 6, generator=g) for l in ("p3", "p4")}
    loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_detkds_global"]
    expected = 0.0
    for l in ("p3", "p4"):  # catt -> 2x2 max-pool -> L2 over the batch axis -> mean |.| x 6
        cs = s[l] * torch.sqrt(
            4 * torch.softmax(s[l].abs().mean((2, 3)) / 0.5, 1))[:, :, None, None]
        ct = t[l] * torch.sqrt(
            4 * torch.softmax(t[l].abs().mean((2, 3)) / 0.5, 1))[:, :, None, None]
        ps, pt = torch.nn.functional.max_pool2d(cs, 2), torch.nn.functional.max_pool2d(ct, 2)
        ns, nt = ps / ps.norm(dim=0, keepdim=True), pt / pt.norm(dim=0, keepdim=True)
        expected += 6 * (ns - nt).abs().mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["satt", "catt"])
def test_attention_gradients_stay_finite_where_the_softmax_underflows(name):
    # mean |F| differing by hundreds between channels / cells: softmax weights underflow to 0
    x = torch.ones(2, 4, 3, 3)
    x[:, 0] = 500.0
    x[:, :, 0, 0] = 400.0
    x.requires_grad_(True)
    SLOT_OPS[1].get(name)(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_full_correlation_distance_equals_the_explicit_cross_correlation_matrix_loss():
    """Reference: the (D, D) matrix written out, as in the formula (Barlow-Twins style)."""
    from d2kd.heads.detkds.ops import DISTANCES

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    a, b = s.flatten(1).double(), t.flatten(1).double()
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    d = a.shape[1]
    c = [[sum(a[n, i] * b[n, j] for n in range(6)) / 6 for j in range(d)] for i in range(d)]
    on = sum((c[i][i] - 1) ** 2 for i in range(d)) / d
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d ** 2
    value = DISTANCES.get("correlation_full")(s, t).item()
    assert value == pytest.approx(float(on + off), rel=1e-5)
    # "correlation" (the release's): log2 of the diagonal term alone, sum |C_ii - 1|^2.02
    diagonal = sum(abs(float(c[i][i]) - 1) ** 2.02 for i in range(d))
    assert DISTANCES.get("correlation")(s, t).item() == pytest.approx(math.log2(diagonal), rel=1e-5)
