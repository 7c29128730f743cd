"""Every shipped config loads with known keys only and builds its model."""
import glob
import os
from dataclasses import replace

import pytest
import torch
from conftest import CONFIGS
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import d2kd.apps.search  # noqa: F401  (the search config's keys, DISTILL.DETKDS.SEARCH)
from d2kd.compat.projects import missing_transformer_backbones, projects_dir
from d2kd.config import load_config
from d2kd.config.teachers import (
    PROJECTS_PREFIX,
    YACS,
    TeacherSpec,
    load_teacher_config,
    teacher_specs,
)
from d2kd.modeling.teacher import build_teacher_model

CONFIG_FILES = sorted(
    os.path.relpath(path, CONFIGS)
    for path in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(path).startswith("Base")
)


def test_configs_exist_for_every_family():
    for family in ("retinanet", "fcos", "faster_rcnn", "mask_rcnn"):
        for role in ("student", "teacher"):
            assert any(
                f.startswith(f"DigitsDet/{family}_") and f.endswith(f"_{role}.yaml")
                for f in CONFIG_FILES
            ), (family, role)


@pytest.fixture(scope="module")
def untrained_teachers(module_tmp_path_factory):
    """config path -> a checkpoint matching it (teachers must load complete weights)."""
    cache = {}

    def weights_for(spec: TeacherSpec, cfg) -> str:
        if spec.reference not in cache:
            model = build_teacher_model(replace(spec, weights="(random)"), cfg)[0]
            out = module_tmp_path_factory.mktemp("teacher")
            DetectionCheckpointer(model, save_dir=str(out)).save("model_final")
            cache[spec.reference] = str(out / "model_final.pth")
        return cache[spec.reference]

    return weights_for


def skip_unreachable_project_teachers(cfg) -> None:
    """Teachers from detectron2's projects/ (ViTDet's transformer configs) need detectron2 main
    and that folder (make test-upstream provides both)."""
    if not any(r.startswith(PROJECTS_PREFIX) for r in cfg.DISTILL.TEACHER.CONFIGS):
        return
    missing = missing_transformer_backbones()
    if missing:
        pytest.skip(f"this detectron2 lacks {', '.join(missing)} (added after v0.6): its ViTDet "
                    "project teachers need detectron2 main (make test-upstream)")
    if projects_dir() is None:
        pytest.skip("detectron2's projects/ folder is not reachable: set DETECTRON2_PROJECTS to "
                    "the projects/ of a detectron2 source checkout (make test-upstream does)")


def skip_swin_without_upstream(cfg) -> None:
    """The DigitsDet Swin teacher (build_swin_fpn_backbone), as the model or one of the
    teachers, needs detectron2 main's SwinTransformer."""
    if "SwinTransformer" not in missing_transformer_backbones():
        return
    configs = [cfg] + ([load_teacher_config(spec, cfg) for spec in teacher_specs(cfg)
                        if spec.kind == YACS]
                       if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector" else [])
    if any(c.MODEL.BACKBONE.NAME == "build_swin_fpn_backbone" for c in configs):
        pytest.skip("this detectron2 lacks SwinTransformer (added after v0.6): the DigitsDet "
                    "Swin teacher needs detectron2 main (make test-upstream)")


@pytest.mark.parametrize("config_file", [  # COCO's full-size models: seconds each
    pytest.param(f, marks=pytest.mark.slow) if f.startswith("COCO/") else f
    for f in CONFIG_FILES])
def test_config_builds(config_file, untrained_teachers):
    cfg = load_config(os.path.join(CONFIGS, config_file))
    cfg.MODEL.DEVICE = "cpu"
    skip_unreachable_project_teachers(cfg)
    skip_swin_without_upstream(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        cfg.DISTILL.TEACHER.WEIGHTS = [untrained_teachers(spec, cfg) for spec in teacher_specs(cfg)]
        assert cfg.DISTILL.HEADS, "a distillation config names its heads"
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    backbone = model.student.backbone if hasattr(model, "student") else model.backbone
    if config_file.startswith("DigitsDet"):  # trained from scratch: nothing frozen
        assert all(p.requires_grad for p in backbone.parameters())
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.zeros(3, 64, 96), "height": 64, "width": 96}])
    assert {"instances", "sem_seg"} & set(outputs[0]), "detections (or pretext segmentation)"
