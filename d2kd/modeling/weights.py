"""How strictly weights load, by what they are for (docs/trust.md):

- **evaluation** (``--eval-only``): every tensor of the evaluated model must load. A
  distillation config evaluates its student, from a full distillation checkpoint (its
  ``student.*`` tensors), a plain student file or ``model_final_student.pth``;
- **training initialisation** (``MODEL.WEIGHTS`` of a fresh run): detectron2's partial loading
  (a backbone-only file is normal), but a file of which no parameter of the model loads is an
  error, and the share that loaded is logged;
- **resume**: this run's own training checkpoints only (:mod:`d2kd.engine.checkpoint`).
"""
import logging

from torch import nn

from ..compat.weight_loading import LoadReport, UnreadableCheckpoint, load_weights
from ..config.loading import ConfigError

logger = logging.getLogger(__name__)

#: where a distillation checkpoint keeps the student's tensors (``student.<detector key>``)
STUDENT_PREFIX = "student."


def _load(model: nn.Module, weights: str, key: str) -> LoadReport:
    try:
        return load_weights(model, weights, select_prefix=STUDENT_PREFIX)
    except UnreadableCheckpoint as e:
        raise ConfigError(f"{key} {weights} cannot be read as a checkpoint ({e}).") from None
    except (AssertionError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{key} {weights} cannot be opened ({e}).") from None


def load_for_evaluation(detector: nn.Module, weights: str, key: str = "MODEL.WEIGHTS") -> None:
    """Load ``weights`` into the evaluated ``detector`` (a distillation model's student:
    :func:`~d2kd.modeling.distillation_detector.deployed_detector`); raise
    :class:`ConfigError` unless every one of its tensors loads with its shape."""
    if not weights:
        raise ConfigError(f"--eval-only needs trained weights: set {key} to a checkpoint "
                          "(model_final.pth or model_final_student.pth of a run).")
    report = _load(detector, weights, key)
    if report.missing_keys or report.incorrect_shapes:
        problems = LoadReport(report.missing_keys, [], report.incorrect_shapes).problems
        raise ConfigError(
            f"{key} {weights} is not a checkpoint of the evaluated model "
            f"({type(detector).__name__}): {'; '.join(problems)}. Give a checkpoint of this "
            "config's run (model_final.pth or model_final_student.pth).")
    if report.unexpected_keys:
        logger.warning("%s %s: %s (not part of the evaluated model; ignored)", key, weights,
                       report.problems[0])


def load_initialisation(detector: nn.Module, weights: str, key: str = "MODEL.WEIGHTS") -> float:
    """Initialise ``detector`` (a distillation model's student) from ``weights`` with
    detectron2's partial loading; returns the share of its parameters that loaded (logged).

    Raises:
        ConfigError: no parameter of the model is in the file (another model's weights).
    """
    report = _load(detector, weights, key)
    not_loaded = set(report.missing_keys) | {k for k, *_ in report.incorrect_shapes}
    params = dict(detector.named_parameters())
    loaded = [name for name in params if name not in not_loaded]
    if not loaded:
        raise ConfigError(
            f"{key} {weights}: none of the {len(params)} parameters of the "
            f"{type(detector).__name__} loads from it ({'; '.join(report.problems)}): it holds "
            "another model's weights. Point it at weights of this architecture.")
    share = sum(params[n].numel() for n in loaded) / sum(p.numel() for p in params.values())
    logger.info("%s %s: %d of %d parameter tensors loaded (%.1f%% of the values)", key, weights,
                len(loaded), len(params), 100 * share)
    return share
