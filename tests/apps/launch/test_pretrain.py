"""Segmentation-pretext pre-training and the digitsdet-pretrained:// backbone cache."""
import os

import pytest
import torch
from conftest import CONFIGS, tiny_training_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from d2kd.apps.launch.pretrain import ensure_pretrained_backbone
from d2kd.config import load_config


def _instances(h, w, masks, classes):
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(torch.stack(masks))
    inst.gt_classes = torch.tensor(classes)
    return inst


def test_label_maps_and_loss(tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg("DigitsDet/pretrain/R18_FPN64.yaml", str(tmp_path))
    model = build_model(cfg)
    h, w = 40, 56
    mask_a = torch.zeros(h, w, dtype=torch.bool)
    mask_a[4:10, 6:12] = True
    mask_b = torch.zeros(h, w, dtype=torch.bool)
    mask_b[20:30, 30:50] = True
    inputs = [{"image": torch.rand(3, h, w) * 255,
               "instances": _instances(h, w, [mask_a, mask_b], [3, 7])}]
    labels = model._label_maps(inputs, (64, 64))
    expected = torch.full((1, 64, 64), -1)
    expected[0, :h, :w] = 0
    expected[0, 4:10, 6:12] = 4
    expected[0, 20:30, 30:50] = 8
    assert torch.equal(labels, expected)
    model.train()
    loss = model(inputs)["loss_pretext"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_pretrained_backbone_is_trained_once_and_loads_into_detectors(tiny_digitsdet):
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0"]
    path = ensure_pretrained_backbone("R18_FPN64", tiny_digitsdet, opts)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert state and all(k.startswith("backbone.") for k in state)
    mtime = os.path.getmtime(path)
    assert ensure_pretrained_backbone("R18_FPN64", tiny_digitsdet, opts) == path
    assert os.path.getmtime(path) == mtime, "a cached backbone is never trained again"
    for family in ("retinanet", "faster_rcnn"):
        cfg = load_config(os.path.join(CONFIGS, "DigitsDet", f"{family}_R18_student.yaml"))
        model = build_model(cfg)
        DetectionCheckpointer(model).load(path)
        own = model.state_dict()
        loaded = [k for k in state if k in own]
        assert any(".bottom_up." in k for k in loaded) and any("fpn_" in k for k in loaded)
        for key in loaded:
            assert torch.equal(own[key], state[key]), key
