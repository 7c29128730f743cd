"""The distilled student as an ordinary detectron2 model: its plain config, TorchScript and
ONNX exports (against the eager model), the predictor's pictures."""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, distill_cfg, save_untrained_teacher, tiny_training_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from PIL import Image

from d2kd.config import ConfigError, load_config
from d2kd.engine import DistillTrainer
from d2kd.engine.student_config import load_student_config, write_student_config
from d2kd.engine.tracing import (
    detections,
    export_torchscript,
    read_test_image,
    trace_safe_dense_decode,
)
from d2kd.utils.io import atomic_save

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_student as export_tool  # noqa: E402

# The documented outputs of an exported detector (docs/deploy.md); Mask R-CNN adds pred_masks.
OUTPUTS = ["pred_boxes", "pred_classes", "scores", "image_size"]
STUDENTS = {"retinanet": "DigitsDet/retinanet_R18_student.yaml",
            "faster_rcnn": "DigitsDet/faster_rcnn_R18_student.yaml",
            "fcos": "DigitsDet/fcos_R18_student.yaml",
            "mask_rcnn": "DigitsDet/mask_rcnn_R18_student.yaml"}
# Untrained RetinaNet scores sit just above its 0.01 prior: 0.015 keeps ~100 detections from a
# number of candidates that differs between images and levels. FCOS keeps a few dozen at 0.
OVERRIDES = {"retinanet": ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.015"], "faster_rcnn": [],
             "fcos": ["MODEL.FCOS.SCORE_THRESH_TEST", "0.0"], "mask_rcnn": []}


def outputs(family: str):
    return OUTPUTS[:2] + ["pred_masks"] + OUTPUTS[2:] if family == "mask_rcnn" else OUTPUTS


def val_images(root: str, count: int = 3):
    return sorted(glob.glob(os.path.join(root, "val", "*.png")))[:count]


@pytest.fixture(scope="module")
def distilled(tiny_digitsdet, module_tmp_path_factory):
    """A finished 1-iteration DigitsDet RetinaNet distillation: (its OUTPUT_DIR, the model)."""
    out = module_tmp_path_factory.mktemp("distilled")
    teacher = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", out / "teacher")
    cfg = distill_cfg(str(out / "run"), teacher, max_iter=1)
    trainer = DistillTrainer(cfg)
    trainer.train()
    (out / "run" / "config.yaml").write_text(cfg.dump())  # as tools/train_net.py's default_setup
    return out / "run", trainer.model.eval()


@pytest.fixture(scope="module")
def students(tiny_digitsdet, module_tmp_path_factory):
    """family -> (weights, plain config, overrides) of DigitsDet students at (seeded) random
    initialisation: scores of a 1-step distillation are not reproducible, and untrained ones
    are close together, so that a tie broken another way would change the detections."""
    out = module_tmp_path_factory.mktemp("students")
    exported = {}
    for family, config_file in STUDENTS.items():
        cfg = tiny_training_cfg(config_file, str(out / family))
        torch.manual_seed(0)
        weights = str(out / family / "model_final_student.pth")
        atomic_save({"model": build_model(cfg).state_dict()}, weights)
        exported[family] = (weights, write_student_config(cfg, weights), OVERRIDES[family])
    return exported


def eager_model(config: str, opts):
    """The student built and loaded with detectron2's own APIs."""
    cfg = load_student_config(config, opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model


def assert_same_detections(expected, got) -> None:
    """Equal counts, and every eager detection has its own exported counterpart of the same
    class, score (to 1e-5), box (to 1e-3 px) and mask: the order of near-equal scores may
    differ."""
    assert len(expected) == len(got) > 0
    close = ((expected.pred_classes[:, None] == got.pred_classes[None, :])
             & ((expected.scores[:, None] - got.scores[None, :]).abs() <= 1e-5)
             & ((expected.pred_boxes.tensor[:, None] - got.pred_boxes.tensor[None, :]).abs()
                .amax(dim=2) <= 1e-3))
    unmatched = set(range(len(got)))
    for i in range(len(expected)):
        j = next((j for j in close[i].nonzero()[:, 0].tolist() if j in unmatched), None)
        assert j is not None, f"eager detection {i} has no exported counterpart"
        unmatched.remove(j)
        if expected.has("pred_masks"):  # pasted at 0.5: a pixel may flip on float noise
            assert (expected.pred_masks[i] != got.pred_masks[j]).float().mean() < 1e-3


@pytest.mark.slow
def test_distillation_writes_a_plain_student_config_detectron2_builds_and_loads(
        distilled, tiny_digitsdet):
    run, distillation_model = distilled
    path = run / "model_final_student.yaml"
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "build_scalable_resnet_fpn_backbone" in header and "import d2kd" in header
    cfg = get_cfg()  # detectron2's; the DigitsDet backbone is registered by `import d2kd`
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(path))
    assert "DISTILL" not in cfg and "D2KD" not in cfg and "OPTIMIZER" not in cfg.SOLVER
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfg.MODEL.WEIGHTS == str(run / "model_final_student.pth")
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    saved = torch.load(cfg.MODEL.WEIGHTS, weights_only=False)["model"]
    state = model.state_dict()  # every tensor loaded: no missing and no unexpected keys
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    distillation_model.student.test_score_thresh = 0.0
    image, (height, width) = read_test_image(cfg, val_images(tiny_digitsdet)[0])
    inputs = [{"image": image, "height": height, "width": width}]
    with torch.no_grad():
        ours, theirs = model(inputs)[0]["instances"], distillation_model(inputs)[0]["instances"]
    assert len(ours) > 0
    assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    assert torch.equal(ours.scores, theirs.scores)


@pytest.mark.slow
def test_export_tool_takes_a_distillation_checkpoint_and_config(distilled, tiny_digitsdet,
                                                                  tmp_path):
    run, distillation_model = distilled
    export_tool.main([str(run / "model_final.pth"), str(tmp_path / "student.pth"),
                      "--config-file", str(run / "config.yaml")])
    cfg = load_student_config(str(tmp_path / "student.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfg.MODEL.WEIGHTS == str(tmp_path / "student.pth")
    ours = torch.load(tmp_path / "student.pth", weights_only=False)["model"]
    final = torch.load(run / "model_final_student.pth", weights_only=False)["model"]
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)
    image_file = val_images(tiny_digitsdet)[0]
    export_tool.main([str(run / "model_final.pth"), str(tmp_path / "student.ts"), "--format",
                      "torchscript", "--config-file", str(run / "config.yaml"), "--sample-image",
                      image_file, "--opts", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    image, (height, width) = read_test_image(cfg, image_file)
    distillation_model.student.test_score_thresh = 0.0
    with torch.no_grad():
        expected = distillation_model([{"image": image, "height": height, "width": width}])
        got = detections(torch.jit.load(str(tmp_path / "student.ts"))(image), OUTPUTS, height,
                         width)
    assert_same_detections(expected[0]["instances"], got)


def assert_export_matches_eager(run, family: str, config: str, opts, images) -> None:
    """``run(image)`` (an exported model) against the eager student on DigitsDet images at the
    config's input size, and on one at the original 192 x 256 (traced at the former)."""
    cfg, model = eager_model(config, opts)
    other_size = cfg.clone()
    other_size.INPUT.MIN_SIZE_TEST, other_size.INPUT.MAX_SIZE_TEST = 192, 256
    for input_cfg, path in [(cfg, path) for path in images] + [(other_size, images[1])]:
        image, (height, width) = read_test_image(input_cfg, path)
        with torch.no_grad():
            expected = model([{"image": image, "height": height, "width": width}])[0]["instances"]
            got = detections(run(image), outputs(family), height, width)
        assert_same_detections(expected, got)


@pytest.mark.slow
@pytest.mark.parametrize("family", STUDENTS)
def test_torchscript_matches_the_eager_student(students, family, tiny_digitsdet, tmp_path):
    weights, config, opts = students[family]
    images = val_images(tiny_digitsdet)
    output = str(tmp_path / "student.ts")
    export_tool.main([weights, output, "--format", "torchscript", "--config-file", config,
                      "--sample-image", images[0], "--opts", *opts])
    assert_export_matches_eager(torch.jit.load(output), family, config, opts, images)


@pytest.mark.slow
@pytest.mark.parametrize("family", STUDENTS)
def test_onnx_matches_the_eager_student(students, family, tiny_digitsdet, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    weights, config, opts = students[family]
    images = val_images(tiny_digitsdet)
    output = str(tmp_path / "student.onnx")
    export_tool.main([weights, output, "--format", "onnx", "--config-file", config,
                      "--sample-image", images[0], "--opts", *opts])
    session = ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == outputs(family)
    assert_export_matches_eager(lambda image: session.run(None, {"image": image.numpy()}),
                                family, config, opts, images)


def test_traced_dense_decoding_caps_candidates_as_the_eager_one(students):
    """detectron2 v0.6 baked a level's candidate count into the trace when it was below
    test_topk_candidates: an image with more candidates then kept all of them."""
    model = eager_model(*students["retinanet"][1:])[1]
    anchors = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(6, 1))
    deltas = torch.zeros(6, 4)

    def scores_kept(scores):
        return model._decode_per_level_predictions(anchors, scores, deltas, 0.5, 3, (8, 8)).scores

    few = torch.tensor([[0.9], [0.8], [0.1], [0.1], [0.1], [0.1]])  # 2 candidates < 3
    many = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.55], [0.1]])  # 5 candidates > 3
    with trace_safe_dense_decode():
        traced = torch.jit.trace(scores_kept, (few,))
    assert torch.equal(traced(many), scores_kept(many)) and len(traced(many)) == 3
    assert torch.equal(traced(few), scores_kept(few))


@pytest.mark.slow
def test_stock_student_config_and_torchscript_need_no_d2kd(students, tiny_digitsdet, tmp_path):
    """A COCO student's config loads and builds with detectron2 alone; a TorchScript export
    runs with torch and torchvision alone."""
    coco = load_config(os.path.join(CONFIGS, "COCO/retinanet_R50_from_R101_gk.yaml"))
    coco_config = write_student_config(coco, str(tmp_path / "coco_student.pth"))
    assert "d2kd is not needed" in open(coco_config).read()
    cfg, model = eager_model(*students["retinanet"][1:])
    image, (height, width) = read_test_image(cfg, val_images(tiny_digitsdet)[0])
    export_torchscript(model, image, str(tmp_path / "student.ts"))
    torch.save(image, tmp_path / "image.pt")
    script = textwrap.dedent("""
        import sys
        import torch, torchvision  # torchvision registers the NMS and RoIAlign ops
        torch.set_num_threads(1)  # as the test process (tests/conftest.py)
        traced = torch.jit.load(sys.argv[1])
        with torch.no_grad():
            outputs = traced(torch.load(sys.argv[2]))
        assert not [m for m in sys.modules if m.split(".")[0] in ("d2kd", "detectron2")]
        torch.save(outputs, sys.argv[3])
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        cfg = get_cfg()
        cfg.merge_from_file(sys.argv[4])
        cfg.MODEL.DEVICE = "cpu"
        print(type(build_model(cfg)).__name__, cfg.MODEL.WEIGHTS)
        assert not [m for m in sys.modules if m.split(".")[0] == "d2kd"]
    """)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "student.ts"), str(tmp_path / "image.pt"),
         str(tmp_path / "outputs.pt"), coco_config],
        cwd=str(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["RetinaNet", str(tmp_path / "coco_student.pth")]
    with torch.no_grad():
        expected = model([{"image": image, "height": height, "width": width}])[0]["instances"]
    assert_same_detections(expected, detections(torch.load(tmp_path / "outputs.pt"), OUTPUTS,
                                                height, width))


def predict_tool():
    """tools/predict.py; detectron2's Visualizer needs OpenCV."""
    pytest.importorskip("cv2", reason="detectron2's Visualizer needs opencv-python(-headless)")
    import predict

    return predict


@pytest.mark.slow
def test_predictor_writes_one_picture_per_image(distilled, tiny_digitsdet, tmp_path):
    run = distilled[0]
    images = val_images(tiny_digitsdet)
    pattern = os.path.join(tiny_digitsdet, "val", os.path.basename(images[1])[:-5] + "[12].png")
    predict_tool().main(["--config-file", str(run / "model_final_student.yaml"),
                       "--input", images[0], pattern, "--output", str(tmp_path / "pictures"),
                       "--confidence-threshold", "0.0"])
    assert sorted(os.listdir(tmp_path / "pictures")) == [os.path.basename(p) for p in images]
    for path in images:
        original = np.asarray(Image.open(path).convert("RGB"))
        with Image.open(tmp_path / "pictures" / os.path.basename(path)) as picture:
            assert picture.format == "PNG"
            assert picture.size == (original.shape[1], original.shape[0])
            drawn = np.asarray(picture.convert("RGB"))
        assert (drawn != original).any()  # the detections are drawn


@pytest.mark.slow
def test_predictor_inputs_and_a_moved_folder(distilled, tmp_path):
    tool = predict_tool()
    expand_inputs = tool.expand_inputs
    for folder, names in (("a", ["1.png", "2.jpg", "notes.txt"]), ("b", ["1.png"])):
        os.makedirs(tmp_path / folder)
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert expand_inputs([a]) == [os.path.join(a, "1.png"), os.path.join(a, "2.jpg")]
    assert expand_inputs([os.path.join(a, "*.png")]) == [os.path.join(a, "1.png")]
    with pytest.raises(ConfigError, match=r"share the names \['1.png'\]"):
        expand_inputs([a, os.path.join(b, "1.png")])
    with pytest.raises(ConfigError, match="no such file"):
        expand_inputs([str(tmp_path / "missing")])
    before = tmp_path / "before"
    before.mkdir()
    weights = shutil.copy(distilled[0] / "model_final_student.pth", before)
    write_student_config(load_student_config(str(distilled[0] / "model_final_student.yaml")),
                         weights)
    os.rename(before, tmp_path / "after")  # MODEL.WEIGHTS still names before/
    with pytest.raises(SystemExit, match="folder was moved"):
        tool.main(["--config-file", str(tmp_path / "after" / "model_final_student.yaml"),
                           "--input", a, "--output", str(tmp_path / "out")])
