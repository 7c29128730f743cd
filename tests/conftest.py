"""Shared fixtures and helpers of the test suite (test modules import nothing from each other).

The one conftest.py of the tree: test modules in every folder import from it (``from conftest
import REPO, ...``); a second conftest.py would take its module name.

Fixtures: ``tiny_digitsdet`` (a tiny DigitsDet copy registered as
``digitsdet_tiny_{train,val,test}``), ``teacher_weights`` (an untrained R-50/2 RetinaNet
teacher), ``teachers`` (untrained R-50/2 and R-34/2 RetinaNet teachers) and
``module_tmp_path_factory`` (folders for a module's shared fixtures, removed when its tests
end). Helpers: ``tiny_training_cfg``, ``distill_cfg``, ``save_untrained_teacher``,
``launch_two_processes``, ``cosine``, ``assert_valid_genome`` (DetKDS search spaces).

Device placement (tests/test_device_placement.py, tests/test_device_placement_heads.py): the
``env`` fixture (fake CUDA, meta and real CUDA tensors), ``assert_on_device``,
``backward_on_device``, the inputs on the running test's device and ``HEAD_CASES``.

DetKDS fidelity (tests/heads/detkds/): the transcription of the release's operations.py
(``RELEASE_TRANS1/2/3``, ``RELEASE_DIS``, ``release_*``), the ``release_masks`` fixture and
``relative_error``.

Tests that train (a ``DistillTrainer``, ``tools/*.py`` or another subprocess, a benchmark, pip's
resolver) are marked ``slow`` (pytest.ini): ``pytest -m "not slow"`` runs the rest, without
a training or a subprocess (689 tests: 79 s on an idle 2-core machine, 54 s on two workers
with ``make test-fast``, 2026-12-07); ``make test`` runs everything.
"""
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from helpers.detkds_release import Masks
from torch._subclasses.fake_tensor import FakeTensorMode

import d2kd  # noqa: F401  (registrations)
from d2kd.config import load_config
from d2kd.config.loading import import_extensions
from d2kd.data import register_digitsdet
from d2kd.data.digitsdet import DigitsDetSpec, generate_digitsdet
from d2kd.heads.detkds import ops as detkds_ops
from d2kd.prototypes import PrototypeBank
from d2kd.search import dry_run, parse_genome

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY_SPEC = DigitsDetSpec(seed=0, num_train=24, num_val=8, num_test=4)
TEACHER = "DigitsDet/retinanet_R50_teacher.yaml"  # R-50/2, FPN 128
TEACHER_R34 = "DigitsDet/retinanet_R34_teacher.yaml"  # R-34/2, FPN 96
DISTILL = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"  # student R-18/2, teacher R-50/2

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_digitsdet(tmp_path_factory) -> str:
    """Root of a tiny DigitsDet (24 train / 8 val / 4 test images), registered as
    digitsdet_tiny_*."""
    root = str(tmp_path_factory.mktemp("datasets") / "digitsdet")
    generate_digitsdet(root, TINY_SPEC, show_progress=False)
    register_digitsdet(root, name_prefix="digitsdet_tiny")
    return root


class ModuleTempFolders:
    """``tmp_path_factory.mktemp`` for one test module's shared fixtures: numbered folders in one
    folder of the module's."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, basename: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=basename, dir=self.root))


@pytest.fixture(scope="module")
def module_tmp_path_factory(tmp_path_factory, request):
    """Folders for a module's shared fixtures (untrained full-size teachers, finished runs: up to
    ~370 MB each), removed when the module's tests end unless one of them failed: the same
    retention as ``tmp_path``'s (pytest.ini: ``tmp_path_retention_policy = failed``), so that a
    whole suite needs disk for one module at a time, not for all of them."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield ModuleTempFolders(root)
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)


def tiny_training_cfg(config_file: str, output_dir: str, max_iter: int = 2):
    """A DigitsDet config shrunk to a few iterations on the tiny dataset (CPU, 2 images/step)."""
    cfg = load_config(os.path.join(CONFIGS, config_file))
    cfg.DATASETS.TRAIN = ("digitsdet_tiny_train",)
    cfg.DATASETS.TEST = ("digitsdet_tiny_val",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = max_iter
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.MODEL.WEIGHTS = ""  # no pre-trained backbone: tests must not pre-train
    cfg.OUTPUT_DIR = output_dir
    return cfg



def search_cfg(*opts):
    """The DigitsDet DetKDS RetinaNet config with the search keys, untrained, batch 2, ``opts``
    on top (the search driver's and pruners' tests)."""
    return load_config(os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_from_R50_detkds.yaml"),
                       ["MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", "2", *opts])

def tool_usage_error(tool: str, argv: List[str], capsys) -> str:
    """Run ``tools/TOOL.py`` with ``argv`` in this process (its ``main``, as its command line
    does); it must stop with exit status 2, argparse's usage error. Returns the last line it
    wrote to stderr."""
    spec = importlib.util.spec_from_file_location(f"tools_{tool}",
                                                  os.path.join(REPO, "tools", f"{tool}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def save_untrained_teacher(teacher_config: str, out) -> str:
    """A checkpoint that matches ``teacher_config`` (random weights: enough for these tests)."""
    os.makedirs(out, exist_ok=True)
    cfg = load_config(os.path.join(CONFIGS, teacher_config), ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(out)).save("model_final")
    return str(out / "model_final.pth")


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> str:
    """An untrained checkpoint of the R-50/2 RetinaNet teacher (``TEACHER``); read-only."""
    return save_untrained_teacher(TEACHER, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Untrained checkpoints of the R-50/2 (FPN 128) and R-34/2 (FPN 96) RetinaNet teachers, in
    the DigitsDet chain's order (the R-34/2 is the higher-AP target); read-only."""
    root = tmp_path_factory.mktemp("teachers")
    return [save_untrained_teacher(TEACHER, root / "r50"),
            save_untrained_teacher(TEACHER_R34, root / "r34")]


def distill_cfg(output_dir, teacher_weights, heads=("MGDHead",), max_iter=2, config=DISTILL):
    """``tiny_training_cfg`` of a distillation config with one teacher checkpoint and ``heads``."""
    cfg = tiny_training_cfg(config, output_dir, max_iter=max_iter)
    cfg.DISTILL.TEACHER.WEIGHTS = [teacher_weights]
    cfg.DISTILL.HEADS = list(heads)
    return cfg


def slurm_env(**variables: str) -> Dict[str, str]:
    """This process's environment for a command of tools/slurm/ (docs/cluster.md): the
    stand-ins for SLURM's ``srun`` and ``scontrol`` (tests/helpers/slurm/) first on PATH, this
    Python as ``PYTHON``, one thread, and ``variables``."""
    path = os.pathsep.join([os.path.join(REPO, "tests", "helpers", "slurm"),
                            os.path.dirname(sys.executable), os.environ["PATH"]])
    return dict(os.environ, PATH=path, PYTHON=sys.executable, OMP_NUM_THREADS="1", **variables)


def launch_two_processes(config_file, output_dir, dataset_root, *opts):
    """tools/train_net.py --num-gpus 2 (gloo, CPU) for 2 iterations of a DigitsDet config; asserts
    that both ranks ran and the evaluation was printed."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(dataset_root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "DigitsDet", config_file),
        "--num-gpus", "2",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", str(output_dir), *opts,
    ]
    proc = subprocess.run(cmd, cwd=output_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (output_dir / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "copypaste: AP,AP50" in log


def cosine(a, b) -> float:
    """Cosine similarity of two 1-D tensors, as a Python float."""
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def assert_valid_genome(space, params) -> None:
    """Independent check of a search space's genome (d2kd.apps.search.space): the genome string
    parses and its dry run gives a finite scalar."""
    dry_run(parse_genome(space.genome(params)), batch_size=space.batch_size)


# ---- device placement (tests/test_device_placement.py, tests/test_device_placement_heads.py) --
PROJECT_HEAD = os.path.join(REPO, "projects", "AttentionKD", "attention_head.py")


def register_project_head() -> None:
    """Registers the head of projects/AttentionKD (a head registered outside d2kd)."""
    import_extensions([(PROJECT_HEAD, "")])


LEVELS = ["p3", "p4"]
STRIDES = {"p3": 8, "p4": 16}
BATCH, HEIGHT, WIDTH = 2, 48, 64  # the padded batch
IMAGE_SIZES = [(48, 64), (40, 56)]
STUDENT_CHANNELS, TEACHER_CHANNELS = 3, 4  # different: the heads' adapters are in the path
NUM_CLASSES, ANCHORS = 3, 3
PROTOTYPES = 2


class FakeCuda:
    """Fake CUDA tensors on any machine (forward only, see tests/test_device_placement.py)."""

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


def current_device() -> str:
    """Where the running test's inputs are made: its ``env``'s device (``"cuda"`` outside one)."""
    return DEVICE


@pytest.fixture(params=["fake", "meta", pytest.param("cuda", marks=[pytest.mark.cuda, needs_gpu])])
def env(request, monkeypatch):
    """The device a device-placement test runs on: fake CUDA, meta, real CUDA (``cuda`` group)."""
    environment = _ENVS[request.param]()
    monkeypatch.setitem(globals(), "DEVICE", environment.device)
    return environment


def assert_on_device(*tensors: torch.Tensor) -> None:
    """Every tensor is on the running test's device."""
    for tensor in tensors:
        assert tensor.device.type == DEVICE, f"{tuple(tensor.shape)} tensor on {tensor.device}"


def backward_on_device(env, total: torch.Tensor, leaves: List[torch.Tensor], modules=()) -> None:
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


def level_shapes(channels: int) -> Dict[str, ShapeSpec]:
    """ShapeSpecs of LEVELS with ``channels``."""
    return {l: ShapeSpec(channels=channels, stride=STRIDES[l]) for l in LEVELS}


def level_grid(level: str):
    """(H, W) of a level's map of the padded batch."""
    return HEIGHT // STRIDES[level], WIDTH // STRIDES[level]


def level_maps(channels: int, grad: bool) -> Dict[str, torch.Tensor]:
    """Random maps of LEVELS on the device."""
    return {l: torch.randn(BATCH, channels, *level_grid(l), device=DEVICE, requires_grad=grad)
            for l in LEVELS}


def device_boxes(count: int) -> torch.Tensor:
    """``count`` random XYXY boxes on the device."""
    xy = torch.rand(count, 2, device=DEVICE) * 32
    return torch.cat([xy, xy + 8 + torch.rand(count, 2, device=DEVICE) * 16], dim=1)


def device_gt_instances() -> List[Instances]:
    """Two GT boxes per image of IMAGE_SIZES, on the device."""
    out = []
    for height, width in IMAGE_SIZES:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 28.0], [20.0, 8.0, 44.0, 36.0]],
                                                device=DEVICE))
        instances.gt_classes = torch.tensor([0, 2], device=DEVICE)
        out.append(instances)
    return out


def device_images() -> ImageList:
    """The padded batch of IMAGE_SIZES, on the device."""
    return ImageList(torch.randn(BATCH, 3, HEIGHT, WIDTH, device=DEVICE), IMAGE_SIZES)


def fill_prototype_banks(module: torch.nn.Module) -> None:
    """Random prototypes on the device for every class but the last (left invalid)."""
    for bank in (m for m in module.modules() if isinstance(m, PrototypeBank)):
        for level in range(len(bank.levels)):
            for cls in range(bank.num_classes - 1):
                bank.set_prototypes(level, cls,
                                    torch.randn(PROTOTYPES, TEACHER_CHANNELS, device=DEVICE),
                                    torch.randn(PROTOTYPES, STUDENT_CHANNELS, device=DEVICE))



#: The heads run on the device (tests/test_device_placement_heads.py; every registered head
#: must have a case or be listed, tests/test_device_placement.py):
#: case id -> (registered head, student arch, DISTILL options)
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


# ---- DetKDS's released ops: the random masks both sides draw (tests/heads/detkds/) ------
@pytest.fixture
def release_masks(monkeypatch) -> Masks:
    """The random masks of ``trans_mask``, drawn for d2kd's ``random_keep_mask`` and replayed
    to the release."""
    source = Masks(seed=11)
    monkeypatch.setattr(detkds_ops, "random_keep_mask", source.draw)
    return source


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return float((value - reference).abs().max() / reference.abs().max())
