"""Instance index, instance-feature extraction and the distributed prototype refresh."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import REPO, distill_cfg, save_untrained_teacher
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from d2kd.engine import DistillTrainer
from d2kd.engine.prototype_hook import PrototypeRefreshHook
from d2kd.prototypes.extraction import extract_features
from d2kd.prototypes.index import build_instance_index
from d2kd.prototypes.refresh import PrototypeRefresher, prototype_banks

GK = "DigitsDet/retinanet_R18_from_R50_gk.yaml"


def _record(i, boxes):
    return {"file_name": f"{i}.png", "image_id": i, "height": 100, "width": 100,
            "annotations": [{"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}
                            for c, b in boxes]}


def test_instance_index_filters_caps_and_is_deterministic():
    big, small = (0, 0, 40, 40), (0, 0, 20, 50)
    dicts = [_record(i, [(i % 3, big), (i % 3, small), (2, big)]) for i in range(12)]
    index = build_instance_index(dicts, num_classes=3, min_size=30, max_images_per_class=2,
                                 seed=5)
    again = build_instance_index(dicts, 3, 30, 2, 5)
    assert len(again) == len(index) and all(
        a.record is b.record and torch.equal(a.boxes, b.boxes) and torch.equal(a.classes, b.classes)
        for a, b in zip(index, again))
    per_class = {c: [img.record["image_id"] for img in index if c in img.classes.tolist()]
                 for c in range(3)}
    # class 0: images 0,3,6,9; class 1: 1,4,7,10; class 2: every image -> 2 drawn each
    assert all(len(images) == 2 for images in per_class.values())
    assert set(per_class[0]) <= {0, 3, 6, 9} and set(per_class[1]) <= {1, 4, 7, 10}
    ids = [img.record["image_id"] for img in index]
    assert ids == sorted(set(ids)), "each image once, in dataset order"
    for img in index:
        assert (img.boxes[:, 2] - img.boxes[:, 0] > 30).all(), "the 20-px-wide box is filtered"
        assert img.boxes.tolist()[0] == [0, 0, 40, 40], "XYWH converted to XYXY"
    everything = build_instance_index(dicts, 3, 30, 0, 5)
    # classes 0 and 1: 4 images each; class 2: 12 images, twice in images 2, 5, 8, 11
    assert sum(len(img.classes) for img in everything) == 4 + 4 + 16


def _gk_cfg(tmp_path, weights, max_iter=2, period=1):
    cfg = distill_cfg(str(tmp_path), weights, heads=("GlobalKnowledgeHead",), max_iter=max_iter,
                      config=GK)
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 4.0
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 3
    cfg.DISTILL.PROTOTYPES.REFRESH_PERIOD = period
    return cfg


def test_extraction_pools_each_instance_from_its_test_time_image(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    cfg = _gk_cfg(tmp_path, weights)
    model = build_model(cfg).eval()
    index = build_instance_index(DatasetCatalog.get("digitsdet_tiny_train"), 10, 4.0, 2, 0)
    student = model.student
    strides = {"student": {"p3": 8, "p4": 16}}
    features = extract_features(index, student,
                                {"student": lambda images: student.backbone(images.tensor)},
                                strides, "RGB", 144, 192, batch_size=3, show_progress=False)
    # reference: each image alone through detectron2's test-time resize, naive cell means
    resize = T.ResizeShortestEdge(144, 192)
    expected = {"p3": [], "p4": []}
    for image in index:
        array = detection_utils.read_image(image.record["file_name"], format="RGB")
        transform = resize.get_transform(array)
        tensor = torch.as_tensor(transform.apply_image(array).astype("float32")).permute(2, 0, 1)
        scale = tensor.shape[1] / array.shape[0]
        with torch.no_grad():
            maps = student.backbone(student.preprocess_image([{"image": tensor}]).tensor)
        for level, stride in strides["student"].items():
            fmap = maps[level][0]
            for box in image.boxes * scale:
                x0, y0, x1, y1 = (int(v) // stride for v in box.tolist())
                x1, y1 = min(x1, fmap.shape[2] - 1), min(y1, fmap.shape[1] - 1)
                expected[level].append(fmap[:, y0:y1 + 1, x0:x1 + 1].mean(dim=(1, 2)))
    for level in strides["student"]:
        assert features["student"][level].shape == (sum(len(i.classes) for i in index), 64)
        torch.testing.assert_close(features["student"][level], torch.stack(expected[level]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_extraction_streams_images_batch_by_batch(tiny_digitsdet, tmp_path, monkeypatch):
    """Images are read when their batch is forwarded, never the shard up front; records
    without sizes and loader processes give the same features."""
    from d2kd.prototypes import extraction

    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    student = build_model(_gk_cfg(tmp_path, weights)).eval().student
    index = build_instance_index(DatasetCatalog.get("digitsdet_tiny_train"), 10, 4.0, 2, 0)
    reads, reads_at_forward = [], []
    read_image = extraction.detection_utils.read_image
    monkeypatch.setattr(extraction.detection_utils, "read_image",
                        lambda *a, **k: reads.append(1) or read_image(*a, **k))

    def encode(images):
        reads_at_forward.append((len(reads), len(images)))
        return student.backbone(images.tensor)

    strides = {"student": {"p3": 8}}
    features = extract_features(index, student, {"student": encode}, strides, "RGB", 144, 192,
                                batch_size=2, show_progress=False)
    forwarded = 0
    for read, batch in reads_at_forward:  # read so far == the images forwarded so far
        forwarded += batch
        assert read == forwarded
    assert forwarded == len(index) and len(reads_at_forward) > 2

    monkeypatch.setattr(extraction.detection_utils, "read_image", read_image)
    unsized = [replace(image, record={k: v for k, v in image.record.items()
                                      if k not in ("height", "width")}) for image in index]
    again = extract_features(unsized, student,
                             {"student": lambda images: student.backbone(images.tensor)},
                             strides, "RGB", 144, 192, batch_size=2, num_workers=2,
                             show_progress=False)
    torch.testing.assert_close(again["student"]["p3"], features["student"]["p3"])


@pytest.mark.slow
def test_bank_built_before_first_step_then_every_period(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    calls = []
    original = PrototypeRefresher.refresh

    def spy(self):
        calls.append((self.model.student.training, int(self.banks[0].version)))
        return original(self)

    PrototypeRefresher.refresh = spy
    try:
        trainer = DistillTrainer(_gk_cfg(tmp_path / "run", weights, max_iter=5, period=2))
        hooks = [type(h).__name__ for h in trainer._hooks]
        assert hooks.index("PrototypeRefreshHook") < hooks.index("PeriodicCheckpointer")
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        PrototypeRefresher.refresh = original
    bank = trainer.model.heads["GlobalKnowledgeHead"].bank
    # before step 0, after steps 1 and 3 (next steps 2 and 4); none after the last step
    assert [v for _, v in calls] == [0, 1, 2] and int(bank.version) == 3
    assert all(training for training, _ in calls), "the student is put back in train mode"
    assert bank.valid.any() and bank.teacher.abs().sum() > 0
    cache = os.listdir(tmp_path / "run" / "prototypes")
    assert len(cache) == 1 and cache[0].startswith("teacher_features_")


@pytest.mark.slow
def test_resumed_run_keeps_the_checkpointed_bank_and_refresh_times(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    cfg = _gk_cfg(tmp_path / "run", weights, max_iter=2, period=2)
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    first = DistillTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    saved = {k: v.clone()
             for k, v in first.model.heads["GlobalKnowledgeHead"].bank.state_dict().items()}
    cfg.SOLVER.MAX_ITER = 5
    second = DistillTrainer(cfg)
    second.resume_or_load(resume=True)
    bank = second.model.heads["GlobalKnowledgeHead"].bank
    assert all(torch.equal(bank.state_dict()[k], v) for k, v in saved.items())
    iterations = []
    hook = next(h for h in second._hooks if isinstance(h, PrototypeRefreshHook))
    original = hook._refresh
    hook._refresh = lambda: (iterations.append(second.iter), original())
    second.train()
    # no rebuild before step 2 (restored); after step 3 (next step 4 = 2 * period)
    assert iterations == [3] and int(bank.version) == 2
    assert os.path.isfile(tmp_path / "run" / "prototypes" / os.listdir(
        tmp_path / "run" / "prototypes")[0])


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_hold_identical_banks_equal_to_one_process(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    script = tmp_path / "run_ranks.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from detectron2.engine import HookBase
from detectron2.utils import comm
from d2kd.apps.launch.distributed import launch

def main(world):
    from conftest import tiny_training_cfg
    from d2kd.data import register_digitsdet
    from d2kd.engine import DistillTrainer
    register_digitsdet({tiny_digitsdet!r}, name_prefix="digitsdet_tiny")
    cfg = tiny_training_cfg({GK!r}, {str(tmp_path)!r} + f"/run{{world}}", max_iter=2)
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DISTILL.TEACHER.WEIGHTS = [{weights!r}]
    cfg.DISTILL.HEADS = ["GlobalKnowledgeHead"]
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 4.0
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 3
    cfg.DISTILL.PROTOTYPES.REFRESH_PERIOD = 1
    torch.manual_seed(0)  # the same initial student in both runs
    trainer = DistillTrainer(cfg)
    model = trainer.model.module if world > 1 else trainer.model
    bank = model.heads["GlobalKnowledgeHead"].bank
    prefix = {str(tmp_path)!r} + f"/bank_w{{world}}_r{{comm.get_rank()}}"

    class SaveFirstBank(HookBase):  # the bank built from the initial student, before step 0
        def before_step(self):
            if self.trainer.iter == 0:
                torch.save(bank.state_dict(), prefix + "_first.pth")

    trainer.register_hooks([SaveFirstBank()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    torch.save(bank.state_dict(), prefix + "_last.pth")

if __name__ == "__main__":
    world = int(sys.argv[1])
    launch(main, world, dist_url="auto", args=(world,))
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in (2, 1):
        proc = subprocess.run([sys.executable, str(script), str(world)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = [torch.load(tmp_path / f"bank_w2_r{r}_last.pth") for r in (0, 1)]
    assert int(last[0]["version"]) == 2 and last[0]["valid"].any()
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0]), "identical on all ranks"
    # sharded extraction (image j on rank j mod 2) selects what one process selects
    sharded, single = (torch.load(tmp_path / f"bank_w{w}_r0_first.pth") for w in (2, 1))
    assert torch.equal(sharded["valid"], single["valid"]) and int(sharded["version"]) == 1
    for space in ("teacher", "student"):
        torch.testing.assert_close(sharded[space], single[space], atol=1e-4, rtol=1e-4)


def test_box_weight_maps_match_a_loop_over_boxes():
    from d2kd.heads.masks import box_weight_maps

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(9, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(9, 2, generator=g) * 40 + 1], 1)
    weights, images = torch.rand(9, generator=g), torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0])
    maps = box_weight_maps(boxes, weights, images, (3, 4, 10, 12), stride=8)
    expected = torch.zeros(3, 1, 10, 12)
    for box, w, i in zip(boxes.tolist(), weights.tolist(), images.tolist()):
        for y in range(10):
            for x in range(12):  # cell (x, y) spans [8x, 8x + 8): covered by floor rule
                if (int(box[0]) // 8 <= x <= int(box[2]) // 8
                        and int(box[1]) // 8 <= y <= int(box[3]) // 8):
                    expected[i, 0, y, x] = max(expected[i, 0, y, x], w)
    assert torch.equal(maps, expected)


def test_prototype_weighting_fills_gt_cells_with_the_hand_computed_weight(tiny_digitsdet,
                                                                         tmp_path):
    from detectron2.structures import Boxes, Instances

    from d2kd.structures import StudentTaps, TeacherOutputs

    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    cfg = distill_cfg(str(tmp_path), weights, heads=("FitNetHead",))
    cfg.DISTILL.FITNET.PROTOTYPE_WEIGHTED = True
    cfg.DISTILL.IN_FEATURES = ["p3"]
    model = build_model(cfg)
    weighting = model.heads["FitNetHead"].weighting
    bank = weighting.bank
    assert len(prototype_banks(model)) == 1, "the head's bank is refreshed like GK's"
    e = torch.eye(128)
    bank.set_prototypes(0, 3, e[0].expand(10, 128), torch.ones(10, 64))
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 16.0, 31.0, 31.0]])),
                   gt_classes=torch.tensor([3]))
    s_map = torch.ones(1, 64, 8, 8)  # student: cosine 1 with its prototypes
    t_map = torch.zeros(1, 128, 8, 8)
    t_map[0, :2] = 1.0  # teacher: e0 + e1, cosine 1/sqrt(2) with its prototypes
    cells = weighting.cell_weights(StudentTaps(gt_instances=[gt], features={"p3": s_map}),
                                   TeacherOutputs(features={"p3": t_map}), "p3")
    expected = torch.ones(1, 1, 8, 8)
    expected[0, 0, 2:4, 1:4] = 1 - (1 - 2 ** -0.5)  # cells x 1..3, y 2..3 (stride 8)
    torch.testing.assert_close(cells, expected)


def test_teacher_feature_cache_is_keyed_by_content_not_path(tiny_digitsdet, tmp_path):
    """A teacher retrained at the same path gets another cache key; the same bytes at another
    path get the same key (docs/trust.md: caches are keyed by content)."""
    import shutil

    def key(weights: str) -> str:
        cfg = _gk_cfg(tmp_path / "run", weights)
        refresher = PrototypeRefresher(cfg, build_model(cfg),
                                       DatasetCatalog.get("digitsdet_tiny_train"))
        return refresher._teacher_cache_key()[0]

    path = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "t")
    first = key(path)
    shutil.copy(path, tmp_path / "copy.pth")
    assert key(str(tmp_path / "copy.pth")) == first
    state = torch.load(path, weights_only=True)
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = state["model"][name] + 1  # "retrained", same path
    torch.save(state, path)
    assert key(path) != first
