"""DetKDS's ops and distances as the authors' release computes them: every op and distance of
the paper's space, against conftest.py's transcription of the release's operations.py (the
knowledge inputs and the released distillers: test_distillers_fidelity.py).

Reference: github.com/lliai/DetKDS at commit a7d2127f360bfe243125025a94e3e843aa9741e8,
mmdet/distillation/losses/operations.py: the transforms (_TRANS_FUNC1/2/3) and distances
(_DIS_FUNC), each reduced by ``no_weight`` (a mean). Both sides get the same random float64
tensors and random masks (each mask drawn by the release's rule and handed out in the order the
release draws them).
"""
import pytest
import torch
from conftest import relative_error
from helpers.detkds_release import (
    REL_TOL,
    RELEASE_DIS,
    RELEASE_TRANS1,
    RELEASE_TRANS2,
    RELEASE_TRANS3,
    release_as_loss,
    release_kl,
    release_token,
)

from d2kd.heads.detkds import DISTANCES, SLOT_OPS, parse_genome
from d2kd.heads.detkds.genome import transform

# ---- every op and distance of the paper's space ----------------------------------------
RELEASE_SLOTS = {1: RELEASE_TRANS1, 2: RELEASE_TRANS2, 3: RELEASE_TRANS3}
PAPER_OPS = [(slot, name) for slot in (1, 2, 3) for name in SLOT_OPS[slot].names(paper_only=True)]


def test_the_paper_space_is_the_releases():
    for slot, release in RELEASE_SLOTS.items():
        assert sorted(map(release_token, SLOT_OPS[slot].names(paper_only=True))) == sorted(release)
    assert sorted(map(release_token, DISTANCES.names(paper_only=True))) == sorted(RELEASE_DIS)


@pytest.mark.parametrize("slot, name", PAPER_OPS, ids=[f"{s}-{n}" for s, n in PAPER_OPS])
def test_op_is_the_releases(slot, name, release_masks):
    """Same values and the same layout, on a map whose sides are not multiples of 4; d2kd's
    softmax_HW / logsoftmax_HW keep (N, C, H, W) where the release returns (N, C, H*W)."""
    x = torch.randn(4, 3, 7, 5, generator=torch.Generator().manual_seed(slot), dtype=torch.float64)
    ours = SLOT_OPS[slot].get(name)(x)
    reference = RELEASE_SLOTS[slot][release_token(name)](x, release_masks.replay())
    if name.endswith("softmax_HW"):
        ours = ours.flatten(2)
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) < REL_TOL


DISTANCE_INPUTS = {"map": (4, 6, 5, 7), "channel": (4, 6, 35), "batch": (4, 210)}
PAPER_DISTANCES = [d for d in DISTANCES.names(paper_only=True) if d != "kl"]


@pytest.mark.parametrize("layout", sorted(DISTANCE_INPUTS))
@pytest.mark.parametrize("name", PAPER_DISTANCES)
def test_distance_is_the_releases(name, layout):
    """``cos`` is 1 - the release's value (the release returns the similarity)."""
    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(DISTANCE_INPUTS[layout], generator=g, dtype=torch.float64)
            for _ in range(2))
    ours = DISTANCES.get(name)(s, t)
    reference = release_as_loss(release_token(name))(s, t)
    assert relative_error(ours, reference) < REL_TOL


def test_the_releases_kl_is_no_kl_and_ours_is():
    """Why ``kl`` departs: on equal distributions the release's value is not 0 (it reads the
    student side as log-probabilities); on log-probabilities it is NaN-prone (log of < 0)."""
    p = torch.softmax(torch.randn(4, 6, 3, 3, dtype=torch.float64), dim=1)
    assert abs(float(release_kl(p, p))) > 1e-3
    assert float(DISTANCES.get("kl")(p, p, axis="C")) == pytest.approx(0.0, abs=1e-12)


# ---- the random mask: one per tensor ---------------------------------------------------
@pytest.mark.parametrize("op, draws", [("mask", 2), ("mask_shared", 1)])
def test_mask_draws_one_mask_per_tensor(op, draws, release_masks):
    formula = parse_genome(f"global:{op}|no|no|l1|w=1").formulas[0]
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    s, t = transform(formula, x, x.clone())
    assert len(release_masks.drawn) == draws
    assert torch.equal(s, x * release_masks.drawn[0])
    assert torch.equal(t, x * release_masks.drawn[-1])
