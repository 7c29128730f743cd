"""What a DetKDS search writes to its output directory and its log.

``trials.csv`` / ``trials.md`` (one row per trial, rewritten after every trial), the progress
line of ``search.log``, and at the end ``best_genome.txt``, ``best_config.yaml``,
``best_so_far.png`` and ``summary.json``. Every table is built from the storage, so it lists
the trials of every worker and machine.
"""
import csv
import io
import json
import logging
import math
import os
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

from optuna.trial import FrozenTrial, TrialState

from ...config import load_config
from ...utils.io import atomic_write_json, atomic_write_text
from .report import best_so_far, markdown_cell, plot_best_so_far, session_overhead
from .samplers import GENERATION_KEY, SURPLUS, fitness
from .space import genome_inputs


class SearchState(Protocol):
    """What these writers read of a search (:class:`d2kd.apps.search.driver.DetKDSSearch`)."""

    arm: str
    output_dir: str
    session: str
    workers: int
    inputs: List[str]
    skipped: List[str]
    trials_per_input: int

    def stages(self) -> List[str]: ...

    def trials(self, stage: str) -> List[FrozenTrial]: ...

    def total_trials(self) -> Optional[int]: ...

    def baseline_ap(self) -> Optional[float]: ...

    def survivors(self) -> list: ...

    def best(self) -> Tuple[Optional[FrozenTrial], bool]: ...

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("study", "input", "number", "genome", "status", "ap", "seconds", "attempt",
               "generation", "completed")
#: statuses of trials that trained a candidate (their ``seconds`` are training time)
TRAINED = ("ok", "rejected", "pruned")


def trial_rows(search: SearchState) -> List[Dict]:
    """One row per trial of the search (queued and surplus trials left out), stage by stage: the
    ``CSV_COLUMNS`` plus the ``session`` that ran it."""
    rows = []
    for stage in search.stages():
        for t in search.trials(stage):
            if t.state == TrialState.WAITING or t.user_attrs.get("status") == SURPLUS:
                continue
            ap = fitness(t)
            genome = t.user_attrs.get("genome", "")
            rows.append({
                "study": stage, "input": genome_inputs(genome) if genome else "",
                "number": t.number, "genome": genome,
                "status": t.user_attrs.get("status", t.state.name.lower()),
                "ap": f"{ap:.3f}" if math.isfinite(ap) else "",
                "seconds": f"{t.user_attrs['seconds']:.3f}" if "seconds" in t.user_attrs else "",
                "attempt": t.user_attrs.get("attempt", 1),
                "generation": t.system_attrs.get(GENERATION_KEY, ""),
                "completed": t.datetime_complete.isoformat() if t.datetime_complete else "",
                "session": t.user_attrs.get("session", ""),
            })
    return rows


def write_tables(search: SearchState) -> None:
    """``trials.csv`` and ``trials.md`` (one row per trial), written atomically."""
    rows = trial_rows(search)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(search.output_dir, "trials.csv"), buffer.getvalue())
    columns = CSV_COLUMNS[:-1]
    lines = [f"# DetKDS search {search.arm}", "",
             "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown_cell(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(os.path.join(search.output_dir, "trials.md"), "\n".join(lines) + "\n")


def log_progress(search: SearchState) -> None:
    """Log trials done / planned, the mean time of a trained trial and the ETA."""
    rows = trial_rows(search)
    done = sum(r["status"] in TRAINED + ("cached",) for r in rows)
    times = [float(r["seconds"]) for r in rows if r["status"] in TRAINED and r["seconds"]]
    mean = sum(times) / len(times) if times else 0.0
    total = search.total_trials()
    planned = total or 1 + search.trials_per_input * len(search.inputs)
    eta = max(planned - done, 0) * mean / search.workers
    logger.info("[%s] %d/%s trials done, mean %.1f s per trained trial, ETA %.1f min%s "
                "(%d worker(s))", search.arm, done, total or f"{planned}+stage 2", mean,
                eta / 60, "" if total else " + stage 2", search.workers)


def best_config_yaml(config_file: str, opts: Sequence[str], genome: str, output_dir: str) -> str:
    """A config that trains ``genome`` with the full schedule of ``config_file``: the search
    config resolved, without the search's own keys (``DISTILL.DETKDS.SEARCH``, which
    tools/train_net.py does not know), so that it trains with tools/train_net.py as is."""
    cfg = load_config(config_file)
    cfg.DISTILL.DETKDS.pop("SEARCH")
    cfg.DISTILL.DETKDS.GENOME = genome
    cfg.OUTPUT_DIR = os.path.join(output_dir, "best_full_schedule")
    header = [f"# Written by tools/search_net.py: the best genome of the search in {output_dir}",
              f"# (the search config {os.path.abspath(config_file)}, resolved)."]
    if opts:
        header.append(f"# The search also had these overrides (not applied here): {' '.join(opts)}")
    return "\n".join(header) + "\n" + cfg.dump()


def idle_at_end_seconds(search: SearchState) -> float:
    """Worker-seconds of this session spent after a worker's last trial while other workers
    still trained: for each worker (host, pid), the time from the end of its last trial to
    the end of the session's last trial."""
    ends = {}
    for stage in search.stages():
        for t in search.trials(stage):
            if t.user_attrs.get("session") == search.session and t.datetime_complete:
                worker = (t.user_attrs.get("host"), t.user_attrs.get("pid"))
                ends[worker] = max(ends.get(worker, t.datetime_complete), t.datetime_complete)
    last = max(ends.values(), default=None)
    return sum((last - end).total_seconds() for end in ends.values())


def finalize(search: SearchState, config_file: str, opts: Sequence[str],
             session: Dict) -> Dict:
    """Write ``best_genome.txt``, ``best_config.yaml``, the tables, ``best_so_far.png`` and
    ``summary.json`` (with this session's wall time and trial times); returns the summary.

    ``session`` holds at least ``wall_seconds`` and ``workers`` of this run of the command."""
    output_dir = search.output_dir
    write_tables(search)
    best, beats = search.best()
    summary_path = os.path.join(output_dir, "summary.json")
    rows = trial_rows(search)
    trained = [r for r in rows if r["session"] == search.session and r["seconds"]
               and r["status"] in TRAINED]
    session = dict(session, trials=len(trained),
                   trial_seconds=sum(float(r["seconds"]) for r in trained))
    session["idle_at_end_seconds"] = idle_at_end_seconds(search)
    session.update(session_overhead([session]))
    previous = []
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            previous = json.load(f).get("sessions", [])
    summary = {
        "arm": search.arm, "config_file": os.path.abspath(config_file), "opts": list(opts),
        "inputs": search.inputs, "skipped_inputs": search.skipped,
        "trials_per_input": search.trials_per_input, "baseline_ap": search.baseline_ap(),
        "survivors": [str(f) for f in search.survivors()],
        "best_genome": best.user_attrs["genome"] if best else None,
        "best_ap": best.value if best else None, "beats_baseline": beats,
        "trials": {s: sum(r["study"] == s for r in rows) for s in search.stages()},
        "sessions": previous + [session],
    }
    if best is None:
        logger.error("[%s] no candidate finished with a finite AP; no best genome.", search.arm)
    else:
        genome = best.user_attrs["genome"]
        atomic_write_text(os.path.join(output_dir, "best_genome.txt"), genome + "\n")
        atomic_write_text(os.path.join(output_dir, "best_config.yaml"),
                          best_config_yaml(config_file, opts, genome, output_dir))
        if not beats:
            logger.warning("[%s] no knowledge input beat the baseline (%.2f AP); "
                           "best_genome.txt holds the best candidate anyway.", search.arm,
                           search.baseline_ap())
    plot_best_so_far({search.arm: best_so_far(rows)}, os.path.join(output_dir, "best_so_far.png"),
                     search.baseline_ap())
    atomic_write_json(summary_path, summary)
    return summary
