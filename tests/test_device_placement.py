"""Device placement and host synchronisation, on a CPU-only machine, with fake CUDA tensors.

``FakeTensorMode`` makes tensors that carry a device, a dtype and a shape but no data. An op
that mixes a CPU and a CUDA tensor raises ``FakeTensorDeviceMismatchError``, as a GPU run would,
and reading a value on the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``,
``nonzero``, boolean indexing) raises too: those are the host synchronisations a GPU step
pays. Every component whose ops allow it is built on ``"cuda"`` here and run: each head's
losses, teacher re-normalisation and forward, adapters, prototype pooling / selection / bank,
teacher-ordering statistics, DetKDS ops and distances. The components that cannot run under it
are listed, with the reason, in ``CANNOT_RUN_UNDER_FAKE_TENSORS``;
``test_every_component_is_covered_or_listed`` checks that the two lists together name every
registered head and every listed component, so that a new head cannot be forgotten (DetKDS ops
and distances are parametrised from their registries).

Backward: PyTorch's autograd engine needs an initialised CUDA context to run a backward over
CUDA tensors, fake ones included (pytorch/pytorch#92627), so on a CPU-only machine the fake
runs build the autograd graph but do not run it. Every test therefore also runs on ``meta``
tensors (no data, no host reads, a device other than the CPU; they miss some mixes that fake
tensors catch, e.g. ``cpu_tensor += meta_tensor``), forward *and* backward.

Modules are built inside ``torch.device(<device>)`` (their parameters and buffers there, like
``model.to(device)``) and run outside it, so that a tensor made without ``device=`` in the
running code lands on the CPU and is caught.

The ``cuda`` group (``pytest -m cuda``, skipped without a GPU) runs the same components on real
CUDA tensors, forward and backward, the forward under ``torch.cuda.set_sync_debug_mode("error")``
(no host synchronisation), plus what fake tensors cannot run: the listed components and a
distillation step of every head on a RetinaNet and a Faster R-CNN student.
"""
import contextlib
import os
import warnings
from typing import Callable, Dict, List

import pytest
import torch
from conftest import CONFIGS, REPO
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch._subclasses.fake_tensor import FakeTensorMode

import d2kd.heads.detkds.head
from d2kd.config import get_d2kd_cfg, load_config
from d2kd.config.loading import import_extensions
from d2kd.engine.teacher_order import AdapterFit
from d2kd.heads import DISTILL_HEAD_REGISTRY, TeacherOutputs
from d2kd.heads.alignment import FeatureAligner
from d2kd.heads.detkds.genome import Formula, apply_formula, draw_mask
from d2kd.heads.detkds.ops import DISTRIBUTION_OPS
from d2kd.heads.detkds.registry import DISTANCES, SLOT_OPS
from d2kd.heads.global_knowledge import KDInstances
from d2kd.heads.global_knowledge_losses import (
    global_relation_loss,
    local_feature_loss,
    weighted_response_kl,
)
from d2kd.heads.masks import (
    box_area_masks,
    box_cell_masks,
    box_weight_maps,
    gt_boxes_and_images,
    near_object_masks,
    random_keep_mask,
    valid_cell_masks,
)
from d2kd.modeling.teacher import FrozenTeacher
from d2kd.prototypes import PrototypeBank, batched_box_pool, box_cells, box_pool
from d2kd.prototypes.selection import coupled_coefficients, density
from d2kd.structures import StudentTaps
from d2kd.utils.step_scalars import flush_tensor_scalars, pending_tensor_scalars

# The project head registered outside d2kd, so that the registry is the same in every run.
import_extensions([(os.path.join(REPO, "projects", "AttentionKD", "attention_head.py"), "")])

#: Components that cannot run under FakeTensorMode, and why. The ``cuda`` group runs them.
CANNOT_RUN_UNDER_FAKE_TENSORS: Dict[str, str] = {
    "GlobalKnowledgeHead.kd_instances":
        "the KD instances are the positives of the step: their number depends on the data "
        "(one host read of the per-level counts per step); the losses on given instances run",
    "DetKDSHead genome dry run":
        "build-time validation of the genome on random CPU tensors, reading whether the value "
        "is finite; patched out when building the head under fake tensors",
    "FrozenTeacher.roi_predictions":
        "detectron2's ROIPooler assigns boxes to FPN levels with repeat_interleave / nonzero "
        "(data-dependent shapes); what follows the pooling runs (FrozenTeacher.box_predictions)",
    "DistillationDetector.forward":
        "the student's own losses (anchor matching, RPN proposals with NMS, RoI sampling) have "
        "data-dependent shapes; the heads, teachers and taps they feed are run separately",
    "StudentTapper":
        "records what the student's own forward exposes (see DistillationDetector.forward)",
    "select_prototypes":
        "the density filter keeps candidates with nonzero and the greedy pursuit reads each "
        "pick on the host (int(argmax)): refresh-time code, data-dependent by nature",
    "kmeans_prototypes": "clusters on the host with scikit-learn (refresh-time code)",
    "PrototypeBank.relations":
        "selects the valid classes' prototypes by boolean indexing (data-dependent width); "
        "per-step code uses all_relations + valid_columns instead",
    "build_instance_index / instances_per_class":
        "host-side bookkeeping of dataset records (CPU tensors by design, never on the device)",
    "AdapterFit.residual_and_total / normalized_residual":
        "read the fitted costs on the host: once per teacher at a stage switch, by design",
    "flush_tensor_scalars":
        "the step's one host read of the heads' logged scalars, by design",
    "backward (of every component above)":
        "PyTorch's autograd engine needs an initialised CUDA context to run a backward over "
        "CUDA tensors, fake ones too (pytorch/pytorch#92627): the fake runs build and check "
        "the autograd graph; the backward runs on meta tensors here and on a GPU (cuda group)",
}

LEVELS = ["p3", "p4"]
STRIDES = {"p3": 8, "p4": 16}
BATCH, HEIGHT, WIDTH = 2, 48, 64  # the padded batch
IMAGE_SIZES = [(48, 64), (40, 56)]
STUDENT_CHANNELS, TEACHER_CHANNELS = 3, 4  # different: the heads' adapters are in the path
NUM_CLASSES, ANCHORS = 3, 3
PROTOTYPES = 2
GENOME = ("global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2;"
          "instance:mask|no|norm_C|l2|w=1;logit:no|no|softmax_C|kl|w=1;"
          "loc:no|no|batch|smooth_l1|w=1")


# ---- fake CUDA, meta, real CUDA --------------------------------------------------------
class FakeCuda:
    """Fake CUDA tensors on any machine (forward only, see the module docstring)."""

    device, backward = "cuda", False

    def __init__(self):
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)

    @contextlib.contextmanager
    def building(self):
        """Modules made here have their parameters and buffers on the (fake) device."""
        with self.mode, torch.device(self.device):
            yield

    def running(self):
        return self.mode

    def no_host_sync(self):
        return contextlib.nullcontext()  # fake tensors raise on any host read by themselves


class Meta:
    """Meta tensors: forward and backward on any machine."""

    device, backward = "meta", True

    def building(self):
        return torch.device(self.device)

    def running(self):
        return contextlib.nullcontext()

    def no_host_sync(self):
        return contextlib.nullcontext()  # meta tensors have no values to read


class RealCuda(Meta):
    """Real CUDA tensors (the ``cuda`` group)."""

    device = "cuda"

    @contextlib.contextmanager
    def no_host_sync(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_ENVS = {"fake": FakeCuda, "meta": Meta, "cuda": RealCuda}
DEVICE = "cuda"  # where the inputs of the running test are made (set by the ``env`` fixture)


@pytest.fixture(params=["fake", "meta", pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])])
def env(request, monkeypatch):
    environment = _ENVS[request.param]()
    monkeypatch.setitem(globals(), "DEVICE", environment.device)
    return environment


def assert_on_device(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert tensor.device.type == DEVICE, f"{tuple(tensor.shape)} tensor on {tensor.device}"


def _backward(env, total: torch.Tensor, leaves: List[torch.Tensor], modules=()) -> None:
    """Backward of ``total`` where the environment can run it: some leaf receives a gradient,
    and every gradient is on the device. Otherwise (fake CUDA) only the graph is checked."""
    assert total.requires_grad and total.grad_fn is not None
    if not env.backward:
        return
    total.backward()
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    grads += [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    assert grads, "no gradient reached the inputs"
    assert_on_device(*grads)


# ---- inputs -----------------------------------------------------------------------------
def _shapes(channels: int) -> Dict[str, ShapeSpec]:
    return {l: ShapeSpec(channels=channels, stride=STRIDES[l]) for l in LEVELS}


def _grid(level: str):
    return HEIGHT // STRIDES[level], WIDTH // STRIDES[level]


def _maps(channels: int, grad: bool) -> Dict[str, torch.Tensor]:
    return {l: torch.randn(BATCH, channels, *_grid(l), device=DEVICE, requires_grad=grad)
            for l in LEVELS}


def _boxes(count: int) -> torch.Tensor:
    xy = torch.rand(count, 2, device=DEVICE) * 32
    return torch.cat([xy, xy + 8 + torch.rand(count, 2, device=DEVICE) * 16], dim=1)


def _gt_instances() -> List[Instances]:
    out = []
    for height, width in IMAGE_SIZES:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 28.0], [20.0, 8.0, 44.0, 36.0]],
                                                device=DEVICE))
        instances.gt_classes = torch.tensor([0, 2], device=DEVICE)
        out.append(instances)
    return out


def _images() -> ImageList:
    return ImageList(torch.randn(BATCH, 3, HEIGHT, WIDTH, device=DEVICE), IMAGE_SIZES)


def _dense(grad: bool):
    logits = [torch.randn(BATCH, ANCHORS * NUM_CLASSES, *_grid(l), device=DEVICE,
                          requires_grad=grad) for l in LEVELS]
    deltas = [torch.randn(BATCH, ANCHORS * 4, *_grid(l), device=DEVICE, requires_grad=grad)
              for l in LEVELS]
    return [logits, deltas]


def _rpn(grad: bool):
    objectness = [torch.randn(BATCH, ANCHORS, *_grid(l), device=DEVICE, requires_grad=grad)
                  for l in LEVELS]
    deltas = [torch.randn(BATCH, ANCHORS * 4, *_grid(l), device=DEVICE, requires_grad=grad)
              for l in LEVELS]
    return objectness, deltas


ROIS_PER_IMAGE = 8


def _roi_predictions(grad: bool):
    rois = BATCH * ROIS_PER_IMAGE
    return (torch.randn(rois, NUM_CLASSES + 1, device=DEVICE, requires_grad=grad),
            torch.randn(rois, 4 * NUM_CLASSES, device=DEVICE, requires_grad=grad))


def _sampled_proposals() -> List[Instances]:
    out = []
    for height, width in IMAGE_SIZES:
        proposals = Instances((height, width))
        proposals.proposal_boxes = Boxes(_boxes(ROIS_PER_IMAGE))
        proposals.gt_classes = torch.randint(0, NUM_CLASSES + 1, (ROIS_PER_IMAGE,), device=DEVICE)
        out.append(proposals)
    return out


def _student(arch: str) -> StudentTaps:
    """What a RetinaNet ("dense") or R-CNN ("rcnn") student exposes, on the device."""
    taps = StudentTaps(images=_images(), gt_instances=_gt_instances(),
                       features=_maps(STUDENT_CHANNELS, grad=True))
    if arch == "dense":
        taps.dense_predictions = _dense(grad=True)
        taps.anchors = [Boxes(_boxes(_grid(l)[0] * _grid(l)[1] * ANCHORS)) for l in LEVELS]
        total = sum(len(a) for a in taps.anchors)
        taps.anchor_labels = [torch.randint(-1, NUM_CLASSES + 1, (total,), device=DEVICE)
                              for _ in range(BATCH)]
    else:
        taps.rpn_predictions = _rpn(grad=True)
        taps.sampled_proposals = _sampled_proposals()
        taps.roi_predictions = _roi_predictions(grad=True)
    return taps


def _teacher(arch: str) -> TeacherOutputs:
    outputs = TeacherOutputs(features=_maps(TEACHER_CHANNELS, grad=False))
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


def _fill_banks(module: torch.nn.Module) -> None:
    """Random prototypes on the device for every class but the last (left invalid)."""
    for bank in (m for m in module.modules() if isinstance(m, PrototypeBank)):
        for level in range(len(bank.levels)):
            for cls in range(bank.num_classes - 1):
                bank.set_prototypes(level, cls,
                                    torch.randn(PROTOTYPES, TEACHER_CHANNELS, device=DEVICE),
                                    torch.randn(PROTOTYPES, STUDENT_CHANNELS, device=DEVICE))


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
    count = 5
    return {l: KDInstances(_boxes(count), torch.randint(0, NUM_CLASSES, (count,), device=DEVICE),
                           torch.randint(0, BATCH, (count,), device=DEVICE),
                           torch.randint(0, rows, (count,), device=DEVICE)) for l in LEVELS}


# case id -> (registered head, student arch, DISTILL options)
HEAD_CASES = {
    "fitnet": ("FitNetHead", "dense", {}),
    "fitnet_prototype_weighted": ("FitNetHead", "dense", {"FITNET.PROTOTYPE_WEIGHTED": True}),
    "mgd": ("MGDHead", "dense", {}),
    "fgfi": ("FGFIHead", "dense", {}),
    "fgbg": ("FgBgHead", "dense", {}),
    "fgbg_prototype_weighted": ("FgBgHead", "rcnn", {"FGBG.PROTOTYPE_WEIGHTED": True}),
    "fgd": ("FGDHead", "dense", {}),
    "fgd_stride": ("FGDHead", "rcnn", {"FGD.BOX_MAPPING": "stride"}),
    "logit_dense_positive": ("LogitKDHead", "dense", {}),
    "logit_dense_confident": ("LogitKDHead", "dense",
                              {"LOGIT.DENSE_LOCATIONS": "teacher_confident"}),
    "logit_rcnn": ("LogitKDHead", "rcnn", {}),
    "loc_dense": ("LocKDHead", "dense", {"LOC.LOSS": "l1"}),
    "loc_rcnn": ("LocKDHead", "rcnn", {"LOC.LOSS": "smooth_l1"}),
    "dfd": ("DFDHead", "dense", {}),
    "dfd_stratified_reversed": ("DFDHead", "dense", {"DFD.FG_BG_STRATIFIED": True,
                                                     "DFD.REVERSED": True}),
    "dfd_unshifted": ("DFDHead", "dense", {"DFD.LENIENT": "pseudo_huber_unshifted",
                                           "DFD.DISPARITY": "rel"}),
    "dfd_generative": ("DFDHead", "dense", {"DFD.LENIENT": "generative", "DFD.DISPARITY": "cos"}),
    "dfd_cosine": ("DFDHead", "dense", {"DFD.LENIENT": "cosine"}),
    "dfd_downweight": ("DFDHead", "dense", {"DFD.LENIENT": "downweight"}),
    "gk_dense": ("GlobalKnowledgeHead", "dense", {}),
    "gk_rcnn": ("GlobalKnowledgeHead", "rcnn", {"GLOBAL_KNOWLEDGE.LEVEL_REDUCTION": "mean"}),
    "detkds_dense": ("DetKDSHead", "dense", {}),
    "detkds_rcnn": ("DetKDSHead", "rcnn", {}),
    "attention_project": ("AttentionTransferHead", "dense", {}),
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_losses_forward_and_backward(env, case, monkeypatch):
    """Built on the device, fed device inputs: losses, logged scalars and gradients stay on
    it, and the forward reads nothing on the host."""
    name, arch, options = HEAD_CASES[case]
    if isinstance(env, FakeCuda):  # its value check cannot run on fake tensors (listed)
        monkeypatch.setattr(d2kd.heads.detkds.head, "dry_run", lambda genome, batch_size: None)
    cfg = _cfg(arch, **options)
    with env.building():
        head = DISTILL_HEAD_REGISTRY.get(name)(cfg, _shapes(STUDENT_CHANNELS),
                                               _shapes(TEACHER_CHANNELS))
    assert_on_device(*head.parameters(), *head.buffers())
    with env.running(), EventStorage(0) as storage:
        _fill_banks(head)
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
        _backward(env, sum(losses.values()), _leaves(student), [head])
        if type(env) is RealCuda:
            assert torch.isfinite(sum(losses.values()).detach()).item()
            assert flush_tensor_scalars(storage) == (1 if logged else 0)


# ---- teachers, adapters, masks ----------------------------------------------------------
@pytest.mark.parametrize("config", ["retinanet_R50_teacher.yaml", "faster_rcnn_R50_teacher.yaml"])
def test_teacher_renormalisation_and_forward(env, config):
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet", config), ["MODEL.WEIGHTS", ""])
    cfg.MODEL.DEVICE = DEVICE
    with env.building():  # build_model's model.to() cannot run on fake tensors: build in place
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    teacher = FrozenTeacher(model, "BGR", "random weights")
    with env.running():
        student_mean = torch.tensor([100.0, 110.0, 120.0], device=DEVICE).view(3, 1, 1)
        student_std = torch.tensor([50.0, 60.0, 70.0], device=DEVICE).view(3, 1, 1)
        with env.no_host_sync():
            images = teacher.normalize(_images(), student_mean, student_std, "RGB")
            features = teacher.features(images)
            if hasattr(model, "head"):
                predictions = [x for group in teacher.dense_predictions(features) for x in group]
            else:
                predictions = [x for group in teacher.rpn_predictions(features) for x in group]
        assert_on_device(images, *features.values(), *predictions)
        assert not any(x.requires_grad for x in [*features.values(), *predictions])


def test_teacher_level_view_and_cascade_box_predictions(env):
    """A teacher's maps under the student's level names, cropped to the student's grids (the
    teacher padded further), and a Cascade R-CNN teacher's stages on pooled RoI features:
    the stage mean and the deltas re-coded into the student's box coding."""
    from detectron2.modeling.box_regression import Box2BoxTransform

    cfg = load_config(os.path.join(CONFIGS, "DigitsDet", "faster_rcnn_R50_teacher.yaml"),
                      ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                       "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    cfg.MODEL.DEVICE = DEVICE
    with env.building():
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    teacher = FrozenTeacher(model, "BGR", "random weights",
                            student_shapes=_shapes(STUDENT_CHANNELS))
    channels = model.backbone.output_shape()["p2"].channels
    resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    student_coder = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    with env.running():
        student = _maps(STUDENT_CHANNELS, grad=False)
        padded = {l: torch.randn(BATCH, channels, _grid(l)[0] + 2, _grid(l)[1] + 3,
                                 device=DEVICE) for l in LEVELS}
        pooled = torch.randn(5, channels, resolution, resolution, device=DEVICE)
        outputs = []
        with env.no_host_sync():
            view = teacher.student_levels(padded, student)
            for stage in ("mean", "last"):
                teacher.cascade_stage = stage
                outputs += teacher.box_predictions(pooled, student_coder)
        assert_on_device(*view.values(), *outputs)
        assert all(view[l].shape[-2:] == student[l].shape[-2:] for l in LEVELS)
        assert [tuple(x.shape) for x in outputs] == [(5, cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1),
                                                     (5, 4)] * 2


def test_adapters(env):
    teacher_shapes = {l: ShapeSpec(channels=TEACHER_CHANNELS, stride=STRIDES[l] // 2)
                      for l in LEVELS}  # another stride: resized too
    with env.building():
        aligner = FeatureAligner(LEVELS, _shapes(STUDENT_CHANNELS), teacher_shapes)
    with env.running():
        student = _maps(STUDENT_CHANNELS, grad=True)
        teacher = {l: torch.randn(BATCH, TEACHER_CHANNELS, 2 * _grid(l)[0], 2 * _grid(l)[1],
                                  device=DEVICE) for l in LEVELS}
        with env.no_host_sync():
            aligned = aligner(student, teacher)
        assert_on_device(*aligned.values())
        assert all(aligned[l].shape == teacher[l].shape for l in LEVELS)
        _backward(env, sum(x.sum() for x in aligned.values()), list(student.values()), [aligner])


def test_cell_masks(env):
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    with env.building():
        anchor_generator = DefaultAnchorGenerator(sizes=[[32], [64]],
                                                  aspect_ratios=[[0.5, 1.0, 2.0]],
                                                  strides=[STRIDES[l] for l in LEVELS])
    with env.running():
        gt = _gt_instances()
        shape = torch.Size((BATCH, TEACHER_CHANNELS, *_grid("p3")))
        features = _maps(STUDENT_CHANNELS, grad=False)
        with env.no_host_sync():
            boxes, images = gt_boxes_and_images(gt)
            anchors = anchor_generator([features[l] for l in LEVELS])
            masks = [box_cell_masks(gt, shape, 8), box_area_masks(gt, shape, 8),
                     valid_cell_masks(IMAGE_SIZES, shape, 8, DEVICE),
                     box_weight_maps(boxes, torch.rand(len(boxes), device=DEVICE), images,
                                     shape, 8),
                     random_keep_mask(features["p3"], 0.5)]
            masks += near_object_masks(gt, anchors, [features[l].shape for l in LEVELS],
                                       ANCHORS, 0.5)
        assert_on_device(boxes, images, *masks)


# ---- prototypes -------------------------------------------------------------------------
def test_prototype_pooling(env):
    with env.running():
        features = torch.randn(BATCH, STUDENT_CHANNELS, *_grid("p3"), device=DEVICE,
                               requires_grad=True)
        boxes = _boxes(6)
        images = torch.randint(0, BATCH, (6,), device=DEVICE)
        with env.no_host_sync():
            cells = box_cells(boxes, 8, *_grid("p3"))
            pooled = batched_box_pool(features, boxes, images, 8)
            single = box_pool(features[0], boxes, 8)
        assert_on_device(*cells, pooled, single)
        _backward(env, pooled.sum() + single.sum(), [features])


def test_prototype_selection_pieces(env):
    """The dense parts of PGM (the greedy pursuit itself is listed as host-bound)."""
    with env.running():
        x = torch.nn.functional.normalize(torch.randn(10, TEACHER_CHANNELS, device=DEVICE), dim=1)
        with env.no_host_sync():
            rho = density(x)
            wt, ws = coupled_coefficients(x[:, 0], x[:, 1], alpha=0.5)
        assert_on_device(rho, wt, ws)


def test_prototype_bank(env):
    with env.building():
        bank = PrototypeBank(LEVELS, NUM_CLASSES, PROTOTYPES, TEACHER_CHANNELS, STUDENT_CHANNELS)
    assert_on_device(*bank.buffers())
    with env.running():
        _fill_banks(bank)
        f_s = torch.randn(5, STUDENT_CHANNELS, device=DEVICE, requires_grad=True)
        f_t = torch.randn(5, TEACHER_CHANNELS, device=DEVICE)
        classes = torch.randint(0, NUM_CLASSES, (5,), device=DEVICE)
        with env.no_host_sync():
            w = bank.robustness_weight(f_s, f_t, classes, 1)
            relations = bank.all_relations(f_s, 1, "student")
            valid = bank.valid_columns(1)
            glob = global_relation_loss(f_s, f_t, w, bank, 1)
            feat = local_feature_loss(torch.randn(BATCH, 4, 6, 8, device=DEVICE,
                                                  requires_grad=True),
                                      torch.randn(BATCH, 4, 6, 8, device=DEVICE),
                                      torch.rand(BATCH, 1, 6, 8, device=DEVICE), 1.0, 2.0)
            resp = weighted_response_kl(f_s, f_t[:, :STUDENT_CHANNELS], w, 2.0)
        assert_on_device(*bank.buffers(), w, relations, valid, glob, feat, resp)
        assert (relations.shape == (5, NUM_CLASSES * PROTOTYPES)
                and valid.shape == (NUM_CLASSES * PROTOTYPES,))
        _backward(env, glob + feat + resp, [f_s])


# ---- teacher ordering -------------------------------------------------------------------
@pytest.mark.parametrize("given_device", [False, True])
def test_teacher_ordering_statistics(env, given_device):
    """AdapterFit accumulates where the features are (it used to make its float64 statistics
    on the CPU, so that adding CUDA features failed, and NCCL could not all-reduce them)."""
    with env.running():
        fit = AdapterFit(STUDENT_CHANNELS, TEACHER_CHANNELS,
                         **({"device": DEVICE} if given_device else {}))
        for _ in range(2):
            student = torch.randn(BATCH, STUDENT_CHANNELS, 3, 4, device=DEVICE)
            teacher = torch.randn(BATCH, TEACHER_CHANNELS, 6, 8, device=DEVICE)
            with env.no_host_sync():
                fit.add(student, teacher)
        fit.all_reduce()  # one process: nothing to reduce
        with env.no_host_sync():
            residual, total = fit.residual_and_total_tensors()
        assert_on_device(fit.xx, fit.xy, fit.yy, fit.y, fit.count, residual, total)


# ---- DetKDS ops and distances ----------------------------------------------------------
OPS = [(slot, name) for slot in (1, 2, 3) for name in SLOT_OPS[slot].names()]


@pytest.mark.parametrize("slot, name", OPS, ids=[f"slot{s}-{n}" for s, n in OPS])
def test_detkds_op(env, slot, name):
    with env.running():
        x = torch.randn(4, 4, 8, 8, device=DEVICE, requires_grad=True)
        with env.no_host_sync():
            y = SLOT_OPS[slot].get(name)(x, mask=draw_mask(x))
        assert_on_device(y)
        _backward(env, y.float().pow(2).sum(), [x])


@pytest.mark.parametrize("distance", DISTANCES.names())
def test_detkds_distance(env, distance):
    slot3 = "softmax_C" if distance == "kl" else "no"
    formula = Formula("global", "mask", "no", slot3, distance, 2.0)
    with env.running():
        s = torch.randn(4, 4, 8, 8, device=DEVICE, requires_grad=True)
        t = torch.randn(4, 4, 8, 8, device=DEVICE)
        with env.no_host_sync():
            value = apply_formula(formula, s, t)
        assert_on_device(value)
        assert value.dim() == 0
        _backward(env, value, [s])


def test_detkds_distribution_ops_feed_kl(env):
    for slot3 in sorted(DISTRIBUTION_OPS):
        formula = Formula("global", "no", "no", slot3, "kl", 1.0)
        with env.running():
            s = torch.randn(4, 4, 8, 8, device=DEVICE, requires_grad=True)
            with env.no_host_sync():
                value = apply_formula(formula, s, torch.randn(4, 4, 8, 8, device=DEVICE))
            assert_on_device(value)
            _backward(env, value, [s])


# ---- completeness -----------------------------------------------------------------------
#: What runs above, besides the heads of HEAD_CASES (component -> test).
COVERED_UNDER_FAKE_TENSORS: Dict[str, Callable] = {
    "FrozenTeacher.normalize": test_teacher_renormalisation_and_forward,
    "FrozenTeacher.features": test_teacher_renormalisation_and_forward,
    "FrozenTeacher.dense_predictions": test_teacher_renormalisation_and_forward,
    "FrozenTeacher.rpn_predictions": test_teacher_renormalisation_and_forward,
    "FrozenTeacher.student_levels (level view, crop)":
        test_teacher_level_view_and_cascade_box_predictions,
    "FrozenTeacher.box_predictions (Cascade stages, delta re-coding)":
        test_teacher_level_view_and_cascade_box_predictions,
    "FeatureAligner (adapters)": test_adapters,
    "cell masks (d2kd/heads/masks.py)": test_cell_masks,
    "box_pool / batched_box_pool / box_cells": test_prototype_pooling,
    "PGM density / coupled_coefficients": test_prototype_selection_pieces,
    "PrototypeBank": test_prototype_bank,
    "RDM losses (global relation, local feature, response)": test_prototype_bank,
    "AdapterFit (add, all_reduce, residual_and_total_tensors)": test_teacher_ordering_statistics,
    "DetKDS slot ops": test_detkds_op,
    "DetKDS distances": test_detkds_distance,
    "GlobalKnowledgeHead.instance_losses": test_head_losses_forward_and_backward,
}
for _case, (_head, _, _) in HEAD_CASES.items():
    COVERED_UNDER_FAKE_TENSORS.setdefault(_head, test_head_losses_forward_and_backward)

#: The components the device-placement requirement names (d2kd's issue "Runs where users
#: train", item 1), each of which must be covered or listed.
REQUIRED_COMPONENTS = [
    "FrozenTeacher.normalize", "FrozenTeacher.features", "FrozenTeacher.dense_predictions",
    "FrozenTeacher.rpn_predictions", "FrozenTeacher.roi_predictions",
    "FeatureAligner (adapters)", "box_pool / batched_box_pool / box_cells",
    "PGM density / coupled_coefficients", "select_prototypes", "kmeans_prototypes",
    "PrototypeBank", "PrototypeBank.relations", "build_instance_index / instances_per_class",
    "AdapterFit (add, all_reduce, residual_and_total_tensors)",
    "AdapterFit.residual_and_total / normalized_residual",
    "DetKDS slot ops", "DetKDS distances", "GlobalKnowledgeHead.kd_instances",
    "StudentTapper", "DistillationDetector.forward", "flush_tensor_scalars",
]


def test_every_component_is_covered_or_listed():
    covered, listed = set(COVERED_UNDER_FAKE_TENSORS), set(CANNOT_RUN_UNDER_FAKE_TENSORS)
    heads = {name for name, _ in DISTILL_HEAD_REGISTRY}
    assert "AttentionTransferHead" in heads  # heads registered outside d2kd count too
    missing = sorted((heads | set(REQUIRED_COMPONENTS)) - covered - listed)
    assert not missing, (f"{missing}: run them under FakeTensorMode in this module (a head: add "
                         "a HEAD_CASES entry) or list them, with the reason, in "
                         "CANNOT_RUN_UNDER_FAKE_TENSORS")
    assert not covered & listed
    assert all(reason.strip() for reason in CANNOT_RUN_UNDER_FAKE_TENSORS.values())
    assert all(callable(test) and test.__name__ in globals()
               for test in COVERED_UNDER_FAKE_TENSORS.values())


# ---- logging: one host read per step ----------------------------------------------------
def test_logged_scalars_reach_the_storage_at_the_flush():
    with EventStorage(7) as storage:
        storage.put_scalar("plain", 1.0)
        head = DISTILL_HEAD_REGISTRY.get("FitNetHead")(_cfg("dense"), _shapes(3), _shapes(3))
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
    with torch.device(DEVICE):
        head = DISTILL_HEAD_REGISTRY.get("GlobalKnowledgeHead")(
            _cfg(arch), _shapes(STUDENT_CHANNELS), _shapes(TEACHER_CHANNELS))
    student = _student(arch)
    instances, syncs = _count_syncs(lambda: head.kd_instances(student))
    assert syncs <= 1
    for kd in instances.values():
        assert_on_device(kd.boxes, kd.classes, kd.images, kd.rows)


@pytest.mark.cuda
@needs_gpu
def test_cuda_refresh_time_selection_and_ordering_results():
    from d2kd.prototypes.selection import kmeans_prototypes, select_prototypes

    x_t, x_s = torch.randn(30, 8, device=DEVICE), torch.randn(30, 6, device=DEVICE)
    assert_on_device(select_prototypes(x_t, x_s, 4, alpha=0.5))
    assert_on_device(*kmeans_prototypes(x_t, x_s, 4))
    fit = AdapterFit(3, 4)
    fit.add(torch.randn(2, 3, 5, 5, device=DEVICE), torch.randn(2, 4, 5, 5, device=DEVICE))
    residual, total = fit.residual_and_total()
    assert 0.0 <= residual <= total


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
    cfg.MODEL.DEVICE = DEVICE
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
