"""Config keys of the DetKDS search application."""
from detectron2.config import CfgNode

from ...config.defaults import register_config_extension
from ...config.ranges import BOOLEAN, at_least, one_of, register_key_rules
from .pruning import PRUNERS


@register_config_extension
def add_detkds_search_config(cfg: CfgNode) -> None:
    """``DISTILL.DETKDS.SEARCH``: the DetKDS search (tools/search_net.py); registered when
    :mod:`d2kd.apps.search` is imported, so model configs do not carry them."""
    if "SEARCH" in cfg.DISTILL.DETKDS:
        return
    # The search over genomes (tools/search_net.py, d2kd/apps/search/driver.py,
    # docs/detkds_search.md).
    cfg.DISTILL.DETKDS.SEARCH = CfgNode()
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
    # drawn with SUBSET_SEED.
    cfg.DISTILL.DETKDS.SEARCH.TRAIN_IMAGES = 400
    cfg.DISTILL.DETKDS.SEARCH.VAL_IMAGES = 100
    cfg.DISTILL.DETKDS.SEARCH.SUBSET_SEED = 0
    # Where the proxy's validation images come from: "train_holdout" (default) — VAL_IMAGES
    # images of DATASETS.TRAIN[0] that the proxy never trains on (its TRAIN_IMAGES are drawn
    # from the rest), so no image of DATASETS.TEST, the split every reported AP uses, takes
    # part in the search; or "test" — VAL_IMAGES images of DATASETS.TEST[0], as searches did
    # before (their selection saw the reported split).
    cfg.DISTILL.DETKDS.SEARCH.VAL_SOURCE = "train_holdout"
    # Reject a candidate (fitness -inf) when its summed KD loss is non-finite, or exceeds this
    # after PROXY_WARMUP_ITERS.
    cfg.DISTILL.DETKDS.SEARCH.REJECT_THRESHOLD = 100.0
    # Multi-fidelity trials (d2kd/apps/search/pruning.py): Optuna's pruner, "median" (one
    # evaluation after PRUNE_AT of PROXY_ITERS), "successive_halving" or "hyperband" (rungs
    # after PRUNE_AT of PROXY_ITERS and every PRUNE_REDUCTION_FACTOR times as many iterations
    # below PROXY_ITERS). At each report box AP is evaluated on the proxy's validation images.
    cfg.DISTILL.DETKDS.SEARCH.PRUNER = "median"
    # Fraction of PROXY_ITERS at the first report (0: no intermediate evaluation, no pruning).
    cfg.DISTILL.DETKDS.SEARCH.PRUNE_AT = 0.5
    # Successive halving / Hyperband: eta, the budget ratio between rungs (the best 1/eta of a
    # rung's trials go on).
    cfg.DISTILL.DETKDS.SEARCH.PRUNE_REDUCTION_FACTOR = 3
    # Median pruner: no pruning before this many trials of the study reported.
    cfg.DISTILL.DETKDS.SEARCH.PRUNER_STARTUP_TRIALS = 5
    # Genetic algorithm: population size (trials per generation), elites (best trials ever,
    # always parents), tournament size, uniform-crossover and per-gene mutation probabilities.
    cfg.DISTILL.DETKDS.SEARCH.POPULATION = 10
    cfg.DISTILL.DETKDS.SEARCH.ELITES = 2
    cfg.DISTILL.DETKDS.SEARCH.TOURNAMENT = 3
    cfg.DISTILL.DETKDS.SEARCH.CROSSOVER_PROB = 0.9
    cfg.DISTILL.DETKDS.SEARCH.MUTATION_PROB = 0.2
    # Stage 1 draws from the paper's ops and distances (the authors' release); True adds every
    # other registered one (d2kd's variants such as natt_pooled, s2d_s2, min_max_sample,
    # cos_flat, pearson_flat, correlation_full, mask_shared; projects' registrations).
    cfg.DISTILL.DETKDS.SEARCH.EXTRA_OPS = False
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
    # STALE_SECONDS) is failed and re-queued. A host is its host name, or $D2KD_SEARCH_HOST.
    cfg.DISTILL.DETKDS.SEARCH.HEARTBEAT_SECONDS = 20
    cfg.DISTILL.DETKDS.SEARCH.STALE_SECONDS = 120


register_key_rules({"DISTILL.DETKDS.SEARCH.EXTRA_OPS": BOOLEAN,
                    "DISTILL.DETKDS.SEARCH.PRUNER": one_of(*PRUNERS),
                    "DISTILL.DETKDS.SEARCH.PRUNE_REDUCTION_FACTOR": at_least(2)})
