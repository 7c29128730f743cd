"""Checkpoints that a crash or a kill cannot tear, and the checkpoint ``--resume`` uses.

detectron2 writes ``model_<iteration>.pth`` and then the ``last_checkpoint`` tag in place, so a
kill during either leaves a torn file. :class:`AtomicCheckpointer` writes both to a temporary
sibling, flushed to disk (``fsync``), renames it and syncs the folder, so the tag never moves
before its checkpoint is durable; :func:`remove_torn_writes` removes the temporaries a killed
write left. :func:`resume_checkpoint` picks what ``--resume`` loads: only this run's training
checkpoints (``model_<7 digits>.pth``, ``model_final.pth`` holding model, optimizer, scheduler
and iteration; exports such as ``model_final_student.pth`` never), the tagged one if it can
be read, else — with a warning naming the unreadable file — the newest readable one, to which
it re-points the tag.
"""
import glob
import logging
import os
import re
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..compat.weight_loading import short_error
from ..config.loading import ConfigError
from ..utils.io import atomic_save, atomic_write_text

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # detectron2's tag file
#: temporaries of atomic checkpoint and tag writes: ``model_0000199.pth.k3j2.tmp``
TEMPORARY = re.compile(r"^(model_\w+\.pth|last_checkpoint)\..+\.tmp$")


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear whole or not at all."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)


#: the names detectron2's checkpointer gives training checkpoints (PeriodicCheckpointer)
TRAINING_CHECKPOINT = re.compile(r"^model_(\d{7}|final)\.pth$")
#: what a training checkpoint holds besides the model (the trainer: optimizer, scheduler)
TRAINING_STATE = ("model", "trainer", "iteration")


def _readable(path: str) -> Optional[str]:
    """None if ``path`` opens as a training checkpoint (memory-mapped: cheap), else why not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # any failure to read means: do not resume from it
        return short_error(e)
    missing = [k for k in TRAINING_STATE
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    return f"not a training checkpoint: no {', '.join(missing)}" if missing else None


def _by_iteration(output_dir: str) -> List[str]:
    """The training checkpoints of ``output_dir``, newest iteration first (``model_final``
    first); exports and other files are never candidates."""
    def key(path: str):
        iteration = TRAINING_CHECKPOINT.match(os.path.basename(path)).group(1)
        return float("inf") if iteration == "final" else int(iteration)

    names = [p for p in glob.glob(os.path.join(output_dir, "model_*.pth"))
             if TRAINING_CHECKPOINT.match(os.path.basename(p))]
    return sorted(names, key=key, reverse=True)


def remove_torn_writes(output_dir: str) -> List[str]:
    """Remove the temporaries of checkpoint and tag writes a kill interrupted
    (``<name>.<random>.tmp`` of :func:`~d2kd.utils.io.atomic_path`); returns them."""
    torn = [p for p in glob.glob(os.path.join(output_dir, "*.tmp"))
            if TEMPORARY.match(os.path.basename(p))]
    for path in torn:
        os.remove(path)
        logger.warning("Removed %s, left by an interrupted write.", path)
    return torn


def resume_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` should load from ``output_dir`` (None: none, start fresh).

    Raises:
        ConfigError: checkpoints exist but none of them can be read.
    """
    tag = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        tagged = os.path.join(output_dir, f.read().strip())
    if not TRAINING_CHECKPOINT.match(os.path.basename(tagged)):
        problem = "not a training checkpoint name"
    else:
        problem = _readable(tagged) if os.path.isfile(tagged) else "missing"
    if problem is None:
        return tagged
    bad = [f"{tagged} ({problem})"]
    for candidate in _by_iteration(output_dir):
        if candidate == tagged:
            continue
        problem = _readable(candidate)
        if problem is None:
            logger.warning("Checkpoint %s cannot be read; resuming from %s instead.", bad[0],
                           candidate)
            atomic_write_text(tag, os.path.basename(candidate))
            return candidate
        bad.append(f"{candidate} ({problem})")
    raise ConfigError(f"--resume: no readable checkpoint in {output_dir}: {'; '.join(bad)}. "
                      "Delete the unreadable files to start over, or run without --resume "
                      "in a new OUTPUT_DIR.")
