"""Teachers from detectron2's model zoo and LazyConfig files (random weights saved to files).

Each teacher kind loads strictly and trains a DigitsDet-sized student for a few steps with
every distillation head of its family; nothing is downloaded (a ``detectron2://`` /
model-zoo URL resolves to a file placed in iopath's download cache).
"""
import os
import pickle

import pytest
import torch
from conftest import tiny_training_cfg
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd.config import ConfigError
from d2kd.config.teachers import MODEL_ZOO_PREFIX, teacher_specs
from d2kd.config.validation import check_teachers
from d2kd.engine import DistillTrainer
from d2kd.heads import DISTILL_HEAD_REGISTRY
from d2kd.modeling.teacher import build_teacher_model

# Heads that read features only, and the response heads of each family.
FEATURE_HEADS = ["FitNetHead", "FGFIHead", "FgBgHead", "MGDHead", "DFDHead",
                 "GlobalKnowledgeHead", "DetKDSHead"]
RESPONSE_HEADS = ["LogitKDHead", "LocKDHead"]

RETINANET_STUDENT = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"
RCNN_STUDENT = "DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml"
FCOS_STUDENT = "DigitsDet/fcos_R18_from_R50_mgd.yaml"

# (teacher reference, student config, teacher overrides to 10 classes)
TEACHERS = {
    "yacs-zoo-rcnn": (MODEL_ZOO_PREFIX + "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
                      RCNN_STUDENT, {"OPTS": ["MODEL.ROI_HEADS.NUM_CLASSES", "10"]}),
    "lazy-zoo-retinanet": (MODEL_ZOO_PREFIX + "COCO-Detection/retinanet_R_50_FPN_1x.py",
                           RETINANET_STUDENT, {"LAZY_OVERRIDES": ["model.num_classes=10"]}),
    "lazy-zoo-fcos": (MODEL_ZOO_PREFIX + "COCO-Detection/fcos_R_50_FPN_1x.py",
                      FCOS_STUDENT, {"LAZY_OVERRIDES": ["model.num_classes=10"]}),
    "lazy-zoo-mask-rcnn-lsj": (MODEL_ZOO_PREFIX + "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
                               RCNN_STUDENT,
                               {"LAZY_OVERRIDES": ["model.roi_heads.num_classes=10"]}),
}


def save_model_zoo_pkl(model: torch.nn.Module, path: str) -> None:
    """Weights in the format of detectron2's model-zoo downloads (numpy arrays in a pickle)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)


def _teacher_cfg(kind: str, output_dir: str, weights=None):
    reference, student, overrides = TEACHERS[kind]
    cfg = tiny_training_cfg(student, output_dir)
    cfg.DISTILL.TEACHER.CONFIGS = [reference]
    cfg.DISTILL.TEACHER.WEIGHTS = [weights] if weights is not None else []
    for key, value in overrides.items():
        cfg.DISTILL.TEACHER[key] = value
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS = 2
    cfg.DISTILL.PROTOTYPES.NUM_PER_CLASS = 2
    return cfg


def _zoo_cache_path(cache_dir: str, reference: str) -> str:
    """Where iopath caches the model zoo's URL of ``reference`` under ``$FVCORE_CACHE``."""
    url = model_zoo.get_checkpoint_url(reference[len(MODEL_ZOO_PREFIX):])
    return os.path.join(cache_dir, url.split("://", 1)[1].split("/", 1)[1])


@pytest.fixture(scope="module")
def teacher_files(module_tmp_path_factory):
    """kind -> (config for training, weights path): random teachers saved once, the model-zoo
    URL of the yacs teacher pre-placed in iopath's cache (so it resolves without a download)."""
    cache = str(module_tmp_path_factory.mktemp("iopath_cache"))
    files = {}
    for kind in TEACHERS:
        cfg = _teacher_cfg(kind, str(module_tmp_path_factory.mktemp(kind)), weights="(random)")
        spec = teacher_specs(cfg)[0]
        torch.manual_seed(0)
        model = build_teacher_model(spec, cfg)[0]
        if kind.startswith("yacs"):  # no WEIGHTS: the zoo's trained checkpoint, .pkl format
            save_model_zoo_pkl(model, _zoo_cache_path(cache, spec.reference))
            files[kind] = None
        else:
            directory = str(module_tmp_path_factory.mktemp(kind + "-weights"))
            DetectionCheckpointer(model, save_dir=directory).save("teacher")
            files[kind] = os.path.join(directory, "teacher.pth")
    return cache, files


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_external_teacher_loads_strictly_and_distils_with_every_head(
        kind, teacher_files, tiny_digitsdet, tmp_path, monkeypatch):
    cache, files = teacher_files
    monkeypatch.setenv("FVCORE_CACHE", cache)
    cfg = _teacher_cfg(kind, str(tmp_path), files[kind])
    # FGFI imitates near anchors and GK's dense terms are RetinaNet's: neither takes an FCOS
    # student, whatever the teacher (as with yacs teachers)
    cfg.DISTILL.HEADS = [h for h in FEATURE_HEADS + RESPONSE_HEADS if not (
        kind.endswith("fcos") and h in ("FGFIHead", "GlobalKnowledgeHead"))]
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5", "p6"]  # on both sides for every pair here
    trainer = DistillTrainer(cfg)
    teacher = trainer.model.teachers[0]
    saved = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    losses = trainer.storage.latest()
    for head in [DISTILL_HEAD_REGISTRY.get(h).name for h in cfg.DISTILL.HEADS]:
        assert any(name.startswith(f"loss_kd_{head}") for name in losses), (head, losses)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.model.state_dict().items())
    if kind.startswith("lazy"):  # the LazyConfig's normalisation reached the teacher
        assert teacher.input_format == "BGR"
        assert torch.allclose(teacher.model.pixel_mean.flatten().cpu(),
                              torch.tensor([103.530, 116.280, 123.675]))


@pytest.mark.slow
def test_lazy_teacher_with_weights_of_another_model_is_a_hard_error(tiny_digitsdet, tmp_path):
    cfg = _teacher_cfg("lazy-zoo-retinanet", str(tmp_path), weights="(random)")
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = []  # 80 classes: the head's shapes differ
    model = build_teacher_model(teacher_specs(cfg)[0], cfg)[0]
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("coco80")
    cfg = _teacher_cfg("lazy-zoo-retinanet", str(tmp_path), str(tmp_path / "coco80.pth"))
    with pytest.raises(ConfigError, match=r"do not match the teacher config: .*shape mismatches "
                                          r"\(key, checkpoint, model\): \('head.cls_score.bias', "
                                          r"\(720,\), \(90,\)\)"):
        build_model(cfg)

    state = torch.load(tmp_path / "coco80.pth", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if "cls_score" not in k}
    state["model"]["head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "partial.pth")]
    with pytest.raises(ConfigError, match=r"missing keys: head.cls_score.bias, "
                                          r"head.cls_score.weight; unexpected keys: "
                                          r"head.extra.weight$"):
        build_model(cfg)


def test_teacher_references_are_checked_before_anything_is_built(tmp_path):
    cfg = _teacher_cfg("lazy-zoo-retinanet", str(tmp_path))
    assert teacher_specs(cfg)[0].weights == model_zoo.get_checkpoint_url(
        "COCO-Detection/retinanet_R_50_FPN_1x.py")  # a zoo name: the zoo's trained model
    # The same LazyConfig as a file: its train.init_checkpoint (ImageNet) is not a teacher.
    cfg.DISTILL.TEACHER.CONFIGS = [model_zoo.get_config_file(
        "COCO-Detection/retinanet_R_50_FPN_1x.py")]
    with pytest.raises(ConfigError, match="has no weights: set DISTILL.TEACHER.WEIGHTS"):
        check_teachers(cfg)
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "missing.pth")]
    with pytest.raises(ConfigError, match=r"Teacher 0 \(.*retinanet_R_50_FPN_1x.py\) weights "
                                          r".*missing.pth do not exist"):
        check_teachers(cfg)
    cfg.DISTILL.TEACHER.WEIGHTS = []
    cfg.DISTILL.TEACHER.CONFIGS = [MODEL_ZOO_PREFIX + "COCO-Detection/no_such_model.yaml"]
    with pytest.raises(ConfigError, match="not in detectron2's model zoo"):
        teacher_specs(cfg)
    lazy = tmp_path / "teacher.py"
    lazy.write_text("train = dict(init_checkpoint='')\n")
    cfg.DISTILL.TEACHER.CONFIGS = [str(lazy)]
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "w.pth")]
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = []
    spec = teacher_specs(cfg)[0]
    with pytest.raises(ConfigError, match="defines no `model`"):
        build_teacher_model(spec, cfg)


@pytest.mark.parametrize("name, content", [("corrupt.pth", b"not a checkpoint"),
                                           ("truncated.pkl", pickle.dumps({"model": {}})[:7])])
def test_unreadable_teacher_weights_are_one_clear_error(name, content, tiny_digitsdet, tmp_path):
    (tmp_path / name).write_bytes(content)
    cfg = _teacher_cfg("lazy-zoo-retinanet", str(tmp_path), str(tmp_path / name))
    with pytest.raises(ConfigError, match=rf"{name} cannot be read as a checkpoint \(.+\); "
                                          "re-download or re-export the file"):
        build_model(cfg)


@pytest.mark.slow
def test_detectron2_url_weights_resolve_through_pathmanager_without_download(
        teacher_files, tiny_digitsdet, tmp_path, monkeypatch):
    """``detectron2://X`` is detectron2's model-zoo host; a file already in iopath's cache is
    used as is (nothing is downloaded here)."""
    cache, files = teacher_files
    monkeypatch.setenv("FVCORE_CACHE", cache)
    reference = TEACHERS["yacs-zoo-rcnn"][0]
    url = model_zoo.get_checkpoint_url(reference[len(MODEL_ZOO_PREFIX):])
    short = "detectron2://" + url.split("/detectron2/", 1)[1]
    cfg = _teacher_cfg("yacs-zoo-rcnn", str(tmp_path), short)
    model = build_model(cfg)
    assert model.teachers[0].weights == short
