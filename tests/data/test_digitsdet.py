import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from typing import Dict

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from d2kd.data.digitsdet import (
    AREA_MEDIUM_MAX,
    AREA_SMALL_MAX,
    THING_CLASSES,
    DigitsDetSpec,
    digit_pool_indices,
    generate_digitsdet,
)
from d2kd.data.digitsdet import generator as digitsdet

TINY = DigitsDetSpec(seed=3, num_train=40, num_val=20, num_test=20)
MEDIUM = DigitsDetSpec(seed=5, num_train=120, num_val=60, num_test=60)


def _hashes(root: str) -> Dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _load(root: str, split: str) -> dict:
    with open(os.path.join(root, f"{split}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_root(module_tmp_path_factory) -> str:
    root = str(module_tmp_path_factory.mktemp("tiny") / "digitsdet")
    generate_digitsdet(root, TINY, show_progress=False)
    return root


@pytest.fixture(scope="module")
def medium_root(module_tmp_path_factory) -> str:
    root = str(module_tmp_path_factory.mktemp("medium") / "digitsdet")
    generate_digitsdet(root, MEDIUM, show_progress=False)
    return root


@pytest.mark.slow
def test_regeneration_is_byte_identical(tiny_root, tmp_path):
    again = str(tmp_path / "again")
    generate_digitsdet(again, TINY, show_progress=False)
    expected = _hashes(tiny_root)
    assert len(expected) == 4 + TINY.num_train + TINY.num_val + TINY.num_test
    assert _hashes(again) == expected
    assert sorted(os.listdir(tmp_path)) == ["again"]  # no temporary directory left behind

    other = str(tmp_path / "other")
    generate_digitsdet(other, replace(TINY, seed=4), show_progress=False)
    other_hashes = _hashes(other)
    assert other_hashes.keys() == expected.keys()
    for name in ("train.json", "val.json", "test.json", "train/000000.png", "test/000000.png"):
        assert other_hashes[name] != expected[name]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_annotations_are_valid(tiny_root, split):
    coco = _load(tiny_root, split)
    num_images = {"train": TINY.num_train, "val": TINY.num_val, "test": TINY.num_test}[split]
    assert [img["id"] for img in coco["images"]] == list(range(1, num_images + 1))
    assert [c["name"] for c in coco["categories"]] == THING_CLASSES
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) >= 2 * num_images

    images = {img["id"]: img for img in coco["images"]}
    for img in coco["images"]:
        assert img["file_name"].startswith(f"{split}/")
        with Image.open(os.path.join(tiny_root, img["file_name"])) as f:
            assert f.size == (img["width"], img["height"]) == (TINY.image_width, TINY.image_height)
            assert f.mode == "RGB"
    visible = {i: np.zeros((TINY.image_height, TINY.image_width), np.int32) for i in images}
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert w >= TINY.min_box_side and h >= TINY.min_box_side
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        assert mask.shape == (img["height"], img["width"])
        assert mask.sum() == ann["area"] >= TINY.min_area
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]] == ann["bbox"]
        visible[img["id"]] += mask
    assert max(v.max() for v in visible.values()) == 1  # visible masks never overlap


def test_digit_pools_are_disjoint_stratified():
    pools = digit_pool_indices()
    _, labels = digitsdet._load_digits()
    train, val = pools["train"], pools["val"]
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(labels) == 1797
    assert 0.18 < len(val) / len(labels) < 0.22
    for pool in (train, val):
        assert set(labels[pool].tolist()) == set(range(10))
    assert digit_pool_indices()["val"] is val  # fixed (cached), independent of any dataset seed


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_class_present(medium_root, split):
    counts = Counter(a["category_id"] for a in _load(medium_root, split)["annotations"])
    assert set(counts) == set(range(1, 11))


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_all_coco_scales_and_overlaps_present(medium_root, split):
    coco = _load(medium_root, split)
    areas = np.array([a["area"] for a in coco["annotations"]])
    small, large = np.mean(areas < AREA_SMALL_MAX), np.mean(areas >= AREA_MEDIUM_MAX)
    assert 0.25 < small < 0.55 and 0.25 < 1 - small - large < 0.6 and 0.04 < large < 0.2
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert len(per_image) == len(coco["images"])
    assert max(per_image.values()) <= MEDIUM.max_digits
    boxes = {}
    for a in coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    overlapping = 0
    for b in boxes.values():
        ious = mask_util.iou(b, b, [0] * len(b))
        overlapping += bool((ious[~np.eye(len(b), dtype=bool)] > 0).any())
    assert overlapping >= 0.2 * len(coco["images"])


def test_existing_output_raises_and_failures_leave_nothing(tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        generate_digitsdet(str(existing), TINY, show_progress=False)
    assert os.listdir(existing) == ["keep.txt"]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(digitsdet, "_annotations", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_digitsdet(str(tmp_path / "crashed"), TINY, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "7", "--num-train", "3", "--num-val", "2",
            "--num-test", "2", "--quiet"]
    digitsdet.main(argv)
    assert len(_load(str(out), "train")["images"]) == 3
    assert len(_load(str(out), "val")["images"]) == 2
    assert sorted(os.listdir(out / "train")) == ["000000.png", "000001.png", "000002.png"]
    spec = json.loads((out / "spec.json").read_text())
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    assert DigitsDetSpec(**spec) == DigitsDetSpec(seed=7, num_train=3, num_val=2, num_test=2)


def test_registered_split_is_generated_on_first_use_by_one_process(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2kd.data import ensure_digitsdet, register_digitsdet

    root = str(tmp_path / "digitsdet")
    register_digitsdet(root, name_prefix="digitsdet_lazy")
    assert not os.path.exists(root), "registration alone generates nothing"
    spec = DigitsDetSpec(seed=0, num_train=6, num_val=4, num_test=4)
    with ThreadPoolExecutor(2) as pool:  # concurrent first uses: one generates, one waits
        list(pool.map(lambda _: ensure_digitsdet(root, spec), range(2)))
    dicts = DatasetCatalog.get("digitsdet_lazy_val")
    assert len(dicts) == 4 and all(d["annotations"] for d in dicts)
    assert MetadataCatalog.get("digitsdet_lazy_val").thing_classes == THING_CLASSES


def test_hard_variant_has_more_clutter_and_more_smaller_digits(tiny_root, tmp_path):
    """digitsdet_hard's spec against the default on the same number of images: more
    instances per image, a larger share of small ones (COCO's area ranges), and it is
    registered under its own root from its own spec."""
    from detectron2.data import MetadataCatalog

    from d2kd.data import HARD_SPEC

    assert HARD_SPEC.seed != DigitsDetSpec().seed
    assert HARD_SPEC.min_clutter > DigitsDetSpec().max_clutter // 2
    hard_root = str(tmp_path / "hard")
    generate_digitsdet(hard_root, replace(HARD_SPEC, num_train=40, num_val=20, num_test=2),
                       show_progress=False)

    def stats(root):
        data = _load(root, "train")
        areas = [a["area"] for a in data["annotations"]]
        return (len(data["annotations"]) / len(data["images"]),
                sum(a < AREA_SMALL_MAX for a in areas) / len(areas))

    (default_per_image, default_small), (hard_per_image, hard_small) = (stats(tiny_root),
                                                                        stats(hard_root))
    assert hard_per_image > 1.3 * default_per_image
    assert hard_small > default_small + 0.2
    metadata = MetadataCatalog.get("digitsdet_hard_train")
    assert metadata.image_root.endswith("digitsdet_hard")
    assert metadata.digitsdet_spec["seed"] == HARD_SPEC.seed


def test_a_copy_from_another_spec_is_an_error_naming_the_difference(tiny_root):
    from d2kd.data import ensure_digitsdet

    ensure_digitsdet(tiny_root, TINY)  # its own spec: nothing to do
    ensure_digitsdet(tiny_root)  # no spec given: any copy is accepted
    with pytest.raises(ValueError, match=r"generated from another DigitsDet spec .*seed: 3 != 4"):
        ensure_digitsdet(tiny_root, replace(TINY, seed=4))


def _digit_samples(spec: DigitsDetSpec, split: str, num_images: int) -> set:
    """The load_digits indices drawn into ``num_images`` images of ``split``: the generator's
    own random draws replayed with a recording pool (an independent check of the pools)."""
    drawn = []

    class RecordingPool(np.ndarray):
        def __getitem__(self, item):
            value = super().__getitem__(item)
            drawn.append(int(value))
            return value

    pools = {name: pool.view(RecordingPool) for name, pool in digit_pool_indices().items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digitsdet, "digit_pool_indices", lambda: pools)
        for index in range(num_images):
            digitsdet.generate_image(spec, digitsdet.SPLITS.index(split), index)
    return set(drawn)


def test_test_split_never_shares_a_digit_sample_with_training():
    """Test images draw only digit samples that no training image uses; load_digits has no
    third set of samples, so they come from val's pool (the documented overlap)."""
    spec = DigitsDetSpec(num_train=60, num_val=30, num_test=30)
    train = _digit_samples(spec, "train", spec.num_train)
    val = _digit_samples(spec, "val", spec.num_val)
    test = _digit_samples(spec, "test", spec.num_test)
    assert len(train) > 150 and len(test) > 60  # the replay saw the draws
    assert not test & train and not val & train
    assert test <= set(digit_pool_indices()["val"].tolist())
    assert test != val  # new images: other samples, in another order


def test_a_copy_without_the_test_split_gets_it_added_and_keeps_train_and_val(tiny_root, tmp_path):
    """A copy made before the test split existed (no test.json, spec.json without num_test)
    gets exactly the test split a fresh generation makes; its train and val files stay. A
    copy missing another split's file stays an error (tests/config/test_bad_input.py)."""
    import shutil

    from d2kd.data import ensure_digitsdet

    old = str(tmp_path / "old")
    shutil.copytree(tiny_root, old)
    shutil.rmtree(os.path.join(old, "test"))
    os.remove(os.path.join(old, "test.json"))
    spec = json.loads(open(os.path.join(old, "spec.json")).read())
    del spec["num_test"]
    with open(os.path.join(old, "spec.json"), "w") as f:
        json.dump(spec, f)
    os.makedirs(os.path.join(old, "test"))  # a killed attempt's leftover
    before = _hashes(old)

    ensure_digitsdet(old, TINY)
    after, fresh = _hashes(old), _hashes(tiny_root)
    assert {k: v for k, v in after.items() if k in before and k != "spec.json"} == {
        k: v for k, v in before.items() if k != "spec.json"}
    assert after == fresh  # spec.json now records num_test as a fresh copy does
    assert sorted(os.listdir(tmp_path)) == ["old", "old.lock"]  # no temporary folder left
