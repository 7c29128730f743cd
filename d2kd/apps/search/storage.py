"""The Optuna storage of a DetKDS search and the liveness of the workers that share it.

Every running trial carries its worker's ``host``, ``pid`` and a ``heartbeat`` (user
attributes, see :func:`record_worker` and :class:`Heartbeat`); :func:`is_stale` tells from
them whether that worker is gone, and :func:`fail_and_requeue` gives the genome of such a
trial (or of a trial whose process died) another attempt.

Durability: one search at a time owns an output folder (:func:`lock_output`); a journal
whose last record a kill or a full disk tore is repaired before the search resumes
(:func:`repair_journal`); a heartbeat survives transient storage errors.
"""
import fcntl
import logging
import os
import socket
import threading
import time
from typing import IO, Dict, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

LOCK_FILE = "search.lock"


def journal_path(url: Optional[str], output_dir: str) -> Optional[str]:
    """The journal file a storage URL names (no URL: ``output_dir/journal.log``); None for
    an SQL database."""
    if not url:
        return os.path.join(output_dir, "journal.log")
    return None if "://" in url else url


def open_storage(url: Optional[str], output_dir: str) -> optuna.storages.BaseStorage:
    """No URL: a journal file ``output_dir/journal.log`` (file lock, safe across processes of
    one machine or a shared file system); ``dialect://...``: an SQL database (RDBStorage, for
    many machines); any other string: the path of a journal file."""
    journal = journal_path(url, output_dir)
    if journal is None:
        return optuna.storages.RDBStorage(url)
    os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))


def repair_journal(path: str) -> int:
    """Remove a torn last record (bytes after the last newline: a write a kill or a full disk
    interrupted, which never took effect) from the journal at ``path``; returns the bytes
    removed. Call it while no process writes the journal (before the workers start)."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # back to the last newline, 64 KiB at a time
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("Removed a torn last record (%d bytes) from %s: a write was interrupted.",
                   size - end, path)
    return size - end


class SearchInUse(RuntimeError):
    """Another search runs on the same output folder."""


def lock_output(output_dir: str) -> IO:
    """Hold ``output_dir/search.lock`` for this search (released when the returned file is
    closed or the process ends, even by a kill).

    Raises:
        SearchInUse: another search (any process of this machine or of one sharing the
            folder) holds it.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown process"
        lock.close()
        raise SearchInUse(f"another search runs on {output_dir} ({holder}): wait for it to "
                          "end, or give this one another --output.") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def record_worker(trial: optuna.Trial, session: str) -> None:
    """Stamp a trial with this worker (host, pid), a first heartbeat and the session."""
    for key, value in (("host", socket.gethostname()), ("pid", os.getpid()),
                       ("heartbeat", time.time()), ("session", session)):
        trial.set_user_attr(key, value)


class Heartbeat:
    """While open, records ``time.time()`` as the trial's ``heartbeat`` every ``period`` s."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, period: float):
        self.storage, self.trial_id, self.period = storage, trial_id, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except UpdateFinishedTrialError:
                return
            except Exception as e:  # a transient storage error: the next beat tries again
                logger.warning("Heartbeat of trial %d not recorded (%s: %s); retrying in %.0f s.",
                               self.trial_id, type(e).__name__, e, self.period)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return True


def is_stale(trial: FrozenTrial, stale_seconds: float) -> bool:
    """Whether the worker of a running trial is gone: on this host its pid is dead (another
    pid than this process); on any host no heartbeat (else start time) for ``stale_seconds``."""
    attrs = trial.user_attrs
    if attrs.get("host") == socket.gethostname() and "pid" in attrs:
        if attrs["pid"] != os.getpid() and not _process_alive(attrs["pid"]):
            return True
    last = attrs.get("heartbeat")
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    return last is not None and time.time() - last > stale_seconds


def fail_and_requeue(storage: optuna.storages.BaseStorage, study: optuna.Study, trial_id: int,
                     params: Dict, attempt: int, max_attempts: int) -> bool:
    """Mark a running trial of ``study`` failed (status ``infra_failure``, or ``failed`` once
    ``attempt`` reaches ``max_attempts``) and, unless it used its attempts, queue its
    ``params`` again with ``attempt`` + 1; False when another worker did it first."""
    retry = attempt < max_attempts
    try:
        storage.set_trial_user_attr(trial_id, "status", "infra_failure" if retry else "failed")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if retry:
        study.enqueue_trial(params, user_attrs={"attempt": attempt + 1})
    return True
