"""Every distillation head's losses on the device, forward and backward, with no host read
(tests/test_device_placement.py explains the environments: fake CUDA and meta tensors on any
machine, real CUDA in the ``cuda`` group), one case of conftest's ``HEAD_CASES`` each; the
heads' logged scalars reach the storage in one host read per step; on a GPU, the global
knowledge head's KD instances read the host once, and a distillation step with every head keeps
every loss and gradient on the device."""
import os
import warnings
from typing import Dict, List

import pytest
import torch
from conftest import (
    ANCHORS,
    BATCH,
    CONFIGS,
    HEAD_CASES,
    IMAGE_SIZES,
    LEVELS,
    NUM_CLASSES,
    PROTOTYPES,
    STUDENT_CHANNELS,
    TEACHER_CHANNELS,
    FakeCuda,
    RealCuda,
    assert_on_device,
    backward_on_device,
    current_device,
    device_boxes,
    device_gt_instances,
    device_images,
    fill_prototype_banks,
    level_grid,
    level_maps,
    level_shapes,
    needs_gpu,
    register_project_head,
)
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2kd.heads.detkds.head
from d2kd.config import get_d2kd_cfg, load_config
from d2kd.heads import DISTILL_HEAD_REGISTRY, TeacherOutputs
from d2kd.heads.global_knowledge import KDInstances
from d2kd.structures import StudentTaps
from d2kd.utils.step_scalars import flush_tensor_scalars, pending_tensor_scalars

# The project head registered outside d2kd (a case of HEAD_CASES).
register_project_head()

GENOME = ("global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2;"
          "instance:mask|no|norm_C|l2|w=1;logit:no|no|softmax_C|kl|w=1;"
          "loc:no|no|batch|smooth_l1|w=1")


# ---- inputs of the heads -----------------------------------------------------------------
def _dense(grad: bool):
    device = current_device()
    logits = [torch.randn(BATCH, ANCHORS * NUM_CLASSES, *level_grid(l), device=device,
                          requires_grad=grad) for l in LEVELS]
    deltas = [torch.randn(BATCH, ANCHORS * 4, *level_grid(l), device=device, requires_grad=grad)
              for l in LEVELS]
    return [logits, deltas]


def _rpn(grad: bool):
    device = current_device()
    objectness = [torch.randn(BATCH, ANCHORS, *level_grid(l), device=device, requires_grad=grad)
                  for l in LEVELS]
    deltas = [torch.randn(BATCH, ANCHORS * 4, *level_grid(l), device=device, requires_grad=grad)
              for l in LEVELS]
    return objectness, deltas


ROIS_PER_IMAGE = 8


def _roi_predictions(grad: bool):
    rois = BATCH * ROIS_PER_IMAGE
    return (torch.randn(rois, NUM_CLASSES + 1, device=current_device(), requires_grad=grad),
            torch.randn(rois, 4 * NUM_CLASSES, device=current_device(), requires_grad=grad))


def _sampled_proposals() -> List[Instances]:
    out = []
    for height, width in IMAGE_SIZES:
        proposals = Instances((height, width))
        proposals.proposal_boxes = Boxes(device_boxes(ROIS_PER_IMAGE))
        proposals.gt_classes = torch.randint(0, NUM_CLASSES + 1, (ROIS_PER_IMAGE,),
                                             device=current_device())
        out.append(proposals)
    return out


def _student(arch: str) -> StudentTaps:
    """What a RetinaNet ("dense") or R-CNN ("rcnn") student exposes, on the device."""
    taps = StudentTaps(images=device_images(), gt_instances=device_gt_instances(),
                       features=level_maps(STUDENT_CHANNELS, grad=True))
    if arch == "dense":
        taps.dense_predictions = _dense(grad=True)
        taps.anchors = [Boxes(device_boxes(level_grid(l)[0] * level_grid(l)[1] * ANCHORS))
                        for l in LEVELS]
        total = sum(len(a) for a in taps.anchors)
        taps.anchor_labels = [torch.randint(-1, NUM_CLASSES + 1, (total,), device=current_device())
                              for _ in range(BATCH)]
    else:
        taps.rpn_predictions = _rpn(grad=True)
        taps.sampled_proposals = _sampled_proposals()
        taps.roi_predictions = _roi_predictions(grad=True)
    return taps


def _teacher(arch: str) -> TeacherOutputs:
    outputs = TeacherOutputs(features=level_maps(TEACHER_CHANNELS, grad=False))
    if arch == "dense":
        outputs.dense_predictions = _dense(grad=False)
    else:
        outputs.rpn_predictions = _rpn(grad=False)
        outputs.roi_predictions = _roi_predictions(grad=False)
    return outputs


def _leaves(taps: StudentTaps) -> List[torch.Tensor]:
    leaves = list(taps.features.values())
    for group in (taps.dense_predictions or []) + list(taps.rpn_predictions or []):
        leaves += list(group)
    return leaves + list(taps.roi_predictions or [])


# ---- heads ------------------------------------------------------------------------------
def _cfg(arch: str, **options):
    """A head config on LEVELS; ``options``: dotted DISTILL keys (``"DFD.LENIENT"``) -> value."""
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = LEVELS
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = "RetinaNet" if arch == "dense" else "GeneralizedRCNN"
    cfg.MODEL.RETINANET.IN_FEATURES = LEVELS
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.RPN.IN_FEATURES = LEVELS
    cfg.MODEL.ROI_HEADS.IN_FEATURES = LEVELS  # the box pooler's levels (GK response weights)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = PROTOTYPES
    cfg.DISTILL.DFD.STATS_PERIOD = 1
    cfg.DISTILL.DETKDS.GENOME = GENOME
    for key, value in options.items():
        node = cfg.DISTILL
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def _fixed_kd_instances(taps: StudentTaps, arch: str) -> Dict[str, KDInstances]:
    """KD instances of fixed number (what ``kd_instances`` would select, minus its host read)."""
    rows = (BATCH * sum(len(a) for a in taps.anchors) if arch == "dense"
            else BATCH * ROIS_PER_IMAGE)
    count, device = 5, current_device()
    return {l: KDInstances(device_boxes(count),
                           torch.randint(0, NUM_CLASSES, (count,), device=device),
                           torch.randint(0, BATCH, (count,), device=device),
                           torch.randint(0, rows, (count,), device=device)) for l in LEVELS}


# ---- heads ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_losses_forward_and_backward(env, case, monkeypatch):
    """Built on the device, fed device inputs: losses, logged scalars and gradients stay on
    it, and the forward reads nothing on the host."""
    name, arch, options = HEAD_CASES[case]
    if isinstance(env, FakeCuda):  # its value check cannot run on fake tensors (listed)
        monkeypatch.setattr(d2kd.heads.detkds.head, "dry_run", lambda genome, batch_size: None)
    cfg = _cfg(arch, **options)
    with env.building():
        head = DISTILL_HEAD_REGISTRY.get(name)(cfg, level_shapes(STUDENT_CHANNELS),
                                               level_shapes(TEACHER_CHANNELS))
    assert_on_device(*head.parameters(), *head.buffers())
    with env.running(), EventStorage(0) as storage:
        fill_prototype_banks(head)
        student, teacher = _student(arch), _teacher(arch)
        instances = None
        if name == "GlobalKnowledgeHead":
            instances = (_fixed_kd_instances(student, arch) if type(env) is not RealCuda
                         else head.kd_instances(student))  # one host read (cuda group only)
        with env.no_host_sync():
            losses = (head(student, teacher) if instances is None
                      else head.instance_losses(student, teacher, instances))
        assert losses and all(v.dim() == 0 for v in losses.values())
        assert_on_device(*losses.values())
        logged = pending_tensor_scalars(storage)
        assert logged or name in ("LocKDHead", "DetKDSHead") or case == "logit_rcnn"
        assert_on_device(*logged.values())
        backward_on_device(env, sum(losses.values()), _leaves(student), [head])
        if type(env) is RealCuda:
            assert torch.isfinite(sum(losses.values()).detach()).item()
            assert flush_tensor_scalars(storage) == (1 if logged else 0)

# ---- logging: one host read per step ----------------------------------------------------
def test_logged_scalars_reach_the_storage_at_the_flush():
    with EventStorage(7) as storage:
        storage.put_scalar("plain", 1.0)
        head = DISTILL_HEAD_REGISTRY.get("FitNetHead")(_cfg("dense"), level_shapes(3),
                                                       level_shapes(3))
        head.log("loss", {"p3": torch.tensor(0.25), "p4": torch.tensor(2)})
        head.log_scalar("extra", torch.tensor([True]))
        assert "kd/fitnet/loss/p3" not in storage.latest()  # queued, not read
        assert set(pending_tensor_scalars(storage)) == {"kd/fitnet/loss/p3", "kd/fitnet/loss/p4",
                                                        "kd/fitnet/extra"}
        assert flush_tensor_scalars(storage) == 1 and not pending_tensor_scalars(storage)
        latest = storage.latest()
        assert latest["kd/fitnet/loss/p3"] == (0.25, 7) and latest["kd/fitnet/loss/p4"] == (2.0, 7)
        assert latest["kd/fitnet/extra"] == (1.0, 7)
        assert flush_tensor_scalars(storage) == 0
        head.log("loss", {"p3": torch.tensor(1.0)})
        storage.step()  # a caller that never flushed: the next iteration's first value does
        head.log("loss", {"p3": torch.tensor(3.0)})
        assert storage.history("kd/fitnet/loss/p3").values()[-1][0] == 1.0
        assert pending_tensor_scalars(storage) == {"kd/fitnet/loss/p3": torch.tensor(3.0)}


# ---- real CUDA only: what fake tensors cannot run ----------------------------------------
def _count_syncs(fn):
    """(fn(), number of host synchronisations it made), by CUDA's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("arch", ["dense", "rcnn"])
def test_cuda_kd_instances_read_the_host_once(arch):
    with torch.device("cuda"):
        head = DISTILL_HEAD_REGISTRY.get("GlobalKnowledgeHead")(
            _cfg(arch), level_shapes(STUDENT_CHANNELS), level_shapes(TEACHER_CHANNELS))
    student = _student(arch)
    instances, syncs = _count_syncs(lambda: head.kd_instances(student))
    assert syncs <= 1
    for kd in instances.values():
        assert_on_device(kd.boxes, kd.classes, kd.images, kd.rows)


@pytest.mark.slow
@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("config, heads", [
    ("retinanet_R18_from_R50_detkds.yaml",
     ["FitNetHead", "MGDHead", "FGFIHead", "FgBgHead", "LogitKDHead", "LocKDHead", "DFDHead",
      "GlobalKnowledgeHead", "DetKDSHead"]),
    ("faster_rcnn_R18_from_R50_detkds.yaml",
     ["FitNetHead", "FgBgHead", "LogitKDHead", "LocKDHead", "DFDHead", "GlobalKnowledgeHead",
      "DetKDSHead"]),
])
def test_cuda_distillation_step_with_every_head(tmp_path, config, heads):
    """One training step of a DistillationDetector on the GPU: every loss and gradient on the
    device, the heads' scalars in the storage after one host read."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(CONFIGS, "DigitsDet", config), ["MODEL.WEIGHTS", ""])
    teacher_cfg = load_config(cfg.DISTILL.TEACHER.CONFIGS[0], ["MODEL.WEIGHTS", ""])
    DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(tmp_path)).save("teacher")
    cfg.DISTILL.TEACHER.WEIGHTS = [str(tmp_path / "teacher.pth")]
    cfg.DISTILL.HEADS = heads
    cfg.MODEL.DEVICE = "cuda"
    model = build_model(cfg)
    model.train()
    batch = []
    for height, width in IMAGE_SIZES:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 28.0], [20.0, 8.0, 44.0, 36.0]]))
        instances.gt_classes = torch.tensor([0, 2])
        batch.append({"image": torch.randint(0, 255, (3, height, width), dtype=torch.uint8),
                      "height": height, "width": width, "instances": instances})
    with EventStorage(0) as storage:
        losses = model(batch)
        assert not pending_tensor_scalars(storage)  # flushed by head_losses
        assert any(k.startswith("kd/") for k in storage.latest())
    assert_on_device(*losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert_on_device(*grads)
