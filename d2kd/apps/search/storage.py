"""The Optuna storage of a DetKDS search and the liveness of the workers that share it.

Every running trial carries its worker's ``host``, ``pid`` and a ``heartbeat`` (user
attributes, see :func:`record_worker` and :class:`Heartbeat`); :func:`is_stale` tells from
them whether that worker is gone, and :func:`fail_and_requeue` gives the genome of such a
trial (or of a trial whose process died) another attempt.

Durability: one search at a time owns an output folder (:func:`lock_output`); a journal
whose last record a kill or a full disk tore is repaired before the search resumes
(:func:`repair_journal`); a heartbeat survives transient storage errors; the calls to an SQL
database wait for it through a restart or a network cut (:class:`ReconnectingStorage`).

A worker names its machine by :func:`host_name`: the host name, or ``$D2KD_SEARCH_HOST`` where
host names do not tell machines apart (containers with one host name; workers standing in for
machines in tests/apps/search/test_postgresql.py).
"""
import fcntl
import functools
import logging
import os
import socket
import threading
import time
from typing import IO, Any, Callable, Dict, Optional

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

logger = logging.getLogger(__name__)

LOCK_FILE = "search.lock"
#: the environment variable that overrides this worker's host name (:func:`host_name`)
HOST_ENV = "D2KD_SEARCH_HOST"
#: how long a call to an SQL database is retried while the database cannot be reached
RECONNECT_SECONDS = 300.0
#: the longest pause between two retries of a call
MAX_RETRY_PAUSE = 2.0
#: attempts to open an SQL database whose tables other workers create at the same moment
OPEN_TRIES = 5


def host_name() -> str:
    """The machine of this worker as the search records it (trials' ``host``, the output
    lock): ``$D2KD_SEARCH_HOST`` when set, else the host name. Workers of one identity judge
    each other's trials by their pids (:func:`is_stale`), so every machine (pid namespace)
    needs its own."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def journal_path(url: Optional[str], output_dir: str) -> Optional[str]:
    """The journal file a storage URL names (no URL: ``output_dir/journal.log``); None for
    an SQL database."""
    if not url:
        return os.path.join(output_dir, "journal.log")
    return None if "://" in url else url


def open_storage(url: Optional[str], output_dir: str) -> optuna.storages.BaseStorage:
    """No URL: a journal file ``output_dir/journal.log`` (file lock, safe across processes of
    one machine or a shared file system); ``dialect://...``: an SQL database (RDBStorage, for
    many machines; its calls wait for the database, :class:`ReconnectingStorage`); any other
    string: the path of a journal file."""
    journal = journal_path(url, output_dir)
    if journal is None:
        return ReconnectingStorage(_open_database(url))
    os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))


def _open_database(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage of the SQL database ``url``, with pre-ping: a pooled connection that
    the server dropped (a restart) is replaced before it is used. Workers that start together
    on an empty database race to create its tables; a loser's ``CREATE TABLE`` fails
    (``IntegrityError`` or ``ProgrammingError``: it exists) and it opens the database again."""
    for attempt in range(1, OPEN_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError):
            if attempt == OPEN_TRIES:
                raise
            time.sleep(0.2 * attempt)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached: SQLAlchemy's
    ``OperationalError`` (connection refused or dropped by a restarting server, a timeout, a
    deadlock's rollback), raised directly or as the cause of Optuna's
    ``StorageInternalError``."""
    if isinstance(error, StorageInternalError):
        error = error.__cause__
    return isinstance(error, OperationalError)


class _Reconnecting:
    """A method of :class:`ReconnectingStorage`: its backend's method of the same name, called
    through :meth:`ReconnectingStorage.call`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, storage: Optional["ReconnectingStorage"], owner: type) -> Any:
        if storage is None:
            return self
        return functools.partial(storage.call, getattr(storage.backend, self.name))


class ReconnectingStorage(optuna.storages.BaseStorage):
    """An Optuna storage whose calls wait for the database: a call to ``backend`` (an
    ``RDBStorage``) that fails because the database cannot be reached (:func:`_unreachable`)
    is made again after 0.25, 0.5 and 1 s, then every ``MAX_RETRY_PAUSE`` s, for up to
    ``patience`` s; any other error is raised at once.

    The transaction of a failed call was rolled back, so the call takes effect once. One case
    repeats a write: the server committed it and went down before its answer arrived. A
    repeated ``create_new_trial`` then leaves a trial that no worker runs (failed as stale
    after ``STALE_SECONDS``, its genome re-queued), and a repeated ``set_trial_state_values``
    finds its trial finished (``UpdateFinishedTrialError``).

    Optuna's cache of finished trials, which it puts around an ``RDBStorage`` it is given, is
    not used: every read goes to the database, as the driver's own reads did already.
    """

    def __init__(self, backend: optuna.storages.BaseStorage,
                 patience: float = RECONNECT_SECONDS):
        self.backend, self.patience = backend, patience

    def call(self, method: Callable, *args, **kwargs) -> Any:
        """``method(*args, **kwargs)``, made again while the database cannot be reached."""
        start, pause, failures = time.monotonic(), 0.25, 0
        while True:
            try:
                result = method(*args, **kwargs)
            except (StorageInternalError, OperationalError) as e:
                waited = time.monotonic() - start
                if not _unreachable(e) or waited + pause > self.patience:
                    raise
                if not failures:
                    logger.warning("%s: the database cannot be reached (%s); trying again for "
                                   "up to %.0f s.", method.__name__, str(e.__cause__ or e)
                                   .splitlines()[0], self.patience)
                failures += 1
                time.sleep(pause)
                pause = min(2 * pause, MAX_RETRY_PAUSE)
                continue
            if failures:
                logger.warning("%s: the database answered again after %.1f s (%d tries).",
                               method.__name__, time.monotonic() - start, failures + 1)
            return result

    create_new_study = _Reconnecting()
    delete_study = _Reconnecting()
    set_study_user_attr = _Reconnecting()
    set_study_system_attr = _Reconnecting()
    get_study_id_from_name = _Reconnecting()
    get_study_name_from_id = _Reconnecting()
    get_study_directions = _Reconnecting()
    get_study_user_attrs = _Reconnecting()
    get_study_system_attrs = _Reconnecting()
    get_all_studies = _Reconnecting()
    create_new_trial = _Reconnecting()
    set_trial_param = _Reconnecting()
    set_trial_state_values = _Reconnecting()
    set_trial_intermediate_value = _Reconnecting()
    set_trial_user_attr = _Reconnecting()
    set_trial_system_attr = _Reconnecting()
    get_trial = _Reconnecting()
    get_all_trials = _Reconnecting()


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
    lock.write(f"pid {os.getpid()} on {host_name()} since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


def record_worker(trial: optuna.Trial, session: str) -> None:
    """Stamp a trial with this worker (host, pid), a first heartbeat and the session."""
    for key, value in (("host", host_name()), ("pid", os.getpid()),
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
    if attrs.get("host") == host_name() and "pid" in attrs:
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
