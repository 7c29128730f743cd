"""One rank's failure ends every rank promptly, with the failing rank's error.

On one machine ``torch.multiprocessing`` already ends the other processes when one fails.
Across machines nothing does: the other ranks wait in their next collective (the all-reduce
of the next step, a prototype refresh's broadcast, a teacher-ordering reduction) until the
process group's timeout, 30 minutes by default. So every rank runs its training under
:func:`run_guarded`: a failing rank writes its error to the rendezvous store every rank
reaches, and a watcher thread in every rank checks the store every :data:`POLL_SECONDS`; on
seeing a failure (or the store gone with rank 0's process) it logs which rank failed and why,
and ends its process with exit status 1.

A rank that cannot report (its process killed, its machine gone) is found by its silence:
every watcher counts a heartbeat in the store each poll, and rank 0's watcher, which reads
every rank's count (one key per rank per poll: the cost grows with the ranks at rank 0 only),
reports a rank whose count has not moved for :data:`LOST_SECONDS` as lost.

The failing rank's process usually ends before the next poll, and its peers' collective then
fails on its own ("Connection closed by peer"). That error is a consequence, not the cause: a
rank whose training raises first waits up to :data:`POLL_SECONDS` for another rank's failure
in the store (up to :data:`LOST_SECONDS` more when its error is a lost connection, the time
rank 0 needs to name a silent rank) and, when there is one, stops with that rank's error
instead of its own.
"""
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from detectron2.utils import comm

from ...compat.cpu_distributed import default_store
from ...config.loading import one_line

logger = logging.getLogger(__name__)

FAILED_KEY = "d2kd/failed"
HEARTBEAT_KEY = "d2kd/heartbeat/{rank}"
POLL_SECONDS = 2.0
#: a rank whose heartbeat has not moved for this long is reported lost (by rank 0)
LOST_SECONDS = 30.0
#: words of the errors a collective raises when a peer's connection is gone (gloo, NCCL)
CONNECTION_ERRORS = ("Connection closed", "Connection reset", "Broken pipe", "NCCL")
#: the longest a stopping rank spends writing its last lines before it ends
STOP_GRACE_SECONDS = 5.0


#: consecutive polls whose store access fails before a watcher concludes rank 0 has ended
STORE_GONE_POLLS = 3
STORE_GONE = "rank 0's process ended (the rendezvous store is gone)"


def _failure_in_store(store) -> Optional[str]:
    """The failure a rank reported, or None; raises when the store cannot be reached."""
    return store.get(FAILED_KEY).decode() if store.check([FAILED_KEY]) else None


def _stop(rank: int, reason: str) -> None:
    # Ends the process within STOP_GRACE_SECONDS even if writing the lines below blocks: the
    # main thread may hold the log handler's lock while its own write waits (a full pipe).
    threading.Timer(STOP_GRACE_SECONDS, os._exit, args=(1,)).start()
    message = f"d2kd: rank {rank} stops because {reason}"
    # the console first: detectron2 gives ranks other than 0 no console handler, and the
    # process ends now, so this line must not depend on how logging is set up
    print(message, file=sys.stderr, flush=True)
    logger.error(message)  # log.txt
    os._exit(1)  # a watcher thread has no other way to end the main thread's collective


class _Heartbeats:
    """Rank 0's view of every rank's heartbeat count: which ranks fell silent."""

    def __init__(self, world_size: int):
        now = time.monotonic()
        self.counts = [-1] * world_size
        self.moved = [now] * world_size  # when each count last changed

    def lost(self, store) -> Optional[str]:
        """Reads every count (``store.add(key, 0)`` reads without changing it); the silent
        ranks as a failure reason, or None."""
        now = time.monotonic()
        for rank in range(len(self.counts)):
            count = store.add(HEARTBEAT_KEY.format(rank=rank), 0)
            if count != self.counts[rank]:
                self.counts[rank], self.moved[rank] = count, now
        silent = [r for r, moved in enumerate(self.moved) if now - moved >= LOST_SECONDS]
        if not silent:
            return None
        ranks = ", ".join(map(str, silent))
        return (f"rank {ranks} {'was' if len(silent) == 1 else 'were'} lost: no heartbeat for "
                f"{LOST_SECONDS:.0f} s (its process was killed or its machine is unreachable)")


def _watch(store, stop: threading.Event, rank: int, world_size: int) -> None:
    """Poll the store: count this rank's heartbeat; a reported failure, a silent rank (rank 0
    reports it), or a store that stays unreachable (it lives in rank 0's process) for
    :data:`STORE_GONE_POLLS` polls ends this process."""
    unreachable = 0
    heartbeats = _Heartbeats(world_size) if rank == 0 else None
    while not stop.wait(POLL_SECONDS):
        try:
            store.add(HEARTBEAT_KEY.format(rank=rank), 1)
            reason, unreachable = _failure_in_store(store), 0
            lost = heartbeats.lost(store) if heartbeats is not None and reason is None else None
            if lost is not None:
                store.set(FAILED_KEY, lost)
                reason = lost
        except Exception:  # one failed access is not yet rank 0's end (a busy host)
            unreachable += 1
            reason = STORE_GONE if unreachable >= STORE_GONE_POLLS else None
        if reason is not None and not stop.is_set():  # stop set: this rank has finished
            _stop(rank, reason)


def _failure_of_another_rank(store, wait_seconds: float) -> Optional[str]:
    """Another rank's reported failure, waiting up to ``wait_seconds`` for it; None when
    there is none or the store cannot tell (this rank then reports its own)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            reason = _failure_in_store(store)
        except Exception:
            return None
        if reason is not None or time.monotonic() >= deadline:
            return reason
        time.sleep(0.1)


def _lost_connection(error: BaseException) -> bool:
    """Whether ``error`` is a collective's report of a peer that went away."""
    return any(words in str(error) for words in CONNECTION_ERRORS)


def run_guarded(main_func: Callable[..., Any], *args: Any) -> Any:
    """``main_func(*args)`` on this rank of an initialised process group, ended promptly
    when another rank fails or falls silent (and announcing this rank's failure to the
    others)."""
    if comm.get_world_size() == 1:
        return main_func(*args)
    store, rank, stop = default_store(), comm.get_rank(), threading.Event()
    threading.Thread(target=_watch, args=(store, stop, rank, comm.get_world_size()),
                     daemon=True, name="d2kd-failure-watch").start()
    try:
        result = main_func(*args)
    except BaseException as error:
        # the watcher keeps counting this rank's heartbeat (and, on rank 0, reading the
        # others') while the cause is looked for
        wait = POLL_SECONDS + (LOST_SECONDS + 2 * POLL_SECONDS if _lost_connection(error) else 0)
        cause = (None if isinstance(error, KeyboardInterrupt)
                 else _failure_of_another_rank(store, wait))
        stop.set()
        if cause is not None:
            _stop(rank, cause)
        try:
            store.set(FAILED_KEY, f"rank {rank} failed: {one_line(error)}")
        except Exception:  # rank 0's store is gone: there is nobody left to tell
            pass
        raise
    # every rank keeps its heartbeat until all have finished, and no rank ends (taking the
    # store with it) before all have stopped watching: the barrier, then the watcher's end
    comm.synchronize()
    stop.set()
    return result
