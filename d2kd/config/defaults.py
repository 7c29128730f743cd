"""Every config key d2kd adds to detectron2's, with its default and meaning."""
from typing import Callable, List

from detectron2.config import CfgNode as CN

_CONFIG_EXTENSIONS: List[Callable[[CN], None]] = []


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

    # FitNet: MSE between adapted student and teacher maps on every cell.
    cfg.DISTILL.FITNET = CN()
    # Loss weight (the loss is a mean over cells and channels, summed over levels).
    cfg.DISTILL.FITNET.WEIGHT = 1.0
    # Multiply each GT box's cells by its RDM robustness weight (prototype bank refreshed as
    # for GlobalKnowledgeHead, options in DISTILL.PROTOTYPES); global-knowledge Table 4.
    cfg.DISTILL.FITNET.PROTOTYPE_WEIGHTED = False

    # MGD (masked generative distillation), see docs/methods/baselines.md.
    cfg.DISTILL.MGD = CN()
    # alpha: the loss is (alpha / N) * sum over (n, c, h, w) of (G(S * M) - T)^2.
    cfg.DISTILL.MGD.ALPHA = 2e-5
    # lambda: probability that a spatial cell of the student map is masked (resampled per step).
    cfg.DISTILL.MGD.MASK_RATIO = 0.65

    # FGFI (fine-grained feature imitation): imitation on cells near objects only.
    cfg.DISTILL.FGFI = CN()
    # Loss weight; the loss is sum(mask * (A(S) - T)^2) / (2 * masked cells).
    cfg.DISTILL.FGFI.WEIGHT = 0.01
    # psi: an anchor counts as near a GT box when IoU > psi * (best anchor IoU of that box).
    cfg.DISTILL.FGFI.PSI = 0.5

    # Decoupled foreground / background imitation (DeFeat-style).
    cfg.DISTILL.FGBG = CN()
    # Weight of the foreground term (cells inside GT boxes; mean over those cells x channels).
    cfg.DISTILL.FGBG.FG_WEIGHT = 1.0
    # Weight of the background term (the other cells); larger than the foreground's.
    cfg.DISTILL.FGBG.BG_WEIGHT = 2.0
    # As DISTILL.FITNET.PROTOTYPE_WEIGHTED, for this head.
    cfg.DISTILL.FGBG.PROTOTYPE_WEIGHTED = False

    # Logit KD (Hinton): KL of temperature-softened class distributions, times T^2.
    cfg.DISTILL.LOGIT = CN()
    # Loss weight.
    cfg.DISTILL.LOGIT.WEIGHT = 1.0
    # Softmax/sigmoid temperature T.
    cfg.DISTILL.LOGIT.TEMPERATURE = 2.0
    # Dense students: distil at the student's "positive" anchors or where the teacher is
    # confident ("teacher_confident": its top class score exceeds CONFIDENCE).
    cfg.DISTILL.LOGIT.DENSE_LOCATIONS = "positive"
    # Teacher score threshold for DENSE_LOCATIONS = "teacher_confident".
    cfg.DISTILL.LOGIT.CONFIDENCE = 0.5

    # Localization KD on box-regression deltas at positive locations.
    cfg.DISTILL.LOC = CN()
    # Loss weight.
    cfg.DISTILL.LOC.WEIGHT = 1.0
    # "l1" or "smooth_l1".
    cfg.DISTILL.LOC.LOSS = "smooth_l1"
    # Transition point of smooth-L1.
    cfg.DISTILL.LOC.BETA = 0.1

    # DFD: disparity-aware feature distillation (d2kd/heads/dfd.py, docs/methods/dfd.md).
    cfg.DISTILL.DFD = CN()
    # alpha: the loss is (alpha / N) * sum over cells of the per-cell constraint (MGD-like scale;
    # 2e-5 for one-stage, 5e-7 for two-stage detectors as starting points).
    cfg.DISTILL.DFD.ALPHA = 2e-5
    # rho: fraction of valid cells per image and level treated as hard (largest disparity).
    cfg.DISTILL.DFD.HARD_FRACTION = 0.3
    # Per-cell disparity that ranks cells: "mse", "cos" (1 - cosine) or "rel" (mse / teacher energy).
    cfg.DISTILL.DFD.DISPARITY = "mse"
    # Constraint on hard cells: "pseudo_huber" (shifted to the threshold: continuous value and
    # slope), "pseudo_huber_unshifted" (the unshifted form), "downweight", "cosine" or
    # "generative".
    cfg.DISTILL.DFD.LENIENT = "pseudo_huber"
    # Ablation: lenient on easy cells and strict on hard ones.
    cfg.DISTILL.DFD.REVERSED = False
    # kappa = KAPPA_SCALE * e_theta, the pseudo-Huber scale (larger: closer to plain MSE).
    cfg.DISTILL.DFD.KAPPA_SCALE = 1.0
    # Factor on hard cells for LENIENT = "downweight".
    cfg.DISTILL.DFD.DOWNWEIGHT = 0.5
    # beta_E, beta_H: weights of the easy-cell and hard-cell terms.
    cfg.DISTILL.DFD.BETA_EASY = 1.0
    cfg.DISTILL.DFD.BETA_HARD = 1.0
    # Separate thresholds (and weights below) on GT-box cells and on the other cells.
    cfg.DISTILL.DFD.FG_BG_STRATIFIED = False
    # omega on GT-box cells and on the other cells when FG_BG_STRATIFIED (FGD's 2 : 1).
    cfg.DISTILL.DFD.FG_WEIGHT = 2.0
    cfg.DISTILL.DFD.BG_WEIGHT = 1.0
    # Log hard fraction, mean disparity on easy/hard cells and theta every N iterations.
    cfg.DISTILL.DFD.STATS_PERIOD = 20

    # Global-knowledge distillation, RDM losses (d2kd/heads/global_knowledge.py).
    cfg.DISTILL.GK = CN()
    # Weights of the global (Eq. 6), local feature (Eq. 7) and local response losses.
    cfg.DISTILL.GK.GLOBAL_WEIGHT = 5.0
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1.0
    cfg.DISTILL.GK.RESPONSE_WEIGHT = 1.0
    # Softmax temperature of the response loss.
    cfg.DISTILL.GK.TEMPERATURE = 2.0
    # lambda_fg, lambda_bg of the local feature loss.
    cfg.DISTILL.GK.FG_LAMBDA = 1.0
    cfg.DISTILL.GK.BG_LAMBDA = 4.0
    # Feature-loss reduction over levels: "mean" (released Faster R-CNN) or "sum" (RetinaNet).
    cfg.DISTILL.GK.LEVEL_REDUCTION = "mean"
    # Attenuate the global and feature losses by a = 1 - iter / ATTENUATION_ITERS (released).
    cfg.DISTILL.GK.ATTENUATION = True
    # Iterations over which the attenuation decays to 0 (normally SOLVER.MAX_ITER).
    cfg.DISTILL.GK.ATTENUATION_ITERS = 600

    # Prototypes (PGM) shared by every head that owns a PrototypeBank (GlobalKnowledgeHead,
    # prototype-weighted FitNet / fg-bg heads), refreshed by d2kd/engine/prototype_hook.py.
    cfg.DISTILL.PROTOTYPES = CN()
    # K: prototypes per class and level.
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 10
    # "pgm" (Tang et al.'s selection of real instances) or "kmeans" (ablation: scikit-learn
    # K-means centres of both normalised spaces).
    cfg.DISTILL.PROTOTYPES.SELECTION = "pgm"
    # alpha: coupling of the teacher- and student-space coefficients in PGM.
    cfg.DISTILL.PROTOTYPES.ALPHA = 10.0
    # PGM's density pre-filter (candidates dense in both spaces), from the released code.
    cfg.DISTILL.PROTOTYPES.DENSITY_FILTER = True
    # PGM may pick an instance twice (as released); False excludes repeats.
    cfg.DISTILL.PROTOTYPES.ALLOW_DUPLICATES = True
    # Instance index: GT boxes wider and taller than this (pixels, original resolution) ...
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 30.0
    # ... from at most this many images per class (<= 0: all), drawn with INDEX_SEED.
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS = 800
    cfg.DISTILL.PROTOTYPES.INDEX_SEED = 0
    # Rebuild the bank from the live student every this many iterations (0: one epoch of
    # DATASETS.TRAIN at SOLVER.IMS_PER_BATCH); the bank is always built before the first step.
    cfg.DISTILL.PROTOTYPES.REFRESH_PERIOD = 0
    # False: build the bank once before the first step and never refresh it (ablation).
    cfg.DISTILL.PROTOTYPES.REFRESH = True
    # Images per forward during extraction (images of equal size only).
    cfg.DISTILL.PROTOTYPES.EXTRACT_BATCH_SIZE = 16

    # DetKDS: a searched distiller given as a genome string (d2kd/heads/detkds/genome.py).
    cfg.DISTILL.DETKDS = CN()
    # e.g. "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2".
    cfg.DISTILL.DETKDS.GENOME = "global:catt|scale_r2|norm_N|l1|w=6"
    # "loc" input: positions where the teacher's top (sigmoid) score exceeds this.
    cfg.DISTILL.DETKDS.LOC_SCORE_THRESH = 0.05
    # The search over genomes (tools/search_net.py, d2kd/search/driver.py, docs/detkds_search.md).
    cfg.DISTILL.DETKDS.SEARCH = CN()
    # Stage 1 runs one study per knowledge input listed here (inputs the student cannot use,
    # e.g. logit/loc without a dense head or an RPN, are skipped with a message).
    cfg.DISTILL.DETKDS.SEARCH.INPUTS = ["global", "fgbg", "instance", "logit", "loc"]
    # Stage-1 trials per knowledge input (tools/search_net.py --trials overrides it).
    cfg.DISTILL.DETKDS.SEARCH.TRIALS_PER_INPUT = 20
    # Proxy training of one trial: SOLVER.MAX_ITER and SOLVER.WARMUP_ITERS ...
    cfg.DISTILL.DETKDS.SEARCH.PROXY_ITERS = 100
    cfg.DISTILL.DETKDS.SEARCH.PROXY_WARMUP_ITERS = 20
    # Images per proxy step (SOLVER.IMS_PER_BATCH of a trial); 0 keeps SOLVER.IMS_PER_BATCH.
    cfg.DISTILL.DETKDS.SEARCH.PROXY_IMS_PER_BATCH = 0
    # Student weights a trial starts from ("": MODEL.WEIGHTS), e.g. a checkpoint part-way
    # through the student's own training, so that a short proxy ranks distillers where the
    # student already detects something.
    cfg.DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS = ""
    # Fixed, seeded subsets: training images, validation images (<= 0: the whole dataset),
    # drawn with SUBSET_SEED from DATASETS.TRAIN[0] / DATASETS.TEST[0].
    cfg.DISTILL.DETKDS.SEARCH.TRAIN_IMAGES = 400
    cfg.DISTILL.DETKDS.SEARCH.VAL_IMAGES = 100
    cfg.DISTILL.DETKDS.SEARCH.SUBSET_SEED = 0
    # Reject a candidate (fitness -inf) when its summed KD loss is non-finite, or exceeds this
    # after PROXY_WARMUP_ITERS.
    cfg.DISTILL.DETKDS.SEARCH.REJECT_THRESHOLD = 100.0
    # Fraction of PROXY_ITERS after which box AP is evaluated and reported to the pruner
    # (0: no intermediate evaluation, no pruning).
    cfg.DISTILL.DETKDS.SEARCH.PRUNE_AT = 0.5
    # Optuna MedianPruner: no pruning before this many trials of the study reported.
    cfg.DISTILL.DETKDS.SEARCH.PRUNER_STARTUP_TRIALS = 5
    # Genetic algorithm: population size (trials per generation), elites (best trials ever,
    # always parents), tournament size, uniform-crossover and per-gene mutation probabilities.
    cfg.DISTILL.DETKDS.SEARCH.POPULATION = 10
    cfg.DISTILL.DETKDS.SEARCH.ELITES = 2
    cfg.DISTILL.DETKDS.SEARCH.TOURNAMENT = 3
    cfg.DISTILL.DETKDS.SEARCH.CROSSOVER_PROB = 0.9
    cfg.DISTILL.DETKDS.SEARCH.MUTATION_PROB = 0.2
    # Known-good genomes seeding generation 0 of the GA (their formulas for each input; weights
    # snapped to the weight set): the authors' released distillers by default.
    cfg.DISTILL.DETKDS.SEARCH.SEED_GENOMES = [
        "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2",
        "fgbg:mask|scale_r1|norm_C|l1|w=2",
        "instance:catt|scale_r1|norm_C|l1|w=50",
    ]
    # Stage 2 (weights of the surviving inputs, 0 = input off): exhaustive when the grid has at
    # most STAGE2_MAX_GRID points, else STAGE2_TRIALS trials of the stage-1 sampler.
    cfg.DISTILL.DETKDS.SEARCH.STAGE2_MAX_GRID = 100
    cfg.DISTILL.DETKDS.SEARCH.STAGE2_TRIALS = 20
    # A trial whose process died (killed, OOM, crash that is not the candidate's fault) is
    # retried; after this many attempts its genome is recorded as "failed".
    cfg.DISTILL.DETKDS.SEARCH.MAX_ATTEMPTS = 3
    # Liveness of running trials: the worker records a heartbeat every HEARTBEAT_SECONDS; a
    # running trial whose worker is gone (same host: dead pid; else no heartbeat for
    # STALE_SECONDS) is failed and re-queued.
    cfg.DISTILL.DETKDS.SEARCH.HEARTBEAT_SECONDS = 20
    cfg.DISTILL.DETKDS.SEARCH.STALE_SECONDS = 120

    # ---- solver (d2kd/engine/optimizer.py) ----
    # "SGD" (detectron2's, uses MOMENTUM/NESTEROV) or "AdamW" (uses BETAS).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2).
    cfg.SOLVER.BETAS = (0.9, 0.999)

    # ---- backbone: build_scalable_resnet_fpn_backbone (d2kd/modeling/backbone.py) ----
    # Extra FPN levels above the last input feature: "maxpool" (P6 by max-pooling P5, as in
    # Faster R-CNN), "p6p7" (P6, P7 by stride-2 convs on res5, as in RetinaNet) or "none".
    cfg.MODEL.FPN.TOP_BLOCK = "maxpool"

    # ---- FCOS with a yacs config (detectron2 ships FCOS for LazyConfig only) ----
    cfg.MODEL.FCOS = CN()
    # Number of foreground classes.
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    # FPN levels the head runs on, from the highest resolution to the lowest.
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convolutions in each of the classification and regression towers.
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # Normalisation in the towers ("GN", "BN", "" ...), see detectron2.layers.get_norm.
    cfg.MODEL.FCOS.NORM = "GN"
    # Initial foreground probability of the classification logits.
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    # Centre-sampling radius, in units of the level's stride.
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Focal-loss parameters of the classification branch.
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Inference: score threshold, candidates per level before NMS, NMS IoU threshold.
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6
