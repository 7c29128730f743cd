"""tools/search_net.py with trials that sleep instead of training (used by
tests/apps/search/test_postgresql.py, where each such process stands in for one machine).

    D2KD_SEARCH_HOST=NAME TRIAL_SECONDS=2 python tests/helpers/search_worker.py SEARCH_NET_ARGS...

It takes search_net.py's arguments, so that tools/slurm/search_node.sh runs it in place of the
search command (``SEARCH_NET``).

A trial marks its folder ``OUTPUT/trials/<study>/<number>/`` with an empty ``started`` file,
sleeps ``$TRIAL_SECONDS``, scores its genome by a fixed rule (the baseline 10, a genome 10 to
16), marks the folder ``finished`` and returns: the markers tell a test which machine ran which
trial, which one a kill met in the middle, and which evaluations ended. The search's config checks
(weights, datasets) are skipped, as the stand-in needs neither; the rest is the command's.
"""
import os
import sys
import time
from typing import List, Optional

from d2kd.apps.search.proxy import ReportFn, TrialOutcome

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import search_net  # noqa: E402


class SleepingEvaluator:
    """Stands in for :class:`d2kd.apps.search.proxy.ProxyEvaluator` (same arguments)."""

    seconds = 0.0

    def __init__(self, config_file: str, opts: List[str], threads: int):
        pass

    def __call__(self, genome: Optional[str], output_dir: str, report: ReportFn) -> TrialOutcome:
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, "started"), "w").close()
        time.sleep(self.seconds)
        ap = 10.0 if genome is None else 10.0 + sum(map(ord, genome)) % 7
        open(os.path.join(output_dir, "finished"), "w").close()
        return TrialOutcome("ok", ap, self.seconds)


def main(*argv: str) -> None:
    SleepingEvaluator.seconds = float(os.environ["TRIAL_SECONDS"])
    search_net.ProxyEvaluator = SleepingEvaluator
    search_net.load_search_config = lambda args: None
    search_net.main(list(argv))


if __name__ == "__main__":
    main(*sys.argv[1:])
