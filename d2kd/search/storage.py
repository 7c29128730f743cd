"""The Optuna storage of a DetKDS search and the liveness of the workers that share it.

Every running trial carries its worker's ``host``, ``pid`` and a ``heartbeat`` (user
attributes, see :func:`record_worker` and :class:`Heartbeat`); :func:`is_stale` tells from
them whether that worker is gone, and :func:`fail_and_requeue` gives the genome of such a
trial (or of a trial whose process died) another attempt.
"""
import os
import socket
import threading
import time
from typing import Dict, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState


def open_storage(url: Optional[str], output_dir: str) -> optuna.storages.BaseStorage:
    """No URL: a journal file ``output_dir/journal.log`` (file lock, safe across processes of
    one machine or a shared file system); ``dialect://...``: an SQL database (RDBStorage, for
    many machines); any other string: the path of a journal file."""
    if not url:
        url = os.path.join(output_dir, "journal.log")
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


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
