"""Crash-safe, durable file writes: a reader sees the old file or the new one, never a torn
one, and once a write returns its file survives a power loss (the file is flushed to disk
before it is renamed into place, the folder after)."""
import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` (``<name>.<random>.tmp``); on success it is
    synced to disk and atomically replaces ``path``, and the folder is synced."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result should be as readable as a normal file
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_write_json(path: str, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically. Saved through a file object, so the
    bytes depend on ``obj`` alone: given a path, torch names the records inside the file after
    it (here the random temporary name), and the same weights would hash differently."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def atomic_save_figure(fig: Any, path: str) -> None:
    """A matplotlib :class:`~matplotlib.figure.Figure` as a PNG (120 dpi) at ``path``,
    atomically. d2kd draws on ``Figure`` objects, never through pyplot, so that it leaves the
    process's plotting backend alone."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
