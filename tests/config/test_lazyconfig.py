"""The LazyConfig distillation recipe (configs/DigitsDet/retinanet_R18_from_R50_mgd.py) is the
twin of its yacs config, and it trains with the lazy train script
(d2kd/apps/launch/lazy_train_net.py).

Twin, checked piece by piece against the yacs build: the student (every tensor name and shape,
and the same outputs given the same weights), the MGD head (its losses on the same inputs),
the optimizer's parameter groups and the learning-rate curve.
"""
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIGS
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier
from detectron2.utils.events import EventStorage

from d2kd.apps.launch.lazy_train_net import do_train
from d2kd.config import load_config
from d2kd.engine import DistillTrainer
from d2kd.engine.optimizer import build_optimizer

RECIPE = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_mgd.py")
YACS_TWIN = os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_mgd.yaml")


def _recipe(teacher_weights: str):
    cfg = LazyConfig.load(RECIPE)
    cfg.model.teacher.weights = teacher_weights
    return cfg


def _yacs(teacher_weights: str):
    cfg = load_config(YACS_TWIN, ["MODEL.WEIGHTS", ""])
    cfg.DISTILL.TEACHER.WEIGHTS = [teacher_weights]
    return cfg


def test_recipe_student_is_the_yacs_student():
    lazy = instantiate(LazyConfig.load(RECIPE).model.student)
    yacs = build_model(load_config(os.path.join(CONFIGS, "DigitsDet",
                                                "retinanet_R18_student.yaml"),
                                   ["MODEL.WEIGHTS", ""]))
    lazy_state, yacs_state = lazy.state_dict(), yacs.state_dict()
    assert {k: v.shape for k, v in lazy_state.items()} == {k: v.shape
                                                           for k, v in yacs_state.items()}
    for name in ("num_classes", "head_in_features", "test_score_thresh", "test_topk_candidates",
                 "test_nms_thresh", "max_detections_per_image", "box_reg_loss_type",
                 "smooth_l1_beta", "focal_loss_alpha", "focal_loss_gamma", "input_format"):
        assert getattr(lazy, name) == getattr(yacs, name), name
    for a, b in zip(lazy.anchor_generator.cell_anchors, yacs.anchor_generator.cell_anchors):
        assert torch.allclose(a, b)
    assert torch.equal(lazy.pixel_mean, yacs.pixel_mean)
    assert torch.equal(lazy.pixel_std, yacs.pixel_std)
    assert lazy.box2box_transform.weights == yacs.box2box_transform.weights
    # same weights, same outputs: backbone maps and head predictions
    lazy.load_state_dict(yacs_state)
    lazy.eval(), yacs.eval()
    images = torch.rand(2, 3, 160, 192)
    with torch.no_grad():
        lazy_features, yacs_features = lazy.backbone(images), yacs.backbone(images)
        assert lazy_features.keys() == yacs_features.keys()
        for level in lazy_features:
            assert torch.equal(lazy_features[level], yacs_features[level])
        features = [yacs_features[level] for level in yacs.head_in_features]
        for a, b in zip(lazy.head(features), yacs.head(features)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_recipe_distillation_losses_optimizer_and_lr_curve_are_the_yacs_ones(teacher_weights):
    lazy = instantiate(_recipe(teacher_weights).model)
    yacs_cfg = _yacs(teacher_weights)
    yacs = build_model(yacs_cfg)
    assert list(lazy.heads) == list(yacs.heads) == ["MGDHead"]
    state = yacs.state_dict()
    assert {k: v.shape for k, v in lazy.state_dict().items()} == {k: v.shape
                                                                 for k, v in state.items()}
    lazy.load_state_dict(state)
    assert lazy.teachers[0].weights == yacs.teachers[0].weights == teacher_weights
    assert lazy.teachers[0].levels == yacs.teachers[0].levels
    # the same training step (same seed: MGD's random masks are drawn in the same order)
    batch = [{"image": torch.rand(3, 144, 192) * 255, "height": 144, "width": 192,
              "instances": _instances()}]
    losses = {}
    for name, model in (("lazy", lazy), ("yacs", yacs)):
        model.train()
        torch.manual_seed(0)
        with EventStorage(0):
            losses[name] = {k: v.item() for k, v in model(batch).items()}
    assert losses["lazy"].keys() == losses["yacs"].keys() >= {"loss_cls", "loss_kd_mgd_feat"}
    for key, value in losses["yacs"].items():
        assert losses["lazy"][key] == pytest.approx(value, rel=1e-6), key
    # optimizer: per parameter the same learning rate, weight decay and betas
    recipe = _recipe(teacher_weights)
    recipe.optimizer.params.model = lazy
    lazy_optimizer = instantiate(recipe.optimizer)
    yacs_optimizer = build_optimizer(yacs_cfg, yacs)
    assert type(lazy_optimizer).__mro__[1:] == type(yacs_optimizer).__mro__[1:]  # clipped AdamW

    def per_parameter(optimizer, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"], g["weight_decay"], g["betas"])
                for g in optimizer.param_groups for p in g["params"]}

    assert per_parameter(lazy_optimizer, lazy) == per_parameter(yacs_optimizer, yacs)
    # learning-rate curve: warm-up then cosine, the yacs scheduler's values
    scheduler = LRMultiplier(lazy_optimizer, instantiate(recipe.lr_multiplier),
                             recipe.train.max_iter)
    yacs_scheduler = DistillTrainer.build_lr_scheduler(yacs_cfg, yacs_optimizer)
    for _ in range(recipe.train.max_iter):
        assert lazy_optimizer.param_groups[0]["lr"] == pytest.approx(
            yacs_optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        scheduler.step()
        yacs_scheduler.step()


def _instances():
    from detectron2.structures import Boxes, Instances

    instances = Instances((144, 192))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 30.0, 150.0, 70.0]]))
    instances.gt_classes = torch.tensor([3, 7])
    return instances


@pytest.mark.slow
def test_recipe_trains_with_the_lazy_train_script(tiny_digitsdet, teacher_weights, tmp_path):
    cfg = _recipe(teacher_weights)
    cfg.dataloader.train.dataset.names = "digitsdet_tiny_train"
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.test.dataset.names = "digitsdet_tiny_val"
    cfg.dataloader.test.num_workers = 0
    cfg.dataloader.evaluator.dataset_name = "digitsdet_tiny_val"
    cfg.train.max_iter = 3
    cfg.train.init_checkpoint = ""
    cfg.train.output_dir = str(tmp_path)
    cfg.train.checkpointer.period = 2
    do_train(SimpleNamespace(resume=False), cfg)
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "results.json").is_file()
    student = torch.load(tmp_path / "model_final_student.pth", weights_only=True)["model"]
    assert student and not any(k.startswith(("student.", "heads.")) for k in student)
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert checkpoint["iteration"] == 2
    assert not any(k.startswith("teacher") for k in checkpoint["model"])


@pytest.mark.slow
@pytest.mark.long
def test_recipe_trains_in_two_processes(teacher_weights, tmp_path):
    """``--num-gpus 2`` on CPU (gloo, d2kd's DDP wrapper with the recipe's train.ddp
    options), through the command line a user types."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "d2kd.apps.launch.lazy_train_net", "--num-gpus", "2",
         "--config-file", RECIPE, "train.max_iter=2", "train.init_checkpoint=",
         f"train.output_dir={out}", f"model.teacher.weights={teacher_weights}",
         "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=0",
         "dataloader.test.num_workers=0"],
        check=True, cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1",
                 DETECTRON2_DATASETS=os.path.join(REPO, "datasets")))
    assert (out / "model_final_student.pth").is_file()
    assert (out / "inference" / "results.json").is_file()
