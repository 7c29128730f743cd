"""Every config key d2kd adds to detectron2's, with its default and meaning."""
from typing import Callable, List

from detectron2.config import CfgNode as CN

_CONFIG_EXTENSIONS: List[Callable[[CN], None]] = []
#: ``DISTILL.SEMANTICS`` of this d2kd (what the heads compute; see the key's comment)
SEMANTICS = 2


def register_config_extension(add_keys: Callable[[CN], None]) -> Callable[[CN], None]:
    """Register ``add_keys(cfg)`` (e.g. a third-party head's options), applied by
    :func:`add_d2kd_config` from now on. Usable as a decorator; idempotent."""
    if add_keys not in _CONFIG_EXTENSIONS:
        _CONFIG_EXTENSIONS.append(add_keys)
    return add_keys


def add_d2kd_config(cfg: CN) -> None:
    """Add d2kd's keys, then those of registered extensions, to a config in place."""
    if "D2KD" not in cfg:
        _add_own_keys(cfg)
    for add_keys in _CONFIG_EXTENSIONS:
        add_keys(cfg)


def _add_own_keys(cfg: CN) -> None:
    cfg.D2KD = CN()
    # Marker so that add_d2kd_config is idempotent.
    cfg.D2KD.VERSION = 1
    # Python modules (dotted names) or files (*.py, relative to the config file that lists
    # them) imported before the config is merged, so that the heads, backbones, meta-
    # architectures and config keys (register_config_extension) they register work with
    # tools/train_net.py unchanged.
    cfg.D2KD.IMPORTS = []
    # A CPU-training tuning: keep freed host memory in the process between training steps
    # (glibc mallopt: fixed mmap threshold, no heap trimming) instead of page-faulting it in
    # again every step; measured ~8 % of a CPU distillation step on DigitsDet, whose configs
    # switch it on (d2kd/utils/host_memory.py). The process then keeps its peak resident
    # size, so it is off by default (GPU training gains nothing from it). No effect without
    # glibc.
    cfg.D2KD.RETAIN_HOST_MEMORY = False

    # ---- distillation (d2kd/modeling/distillation_detector.py) ----
    cfg.DISTILL = CN()
    # Meta-architecture of the student (RetinaNet, FCOS, GeneralizedRCNN, ...) when
    # MODEL.META_ARCHITECTURE is "DistillationDetector"; MODEL.* describes the student.
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = "RetinaNet"
    cfg.DISTILL.TEACHER = CN()
    # One config per teacher: a yacs .yaml or LazyConfig .py detector config file, a
    # detectron2 model-zoo name "model_zoo://COCO-Detection/retinanet_R_50_FPN_3x.yaml", or a
    # file of detectron2's projects/ folder "detectron2_projects://ViTDet/configs/COCO/..."
    # (found via $DETECTRON2_PROJECTS; d2kd/config/teachers.py, docs/teachers.md).
    cfg.DISTILL.TEACHER.CONFIGS = []
    # One weights file or URL per teacher; "" takes the model zoo's trained checkpoint for a
    # model_zoo:// teacher, else the yacs teacher config's own MODEL.WEIGHTS.
    cfg.DISTILL.TEACHER.WEIGHTS = []
    # KEY VALUE overrides applied to every yacs teacher config (e.g. ["MODEL.DEVICE", "cpu"]).
    cfg.DISTILL.TEACHER.OPTS = []
    # "key=value" overrides applied to every LazyConfig teacher (detectron2's
    # LazyConfig.apply_overrides), e.g. ["model.roi_heads.num_classes=10"].
    cfg.DISTILL.TEACHER.LAZY_OVERRIDES = []
    # A Cascade R-CNN teacher's class scores on the student's RoIs (every stage on the same
    # boxes; deltas always the last stage's): "mean" of the stages' probabilities, as Cascade
    # inference scores, or "last" stage only (docs/transformer_teachers.md).
    cfg.DISTILL.TEACHER.CASCADE_STAGE = "mean"
    # Distillation heads by name in DISTILL_HEAD_REGISTRY; they combine freely.
    cfg.DISTILL.HEADS = []
    # A record, not a switch: the version of what the heads compute for the same keys.
    # 2: the authors' DetKDS ops and global-knowledge release rules (issue 29,
    # docs/methods/README.md, "Fidelity"); 1 (a saved distillation config without this key):
    # d2kd's former variants. A finished run of another version is not reused, nor resumed.
    cfg.DISTILL.SEMANTICS = SEMANTICS
    # FPN levels that feature heads distil, by the student's names; each must exist in the
    # student and match a teacher level (same name and stride, else the same stride).
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Learnable 1x1 adapters on student maps whose channels differ from the teacher's; when
    # False, a channel mismatch is an error at build time.
    cfg.DISTILL.ADAPTER = True
    # Initialise the student's neck and heads from teacher 0 at the start of a fresh run
    # (tensors whose name and shape match; the rest is logged as skipped).
    cfg.DISTILL.INIT_FROM_TEACHER = False

    # Teacher schedule (MTPD, docs/mtpd.md; d2kd/config/schedule.py, d2kd/engine/stages.py).
    cfg.DISTILL.SCHEDULE = CN()
    # "single": the first teacher of DISTILL.TEACHER.CONFIGS for the whole run. "progressive":
    # stage k distils from the k-th teacher of the order; at a stage boundary the previous
    # teacher is freed, the heads are re-initialised, the optimizer is rebuilt and the LR
    # schedule (warm-up + SOLVER.STEPS, read as stage-local iterations) restarts; the student
    # carries over. "joint": every teacher every step, losses weighted by JOINT_WEIGHTS.
    cfg.DISTILL.SCHEDULE.MODE = "single"
    # progressive: iterations of each stage, one per teacher; they must sum to SOLVER.MAX_ITER.
    cfg.DISTILL.SCHEDULE.STAGE_ITERS = []
    # progressive: [] or one KEY VALUE list per stage overriding DISTILL.* head options when
    # that stage's heads are built, e.g. [["DISTILL.MGD.ALPHA", "4e-5"], []].
    cfg.DISTILL.SCHEDULE.STAGE_OPTS = []
    # progressive: "given" (DISTILL.TEACHER.CONFIGS order) or "adaptation_cost" (a probe fits
    # 1x1 least-squares adapters from the initial student's features to each teacher's and
    # orders the teachers by normalised residual; the last-listed teacher, the target, stays
    # last). The order and costs go to OUTPUT_DIR/teacher_order.json.
    cfg.DISTILL.SCHEDULE.ORDER = "given"
    # adaptation_cost: training images per process whose features the probe fits.
    cfg.DISTILL.SCHEDULE.PROBE_IMAGES = 16
    # joint: one loss weight per teacher; [] averages (1/K each).
    cfg.DISTILL.SCHEDULE.JOINT_WEIGHTS = []

    # ---- data (d2kd/data/step_loader.py) ----
    # RandomSubsetTrainingSampler: the share of the training images it draws from. detectron2
    # v0.6 reads this key without defining it (the sampler crashed there) and main neither.
    if "RANDOM_SUBSET_RATIO" not in cfg.DATALOADER:
        cfg.DATALOADER.RANDOM_SUBSET_RATIO = 1.0

    # ---- solver (d2kd/engine/optimizer.py) ----
    # "SGD" (detectron2's, uses MOMENTUM/NESTEROV) or "AdamW" (uses BETAS).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2).
    cfg.SOLVER.BETAS = (0.9, 0.999)
