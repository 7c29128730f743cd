"""Loading weights with the keys that did not match, on every detectron2 build.

detectron2's public ``DetectionCheckpointer.load()`` resolves URLs (``detectron2://``, http)
through ``PathManager``, reads ``.pth`` and model-zoo ``.pkl`` files and renames Caffe2-style
keys, but it only *logs* the keys that did not match. The one hook both detectron2 v0.6 and
upstream ``main`` share for seeing them is ``_load_model`` (upstream ``main`` asserts that
``_load_file`` is only called from inside ``load()``), so it is overridden here and nowhere
else.
"""
import pickle
from typing import List, NamedTuple, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn


class LoadReport(NamedTuple):
    """What did not match when a checkpoint was loaded into a model."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    incorrect_shapes: List[Tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)

    @property
    def problems(self) -> List[str]:
        """One short phrase per kind of mismatch (a count and the first few); empty when
        everything matched."""
        found = []
        if self.missing_keys:
            found.append(f"missing keys: {summarize(sorted(self.missing_keys))}")
        if self.unexpected_keys:
            found.append(f"unexpected keys: {summarize(sorted(self.unexpected_keys))}")
        if self.incorrect_shapes:
            found.append("shape mismatches (key, checkpoint, model): "
                         f"{summarize(sorted(self.incorrect_shapes))}")
        return found


def summarize(items: Sequence, first: int = 2) -> str:
    """``items`` for a one-line message: all of them when few, else the count and the first
    ``first``."""
    if len(items) <= first:
        return ", ".join(map(str, items))
    return f"{len(items)}, e.g. {', '.join(map(str, items[:first]))}"


class UnreadableCheckpoint(ValueError):
    """The file exists but is not a checkpoint (truncated, corrupt or another format)."""


class _ReportingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys of its last ``load()``; given
    ``select_prefix``, a checkpoint with keys under that prefix loads only those, the prefix
    removed (the student of a distillation checkpoint)."""

    report: LoadReport = LoadReport([], [], [])

    def __init__(self, model: nn.Module, select_prefix: str = ""):
        super().__init__(model)
        self.select_prefix = select_prefix

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        prefix = self.select_prefix
        if prefix and any(k.startswith(prefix) for k in state):
            checkpoint["model"] = {k[len(prefix):]: v for k, v in state.items()
                                   if k.startswith(prefix)}
        incompatible = super()._load_model(checkpoint)
        self.report = LoadReport(list(incompatible.missing_keys),
                                 list(incompatible.unexpected_keys),
                                 list(incompatible.incorrect_shapes))
        return incompatible


_UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, AttributeError,
               ValueError, UnicodeDecodeError)


def short_error(error: BaseException) -> str:
    """The error type and, if short, the first line of its message: torch's unpickling errors
    run over many lines (and suggest weights_only=False, which does not help a corrupt
    file)."""
    lines = str(error).strip().splitlines()
    detail = f": {lines[0]}" if lines and len(lines[0]) <= 100 else ""
    return f"{type(error).__name__}{detail}"


def load_weights(model: nn.Module, weights: str, select_prefix: str = "") -> LoadReport:
    """Load ``weights`` (local path or any URL ``PathManager`` resolves) into ``model`` with
    detectron2's own checkpoint handling; return what did not match. ``select_prefix``: see
    :class:`_ReportingCheckpointer`.

    Raises:
        UnreadableCheckpoint: the file cannot be read as a checkpoint.
    """
    checkpointer = _ReportingCheckpointer(model, select_prefix)
    try:
        checkpointer.load(weights, checkpointables=[])
    except _UNREADABLE as e:
        raise UnreadableCheckpoint(short_error(e)) from None
    return checkpointer.report
