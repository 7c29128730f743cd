"""A property-based test of the whole config surface (Hypothesis; docs/trust.md).

Random overrides of the ``DISTILL``, ``SOLVER``, ``DATALOADER`` and ``INPUT`` keys, inside and
outside their valid ranges, on each DigitsDet distillation config (its teachers untrained):
every example either stops in the pre-start check with one short line (:class:`ConfigError`),
or trains 2 iterations with finite losses. Any other exception — a traceback, a NaN
(detectron2 raises ``FloatingPointError``) — fails it; every example writes into a folder of
its own. ``make test`` runs :data:`BOUNDED_EXAMPLES` examples; set
``D2KD_CONFIG_SURFACE_EXAMPLES=N`` for a larger run. Failing examples found are kept below
as regression cases (:data:`REGRESSIONS`).
"""
import glob
import json
import math
import os
import tempfile
from typing import Dict, List, Tuple

import pytest
from conftest import CONFIGS, save_untrained_teacher
from detectron2.config import CfgNode
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from d2kd.config import ConfigError, get_d2kd_cfg, load_config
from d2kd.config.loading import MAX_LINE
from d2kd.engine import DistillTrainer
from d2kd.engine.preflight import check_run

pytestmark = pytest.mark.slow

BOUNDED_EXAMPLES = 12
EXAMPLES = int(os.environ.get("D2KD_CONFIG_SURFACE_EXAMPLES", BOUNDED_EXAMPLES))

#: the DigitsDet distillation configs (the Swin-teacher ones need detectron2 main and timm;
#: the search configs are the search application's, tests/apps/search/)
DISTILL_CONFIGS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "DigitsDet", "*_from_*.yaml"))
    if "SwinT" not in p and not p.endswith("_search.yaml"))
#: subtrees of the surface; structural keys (teachers, schedule, the student's family, the
#: search application's keys) are tested by their own modules
SURFACE = ("DISTILL", "SOLVER", "DATALOADER", "INPUT")
EXCLUDED = ("DISTILL.TEACHER", "DISTILL.SCHEDULE", "DISTILL.STUDENT_META_ARCHITECTURE",
            "DISTILL.DETKDS.SEARCH", "SOLVER.REFERENCE_WORLD_SIZE")
#: keys whose values must stay small for a 2-iteration CPU example (and their edges)
BOUNDED_VALUES = {
    "SOLVER.MAX_ITER": [-1, 0, 1, 2, 3],
    "SOLVER.IMS_PER_BATCH": [-1, 0, 1, 2, 3],
    "SOLVER.CHECKPOINT_PERIOD": [-1, 0, 1, 2, 1000],
    "SOLVER.WARMUP_ITERS": [-1, 0, 1, 5],
    "DATALOADER.NUM_WORKERS": [-1, 0, 1],
    "INPUT.MIN_SIZE_TRAIN": [(), (0,), (16,), (64,), (144,), (96, 160), (-8,)],
    "INPUT.MAX_SIZE_TRAIN": [-1, 0, 16, 192, 256],
    "INPUT.MIN_SIZE_TEST": [-1, 0, 16, 144],
    "INPUT.MAX_SIZE_TEST": [-1, 0, 16, 192],
    "DISTILL.PROTOTYPES.EXTRACT_BATCH_SIZE": [-1, 0, 1, 8],
    "DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS": [-1, 0, 1, 3],
    "DISTILL.DETKDS.GENOME": ["global:catt|scale_r2|norm_N|l1|w=6", "logit:no|no|softmax_C|kl|w=1",
                              "fgbg:no|local_s4|norm_HW|l1|w=2", "global:bogus", ""],
}
#: failing examples found by larger runs, kept as regression cases: (config, overrides)
REGRESSIONS: List[Tuple[str, Dict[str, object]]] = []


def _leaves(node: CfgNode, prefix: str = ""):
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, CfgNode):
            yield from _leaves(value, key + ".")
        elif not key.startswith(EXCLUDED):
            yield key, value


def _surface() -> Dict[str, object]:
    cfg = get_d2kd_cfg()
    return {k: v for k, v in _leaves(cfg) if k.split(".")[0] in SURFACE}


KEYS = _surface()
NUMBER_EDGES = [0, -1, 0.5, 1, 2, 1e-9, 1e6, math.nan, math.inf, -math.inf]


def _values_for(key: str, default: object) -> st.SearchStrategy:
    """Values in and out of range, of the key's type and of others (yacs converts or refuses)."""
    if key in BOUNDED_VALUES:
        return st.sampled_from(BOUNDED_VALUES[key])
    if isinstance(default, bool):
        return st.sampled_from([True, False, 0, 1, "yes"])
    if isinstance(default, int):
        return st.one_of(st.integers(-3, 40), st.sampled_from([0.5, "x"]))
    if isinstance(default, float):
        return st.one_of(st.floats(-2.0, 12.0), st.sampled_from(NUMBER_EDGES))
    if isinstance(default, str):
        return st.sampled_from([default, "", "bogus", "none", "mean", "sum", "value", "norm"])
    if isinstance(default, (list, tuple)):
        items = st.one_of(st.integers(-2, 8), st.floats(0.0, 1.0), st.sampled_from(["p3", "p9"]))
        return st.one_of(st.just(type(default)()), st.lists(items, max_size=3).map(type(default)))
    return st.just(default)


overrides_strategy = st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=3,
                              unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: _values_for(k, KEYS[k]) for k in keys}))


@pytest.fixture(scope="module")
def teacher_weights_by_config(module_tmp_path_factory):
    """Untrained weights of every teacher config the distillation configs name (made once)."""
    root = module_tmp_path_factory.mktemp("teachers")
    cache: Dict[str, str] = {}

    def weights(teacher_config: str) -> str:
        name = os.path.basename(teacher_config)
        if name not in cache:
            cache[name] = save_untrained_teacher(os.path.join("DigitsDet", name),
                                                 root / name[:-5])
        return cache[name]

    return weights


def _base_cfg(config: str, weights_of, output_dir: str) -> List[str]:
    """Overrides that shrink ``config`` to the tiny dataset and untrained teachers."""
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet", config))
    opts = ["DATASETS.TRAIN", "('digitsdet_tiny_train',)",
            "DATASETS.TEST", "('digitsdet_tiny_val',)",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
            "MODEL.WEIGHTS", "", "OUTPUT_DIR", output_dir,
            "DISTILL.PROTOTYPES.MIN_BOX_SIZE", "4.0",
            "DISTILL.TEACHER.WEIGHTS", str([weights_of(c) for c in cfg.DISTILL.TEACHER.CONFIGS])]
    if cfg.DISTILL.SCHEDULE.MODE == "progressive":
        opts += ["DISTILL.SCHEDULE.STAGE_ITERS", str([1] * len(cfg.DISTILL.TEACHER.CONFIGS))]
    return opts


def _as_override(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


def run_example(config: str, overrides: Dict[str, object], weights_of) -> str:
    """``stopped`` (one short ConfigError line, nothing written) or ``trained`` (2
    iterations, every logged loss finite); anything else raises."""
    output_dir = tempfile.mkdtemp(prefix="surface-")
    os.rmdir(output_dir)  # the run must create it, or nothing at all
    opts = _base_cfg(config, weights_of, output_dir)
    for key, value in overrides.items():
        opts += [key, _as_override(value)]
    try:
        cfg = load_config(os.path.join(CONFIGS, "DigitsDet", config), opts)
        check_run(cfg)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and 0 < len(message) <= MAX_LINE, message
        assert not os.path.exists(output_dir), "a stopped run wrote files"
        return "stopped"
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    losses = [v for r in records for k, v in r.items() if k.startswith(("loss", "total_loss"))]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return "trained"


@pytest.mark.parametrize("config, overrides", REGRESSIONS or [pytest.param(
    "retinanet_R18_from_R50_mgd.yaml", {}, id="no-regressions-yet")])
def test_regression_cases(tiny_digitsdet, teacher_weights_by_config, config, overrides):
    assert run_example(config, overrides, teacher_weights_by_config) in ("stopped", "trained")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=st.sampled_from(DISTILL_CONFIGS), overrides=overrides_strategy)
@example(config="retinanet_R18_from_R50_gk.yaml",
         # NaN at iteration 0, before the check
         overrides={"DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE": 0.0})
@example(config="retinanet_R18_from_R50_gk.yaml",
         overrides={"DISTILL.PROTOTYPES.NUM_PROTOTYPES": -1})
@example(config="retinanet_R18_from_R50_mgd.yaml", overrides={"SOLVER.IMS_PER_BATCH": 0})
@example(config="retinanet_R18_from_R50_mgd.yaml", overrides={"DISTILL.HEADS": []})
def test_every_config_either_stops_in_one_line_or_trains(tiny_digitsdet,
                                                         teacher_weights_by_config, config,
                                                         overrides):
    assert run_example(config, overrides, teacher_weights_by_config) in ("stopped", "trained")
