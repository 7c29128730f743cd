"""One rank's failure ends every rank promptly, with the failing rank's error.

On one machine ``torch.multiprocessing`` already ends the other processes when one fails.
Across machines nothing does: the other ranks wait in their next collective (the all-reduce
of the next step, a prototype refresh's broadcast, a teacher-ordering reduction) until the
process group's timeout, 30 minutes by default. So every rank runs its training under
:func:`run_guarded`: a failing rank writes its error to the rendezvous store every rank
reaches, and a watcher thread in every rank checks the store every :data:`POLL_SECONDS`; on
seeing a failure (or the store gone with rank 0's process) it logs which rank failed and why,
and ends its process with exit status 1.

The failing rank's process usually ends before the next poll, and its peers' collective then
fails on its own ("Connection closed by peer"). That error is a consequence, not the cause: a
rank whose training raises first waits up to :data:`POLL_SECONDS` for another rank's failure
in the store and, when there is one, stops with that rank's error instead of its own.
"""
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from detectron2.utils import comm

from ...compat.distributed import default_store
from ...config.loading import one_line

logger = logging.getLogger(__name__)

FAILED_KEY = "d2kd/failed"
POLL_SECONDS = 2.0
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


def _watch(store, stop: threading.Event, rank: int) -> None:
    """Poll the store; a reported failure, or a store that stays unreachable (it lives in
    rank 0's process) for :data:`STORE_GONE_POLLS` polls, ends this process."""
    unreachable = 0
    while not stop.wait(POLL_SECONDS):
        try:
            reason, unreachable = _failure_in_store(store), 0
        except Exception:  # one failed access is not yet rank 0's end (a busy host)
            unreachable += 1
            reason = STORE_GONE if unreachable >= STORE_GONE_POLLS else None
        if reason is not None and not stop.is_set():  # stop set: this rank has finished
            _stop(rank, reason)


def _failure_of_another_rank(store) -> Optional[str]:
    """Another rank's reported failure, waiting up to :data:`POLL_SECONDS` for it; None
    when there is none or the store cannot tell (this rank then reports its own)."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        try:
            reason = _failure_in_store(store)
        except Exception:
            return None
        if reason is not None or time.monotonic() >= deadline:
            return reason
        time.sleep(0.1)


def run_guarded(main_func: Callable[..., Any], *args: Any) -> Any:
    """``main_func(*args)`` on this rank of an initialised process group, ended promptly
    when another rank fails (and announcing this rank's failure to the others)."""
    if comm.get_world_size() == 1:
        return main_func(*args)
    store, rank, stop = default_store(), comm.get_rank(), threading.Event()
    threading.Thread(target=_watch, args=(store, stop, rank), daemon=True,
                     name="d2kd-failure-watch").start()
    try:
        result = main_func(*args)
    except BaseException as error:
        stop.set()
        cause = None if isinstance(error, KeyboardInterrupt) else _failure_of_another_rank(store)
        if cause is not None:
            _stop(rank, cause)
        try:
            store.set(FAILED_KEY, f"rank {rank} failed: {one_line(error)}")
        except Exception:  # rank 0's store is gone: there is nobody left to tell
            pass
        raise
    stop.set()
    comm.synchronize()  # no rank ends (taking the store with it) before all have stopped watching
    return result
