"""The valid values of config keys, checked before a run starts.

Each config extension declares the rules of its keys next to the keys
(:func:`register_key_rules` in its ``add_<method>_config``); the rules of the detectron2 keys
d2kd's training reads (``SOLVER``, ``DATALOADER``, ``INPUT``, ``TEST``) are below.
:func:`check_key_ranges` raises one :class:`ConfigError` line for the first violation, naming
the key, the value and what it must be.
"""
import math
from typing import Any, Callable, Dict, Tuple

from detectron2.config import CfgNode

from .defaults import SEMANTICS
from .loading import ConfigError

#: (is the value valid, what a valid value is)
Rule = Tuple[Callable[[Any], bool], str]
_RULES: Dict[str, Rule] = {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


POSITIVE: Rule = (lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: _number(v) and v >= 0, "a finite number >= 0")
UNIT_INTERVAL: Rule = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
FRACTION_BELOW_ONE: Rule = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
INTEGER: Rule = (_integer, "an integer")
BOOLEAN: Rule = (lambda v: isinstance(v, bool), "True or False")


def at_least(minimum: int) -> Rule:
    """An integer >= ``minimum``."""
    return (lambda v: _integer(v) and v >= minimum, f"an integer >= {minimum}")


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


def each(rule: Rule, non_empty: bool = True) -> Rule:
    """A list whose every item satisfies ``rule`` (and which has at least one item)."""
    valid, requirement = rule
    return (lambda v: isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty)
            and all(valid(x) for x in v),
            f"a {'non-empty ' if non_empty else ''}list of {requirement.removeprefix('a ')}")


def register_key_rules(rules: Dict[str, Rule]) -> None:
    """Declare the valid values of config keys
    (``"DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE": POSITIVE``)."""
    _RULES.update(rules)


def _lookup(cfg: CfgNode, key: str) -> Tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_key_ranges(cfg: CfgNode) -> None:
    """Raise :class:`ConfigError` for the first key of ``cfg`` outside its declared range
    (keys a config does not have, e.g. an extension's that is not imported, are skipped)."""
    for key, (valid, requirement) in _RULES.items():
        present, value = _lookup(cfg, key)
        if present and not valid(value):
            raise ConfigError(f"{key} = {value!r}: must be {requirement}.")


register_key_rules({
    "DISTILL.SEMANTICS": one_of(SEMANTICS),
    "SOLVER.IMS_PER_BATCH": at_least(1),
    "SOLVER.MAX_ITER": at_least(1),
    "SOLVER.BASE_LR": POSITIVE,
    "SOLVER.MOMENTUM": FRACTION_BELOW_ONE,
    "SOLVER.WEIGHT_DECAY": NON_NEGATIVE,
    "SOLVER.WEIGHT_DECAY_NORM": NON_NEGATIVE,
    "SOLVER.GAMMA": POSITIVE,
    "SOLVER.STEPS": each(at_least(0), non_empty=False),
    "SOLVER.WARMUP_ITERS": at_least(0),
    "SOLVER.WARMUP_FACTOR": UNIT_INTERVAL,
    "SOLVER.WARMUP_METHOD": one_of("linear", "constant"),
    "SOLVER.LR_SCHEDULER_NAME": one_of("WarmupMultiStepLR", "WarmupCosineLR"),
    "SOLVER.CHECKPOINT_PERIOD": at_least(1),
    "SOLVER.CLIP_GRADIENTS.ENABLED": BOOLEAN,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": one_of("value", "norm"),
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": POSITIVE,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": POSITIVE,
    "SOLVER.OPTIMIZER": one_of("SGD", "AdamW"),
    "SOLVER.BETAS": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                     and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "DATALOADER.NUM_WORKERS": at_least(0),
    "DATALOADER.ASPECT_RATIO_GROUPING": BOOLEAN,
    "DATALOADER.SAMPLER_TRAIN": one_of("TrainingSampler", "RepeatFactorTrainingSampler",
                                       "RandomSubsetTrainingSampler"),
    "DATALOADER.REPEAT_THRESHOLD": NON_NEGATIVE,
    "DATALOADER.RANDOM_SUBSET_RATIO": (lambda v: _number(v) and 0 < v <= 1,
                                       "a number in (0, 1]"),
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": BOOLEAN,
    "INPUT.MIN_SIZE_TRAIN": each(at_least(1)),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": one_of("choice", "range", "range_by_clipping"),
    "INPUT.MAX_SIZE_TRAIN": at_least(1),
    "INPUT.MIN_SIZE_TEST": at_least(0),
    "INPUT.MAX_SIZE_TEST": at_least(1),
    "INPUT.FORMAT": one_of("RGB", "BGR"),
    "INPUT.RANDOM_FLIP": one_of("none", "horizontal", "vertical"),
    "INPUT.CROP.ENABLED": BOOLEAN,
    "INPUT.CROP.TYPE": one_of("relative_range", "relative", "absolute", "absolute_range"),
    "INPUT.CROP.SIZE": each(POSITIVE),
    "TEST.EVAL_PERIOD": at_least(0),
    "SEED": INTEGER,
})
