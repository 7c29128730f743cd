"""One rank's failure ends every rank promptly, with the failing rank's error.

On one machine ``torch.multiprocessing`` already ends the other processes when one fails.
Across machines nothing does: the other ranks wait in their next collective (the all-reduce
of the next step, a prototype refresh's broadcast, a teacher-ordering reduction) until the
process group's timeout, 30 minutes by default. So every rank runs its training under
:func:`run_guarded`: a failing rank writes its error to the rendezvous store every rank
reaches, and a watcher thread in every rank checks the store every :data:`POLL_SECONDS`; on
seeing a failure (or the store gone with rank 0's process) it logs which rank failed and why,
and ends its process with exit status 1.
"""
import logging
import os
import sys
import threading
from typing import Any, Callable

from detectron2.utils import comm

from ..compat.distributed import default_store
from ..config.loading import one_line

logger = logging.getLogger(__name__)

FAILED_KEY = "d2kd/failed"
POLL_SECONDS = 2.0


def _watch(store, stop: threading.Event, rank: int) -> None:
    while not stop.wait(POLL_SECONDS):
        try:
            if not store.check([FAILED_KEY]):
                continue
            reason = store.get(FAILED_KEY).decode()
        except Exception:  # the store lives in rank 0's process: gone means rank 0 ended
            reason = "rank 0's process ended (the rendezvous store is gone)"
        if stop.is_set():  # this rank has finished meanwhile
            return
        message = f"d2kd: rank {rank} stops because {reason}"
        logger.error(message)  # log.txt
        # and the console: detectron2 gives ranks other than 0 no console handler, and the
        # process ends now, so this line must not depend on how logging is set up
        print(message, file=sys.stderr, flush=True)
        os._exit(1)  # a thread cannot interrupt the collective the main thread waits in


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
        try:
            store.set(FAILED_KEY, f"rank {rank} failed: {one_line(error)}")
        finally:
            stop.set()
        raise
    stop.set()
    comm.synchronize()  # no rank ends (taking the store with it) before all have stopped watching
    return result
