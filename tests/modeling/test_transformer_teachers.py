"""Transformer teachers for CNN students (docs/transformer_teachers.md).

- ViTDet-B, Swin-B and MViTv2-B Cascade Mask R-CNN teachers from detectron2's ViTDet project
  configs (upstream detectron2 only; shrunk to CPU size by LazyConfig overrides, random
  weights saved to a file) load strictly and train a DigitsDet student with every head;
  ViTDet's simple feature pyramid names p2-p6 like an FPN.
- ``projects://`` references resolve under detectron2's projects/; on v0.6 a transformer
  teacher is one error naming the missing backbones.
- The DigitsDet Swin teacher (a yacs config) has the ResNet FPN's levels and distils.

Level matching: test_teacher_levels.py; Cascade R-CNN teachers: test_cascade_teachers.py.
"""
import os
from dataclasses import replace

import pytest
import torch
from conftest import CONFIGS, tiny_training_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd.compat.padding import padded_size
from d2kd.compat.projects import missing_transformer_backbones, projects_dir
from d2kd.config import ConfigError, load_config
from d2kd.config.teachers import PROJECTS_PREFIX, load_teacher_config, teacher_specs
from d2kd.engine import DistillTrainer
from d2kd.engine.preflight import check_model
from d2kd.heads import DISTILL_HEAD_REGISTRY
from d2kd.modeling.teacher import build_teacher_model

RCNN_STUDENT = "DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml"
RETINANET_STUDENT = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"
FEATURE_HEADS = ["FitNetHead", "FGFIHead", "FgBgHead", "MGDHead", "DFDHead",
                 "GlobalKnowledgeHead", "DetKDSHead"]
RESPONSE_HEADS = ["LogitKDHead", "LocKDHead"]
# DetKDS with each of its inputs: the feature ones (whole maps, fg/bg masks, GT-box RoIAlign)
# and, for an R-CNN student, the RPN's objectness and deltas (the teacher's, on its grid
# cropped to the student's)
DETKDS_INPUTS = ("global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2;"
                 "instance:catt|scale_r1|norm_C|l1|w=50;logit:no|no|softmax_C|kl|w=1;"
                 "loc:no|no|batch|smooth_l1|w=1")

MISSING_BACKBONES = missing_transformer_backbones()


def _vitdet_unavailable() -> str:
    """Why the ViTDet project teachers cannot be built here ("" when they can)."""
    if MISSING_BACKBONES:
        return (f"this detectron2 lacks {', '.join(MISSING_BACKBONES)} (added after v0.6): "
                "transformer teachers need detectron2 main (make test-upstream)")
    if projects_dir() is None:
        return ("detectron2's projects/ViTDet/configs are not reachable: set "
                "DETECTRON2_PROJECTS to the projects/ folder of a detectron2 source checkout "
                "(make test-upstream does)")
    return ""


needs_vitdet = pytest.mark.skipif(bool(_vitdet_unavailable()), reason=_vitdet_unavailable())

# ---- ViTDet project teachers, shrunk to CPU size -------------------------------------------
SQUARE = 256  # the fixed square they pad to (1024 as released)
CHANNELS = 32  # pyramid width (256 as released); the DigitsDet student's FPN has 64: adapters


def _cascade_head_overrides():
    shrink = ["model.roi_heads.num_classes=10", f"model.backbone.out_channels={CHANNELS}",
              f"model.backbone.square_pad={SQUARE}",
              f"model.proposal_generator.head.in_channels={CHANNELS}",
              f"model.roi_heads.mask_head.input_shape.channels={CHANNELS}",
              "model.roi_heads.mask_head.conv_dims=[8]"]
    for k in range(3):  # the three cascade stages
        shrink += [f"model.roi_heads.box_heads.{k}.input_shape.channels={CHANNELS}",
                   f"model.roi_heads.box_heads.{k}.conv_dims=[16]",
                   f"model.roi_heads.box_heads.{k}.fc_dims=[32]",
                   f"model.roi_heads.box_predictors.{k}.input_shape.channels=32"]
    return shrink


TRANSFORMER_TEACHERS = {  # kind -> (config under projects/, backbone overrides)
    "vitdet_b": ("ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py", [
        f"model.backbone.net.img_size={SQUARE}", "model.backbone.net.embed_dim=32",
        "model.backbone.net.depth=2", "model.backbone.net.num_heads=2",
        "model.backbone.net.window_size=4", "model.backbone.net.window_block_indexes=[0]",
        "model.backbone.net.drop_path_rate=0.0"]),
    "swin_b": ("ViTDet/configs/COCO/cascade_mask_rcnn_swin_b_in21k_50ep.py", [
        "model.backbone.bottom_up.embed_dim=16", "model.backbone.bottom_up.depths=[1,1,1,1]",
        "model.backbone.bottom_up.num_heads=[1,2,2,4]",
        "model.backbone.bottom_up.drop_path_rate=0.0"]),
    "mvitv2_b": ("ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py", [
        "model.backbone.bottom_up.embed_dim=16", "model.backbone.bottom_up.depth=4",
        "model.backbone.bottom_up.last_block_indexes=[0,1,2,3]",
        f"model.backbone.bottom_up.img_size={SQUARE}",
        "model.backbone.bottom_up.drop_path_rate=0.0"]),
}


def _transformer_cfg(kind: str, output_dir: str, weights: str, student: str = RCNN_STUDENT):
    config, overrides = TRANSFORMER_TEACHERS[kind]
    cfg = tiny_training_cfg(student, output_dir)
    cfg.DISTILL.TEACHER.CONFIGS = [PROJECTS_PREFIX + config]
    cfg.DISTILL.TEACHER.WEIGHTS = [weights]
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = _cascade_head_overrides() + overrides
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS = 2
    cfg.DISTILL.PROTOTYPES.NUM_PER_CLASS = 2
    return cfg


@pytest.fixture(scope="module")
def transformer_weights(module_tmp_path_factory):
    """kind -> a checkpoint of the shrunk teacher with random weights (built on first use)."""
    files = {}

    def weights_for(kind: str) -> str:
        if kind not in files:
            directory = module_tmp_path_factory.mktemp(kind)
            cfg = _transformer_cfg(kind, str(directory), "(random)")
            torch.manual_seed(0)
            model = build_teacher_model(teacher_specs(cfg)[0], cfg)[0]
            DetectionCheckpointer(model, save_dir=str(directory)).save("teacher")
            files[kind] = str(directory / "teacher.pth")
        return files[kind]

    return weights_for


@pytest.mark.slow
@needs_vitdet
@pytest.mark.parametrize("kind", sorted(TRANSFORMER_TEACHERS))
def test_transformer_cascade_teacher_loads_strictly_and_distils_with_every_head(
        kind, transformer_weights, tiny_digitsdet, tmp_path):
    cfg = _transformer_cfg(kind, str(tmp_path), transformer_weights(kind))
    cfg.DISTILL.HEADS = FEATURE_HEADS + RESPONSE_HEADS
    cfg.DISTILL.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.DISTILL.DETKDS.GENOME = DETKDS_INPUTS
    trainer = DistillTrainer(cfg)
    teacher = trainer.model.teachers[0]
    # the pyramid's levels are the student's by name and stride; channels differ: adapters
    assert teacher.levels == {level: level for level in cfg.DISTILL.IN_FEATURES}
    assert {s.stride for s in teacher.backbone_shapes.values()} == {4, 8, 16, 32, 64}
    assert set(trainer.model.heads["FitNetHead"].aligner.adapters) == set(cfg.DISTILL.IN_FEATURES)
    assert type(teacher.model.roi_heads).__name__ == "CascadeROIHeads"
    assert teacher.input_format == "RGB"  # the LazyConfig's normalisation reached the teacher
    assert torch.allclose(teacher.model.pixel_mean.flatten(),
                          torch.tensor([123.675, 116.28, 103.53]))
    inputs = []
    hook = teacher.model.backbone.register_forward_hook(
        lambda module, args, out: inputs.append(tuple(args[0].shape)))
    saved = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer.train()
    hook.remove()
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    # the student's 144 x 192 batch reached the teacher padded to its fixed square
    assert inputs and all(shape[-2:] == (SQUARE, SQUARE) for shape in inputs)
    losses = trainer.storage.latest()
    for head in [DISTILL_HEAD_REGISTRY.get(h).name for h in cfg.DISTILL.HEADS]:
        found = [k for k in losses if k.startswith(f"loss_kd_{head}")]
        assert found and all(torch.isfinite(torch.tensor(losses[k][0])) for k in found), head
    assert {f"loss_kd_detkds_{x}" for x in ("global", "fgbg", "instance", "logit", "loc")
            } <= set(losses)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.model.state_dict().items())


@pytest.mark.slow
@needs_vitdet
def test_transformer_teacher_for_a_retinanet_student_feature_heads_and_levels(
        transformer_weights, tiny_digitsdet, tmp_path):
    """A dense student: every feature head and GK's feature + global terms; the student's p7
    (stride 128) has no teacher level; GK's response term needs a RetinaNet teacher."""
    cfg = _transformer_cfg("vitdet_b", str(tmp_path), transformer_weights("vitdet_b"),
                           student=RETINANET_STUDENT)
    cfg.DISTILL.HEADS = FEATURE_HEADS
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    with pytest.raises(ConfigError, match=r"^DISTILL.IN_FEATURES level 'p7' must exist in "
                                          r"student and teacher.*p6: 32ch/stride 64\}"):
        check_model(cfg)
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    with pytest.raises(ConfigError, match=r"^GlobalKnowledgeHead: dense response distillation "
                                          r".*DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_WEIGHT 0 keeps "
                                          r"its feature"):
        check_model(cfg)
    cfg.DISTILL.GLOBAL_KNOWLEDGE.RESPONSE_WEIGHT = 0.0
    trainer = DistillTrainer(cfg)
    trainer.train()
    losses = trainer.storage.latest()
    assert losses["loss_kd_global_knowledge_resp"][0] == 0.0
    for head in [DISTILL_HEAD_REGISTRY.get(h).name for h in cfg.DISTILL.HEADS]:
        assert any(k.startswith(f"loss_kd_{head}") for k in losses), head


@needs_vitdet
def test_vitdet_teacher_input_is_its_own_preprocessing(transformer_weights, tiny_digitsdet,
                                                       tmp_path):
    """The student's batch re-encoded for the teacher equals what the teacher's own
    ``preprocess_image`` makes of the same images (its normalisation, padded to its square);
    a batch larger than the square keeps the pyramid's strides."""
    cfg = _transformer_cfg("vitdet_b", str(tmp_path), transformer_weights("vitdet_b"))
    model = build_model(cfg)
    student, teacher = model.student, model.teachers[0]
    torch.manual_seed(0)
    for sizes, padded in [([(100, 150), (144, 192)], (SQUARE, SQUARE)),
                          ([(300, 200), (144, 192)], (320, SQUARE))]:
        inputs = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()}
                  for h, w in sizes]
        batch = student.preprocess_image(inputs)
        ours = teacher.normalize(batch, student.pixel_mean, student.pixel_std, cfg.INPUT.FORMAT)
        own = teacher.model.preprocess_image(inputs) if padded == (SQUARE, SQUARE) else None
        assert ours.shape[-2:] == padded
        if own is not None:  # within the square, detectron2's own padding is the reference
            assert own.tensor.shape == ours.shape
            assert torch.allclose(own.tensor, ours, atol=1e-4)
        features = teacher.features(ours)
        assert {l: tuple(f.shape[-2:]) for l, f in features.items()} == {
            f"p{k}": (padded[0] // 2 ** k, padded[1] // 2 ** k) for k in range(2, 7)}


def test_padded_size_honours_the_simple_feature_pyramids_constraints():
    class SimpleFeaturePyramidLike:  # upstream's ViTDet pyramid, its key misspelled as there
        size_divisibility = 0
        padding_constraints = {"size_divisiblity": 32, "square_size": 256}

    class SquareFPN:  # Swin / MViTv2 + FPN with square_pad
        size_divisibility = 32
        padding_constraints = {"square_size": 256}

    assert padded_size(SimpleFeaturePyramidLike(), 144, 192) == (256, 256)  # as detectron2
    assert padded_size(SimpleFeaturePyramidLike(), 300, 200) == (320, 256)  # not cropped
    assert padded_size(SquareFPN(), 144, 192) == (256, 256)
    assert padded_size(SquareFPN(), 300, 250) == (320, 256)


@needs_vitdet
def test_coco_transformer_chain_builds_every_stage(tmp_path):
    """configs/COCO's RetinaNet chain (R-101 RetinaNet -> Swin-B Cascade Mask R-CNN) passes the
    pre-start check of every stage, stage 2 on p3-p6 (teachers shrunk, random weights)."""
    cfg = load_config(os.path.join(CONFIGS, "COCO/retinanet_R50_from_R101_swinB_mtpd_mgd.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.DISTILL.TEACHER.OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS",
                                "64", "MODEL.FPN.OUT_CHANNELS", "32"]
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = (_cascade_head_overrides()
                                          + TRANSFORMER_TEACHERS["swin_b"][1])
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES[0] = "model.roi_heads.num_classes=80"
    weights = []
    for spec in teacher_specs(cfg):
        model = build_teacher_model(replace(spec, weights="(random)"), cfg)[0]
        DetectionCheckpointer(model, save_dir=str(tmp_path)).save(f"teacher{spec.index}")
        weights.append(str(tmp_path / f"teacher{spec.index}.pth"))
    cfg.DISTILL.TEACHER.WEIGHTS = weights
    check_model(cfg)  # every stage on the meta device; raises with one line otherwise
    cfg.DISTILL.SCHEDULE.STAGE_OPTS = []  # stage 2 would distil p7, which Swin-B lacks
    with pytest.raises(ConfigError, match=r"^DISTILL.IN_FEATURES level 'p7' must exist"):
        check_model(cfg)


# ---- references to detectron2's projects/ ----------------------------------------------------
def test_projects_references_resolve_under_detectron2_projects(tmp_path, monkeypatch):
    cfg = tiny_training_cfg(RCNN_STUDENT, str(tmp_path))
    config = tmp_path / "projects" / "X" / "configs" / "teacher.py"
    config.parent.mkdir(parents=True)
    config.write_text("model = None\n")
    cfg.DISTILL.TEACHER.CONFIGS = [PROJECTS_PREFIX + "X/configs/teacher.py"]
    cfg.DISTILL.TEACHER.WEIGHTS = ["w.pth"]
    monkeypatch.setenv("DETECTRON2_PROJECTS", str(tmp_path / "projects"))
    spec = teacher_specs(cfg)[0]
    assert (spec.config_file, spec.kind) == (str(config), "lazy")
    cfg.DISTILL.TEACHER.CONFIGS = [PROJECTS_PREFIX + "X/configs/other.py"]
    with pytest.raises(ConfigError, match=r"X/configs/other.py: no file .*other.py"):
        teacher_specs(cfg)
    monkeypatch.setenv("DETECTRON2_PROJECTS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"needs detectron2's projects/ folder, which a "
                                          r"pip-installed detectron2 does not contain; set "
                                          r"DETECTRON2_PROJECTS .*nowhere"):
        teacher_specs(cfg)


@pytest.mark.skipif(not MISSING_BACKBONES, reason="this detectron2 has the transformer "
                                                  "backbones (the error is v0.6's)")
def test_transformer_teacher_on_v06_is_one_error_naming_the_missing_backbones(tmp_path):
    cfg = tiny_training_cfg(RCNN_STUDENT, str(tmp_path))
    config = tmp_path / "swin_teacher.py"
    config.write_text("from detectron2.modeling import SwinTransformer\nmodel = None\n")
    cfg.DISTILL.TEACHER.CONFIGS = [str(config)]
    cfg.DISTILL.TEACHER.WEIGHTS = ["w.pth"]
    with pytest.raises(ConfigError, match=r"cannot be loaded: ImportError: .*SwinTransformer.*; "
                                          r"this detectron2 lacks ViT, SimpleFeaturePyramid, "
                                          r"SwinTransformer, MViT \(added after v0.6\)"):
        load_teacher_config(teacher_specs(cfg)[0], cfg)


# ---- the DigitsDet Swin teacher: a yacs config (build_swin_fpn_backbone) -------------------
needs_swin = pytest.mark.skipif(
    "SwinTransformer" in MISSING_BACKBONES,
    reason="this detectron2 lacks SwinTransformer (added after v0.6): the DigitsDet Swin "
           "teacher needs detectron2 main (make test-upstream)")
SWIN_CHAIN = "DigitsDet/retinanet_R18_from_R50_SwinT_mtpd_mgd.yaml"


@needs_swin
def test_swin_fpn_backbone_levels_are_the_resnet_fpns(tmp_path):
    """P3-P7 at strides 8-128 from Swin stages p1-p3, like the R-50/2 teacher's pyramid, and
    the FPN reads the Swin stages the config names."""
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_SwinT_teacher.yaml"))
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert {k: (s.stride, s.channels) for k, s in shapes.items()} == {
        f"p{k}": (2 ** k, 128) for k in range(3, 8)}
    swin = model.backbone.bottom_up
    assert type(swin).__name__ == "SwinTransformer"
    # stage i: 48 * 2**i channels at stride 4 * 2**i; the FPN takes p1-p3
    assert {k: (s.stride, s.channels) for k, s in swin.output_shape().items()} == {
        "p1": (8, 96), "p2": (16, 192), "p3": (32, 384)}
    assert [len(layer.blocks) for layer in swin.layers] == [2, 2, 4, 2]
    assert model.backbone.size_divisibility == 32
    images = torch.rand(1, 3, 160, 192)  # a 144 x 192 DigitsDet batch, padded
    features = model.backbone(images)
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "p3": (20, 24), "p4": (10, 12), "p5": (5, 6), "p6": (3, 3), "p7": (2, 2)}
    cfg.MODEL.FPN.IN_FEATURES = ["p1", "p4"]
    with pytest.raises(ValueError, match=r"names \['p4'\], which the Swin backbone does not "
                                         r"have: its stages are \['p0', 'p1', 'p2', 'p3'\]"):
        build_model(cfg)


@pytest.mark.slow
@needs_swin
def test_swin_teacher_chain_builds_on_meta_and_distils(tiny_digitsdet, tmp_path):
    """The CNN -> transformer chain of configs/DigitsDet: the pre-start check builds both
    stages on the meta device (Swin reads its drop-path rates with .item() while built), and
    the Swin stage trains the student with random teacher weights saved to files."""
    cfg = tiny_training_cfg(SWIN_CHAIN, str(tmp_path), max_iter=4)
    cfg.DISTILL.SCHEDULE.STAGE_ITERS = [2, 2]
    weights = []
    for k, spec in enumerate(teacher_specs(cfg)):
        teacher_cfg = load_teacher_config(spec, cfg)
        torch.manual_seed(k)
        DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(tmp_path)).save(f"t{k}")
        weights.append(str(tmp_path / f"t{k}.pth"))
    cfg.DISTILL.TEACHER.WEIGHTS = weights
    check_model(cfg)
    trainer = DistillTrainer(cfg)
    trainer.train()
    assert trainer.iter == 4
    assert trainer.model.teachers[0] is None  # the R-50/2 stage is over
    teacher = trainer.model.teachers[1]
    assert type(teacher.model.backbone.bottom_up).__name__ == "SwinTransformer"
    assert teacher.levels == {level: level for level in cfg.DISTILL.IN_FEATURES}
    assert torch.isfinite(torch.tensor(trainer.storage.latest()["loss_kd_mgd_feat"][0]))


@pytest.mark.skipif(not MISSING_BACKBONES, reason="this detectron2 has SwinTransformer (the "
                                                  "error is v0.6's)")
def test_swin_backbone_on_v06_is_one_error():
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet/retinanet_SwinT_teacher.yaml"))
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ImportError, match=r"^MODEL.BACKBONE.NAME build_swin_fpn_backbone needs "
                                          r"detectron2's SwinTransformer.*make setup-upstream"):
        build_model(cfg)
