#!/usr/bin/env python
"""DetKDS: search a distiller (genome) for a teacher-student pair (docs/detkds_search.md).

    python tools/search_net.py --config-file configs/DigitsDet/retinanet_R18_from_R50_detkds.yaml \\
        --output output/detkds_search/ga-seed0 --workers 2 --trials 20 --sampler ga --seed 0
    python tools/search_net.py --compare output/detkds_search/ga-seed0 \\
        output/detkds_search/random-seed0 --plot output/detkds_search/ga_vs_random.png
    # the proxy's starting checkpoint (PROXY_WEIGHTS), trained without the held-out images
    python tools/search_net.py --config-file SEARCH.yaml --train-proxy-start STUDENT.yaml \\
        DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS output/<run>/model_0000199.pth

Re-running the same command resumes (finished trials are kept, a trial killed mid-way is
trained again). ``--storage sqlite:///...`` / ``postgresql://...`` lets the same command on
other machines join the search. Trailing ``KEY VALUE`` pairs override the config, as in
tools/train_net.py. Writes DIR/trials.csv, trials.md, best_genome.txt, best_config.yaml,
best_so_far.png and summary.json (with wall time and summed trial time per session).
"""
import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
import uuid

import optuna
from detectron2.utils.logger import setup_logger

import d2kd  # noqa: F401  (registrations)
from d2kd.apps.launch.pretrain import ensure_pretrained_weights
from d2kd.apps.search.driver import DetKDSSearch
from d2kd.apps.search.outputs import finalize
from d2kd.apps.search.proxy import ProxyEvaluator, die_with_parent, proxy_config
from d2kd.apps.search.proxy_start import train_proxy_start
from d2kd.apps.search.report import compare, full_schedule_aps
from d2kd.apps.search.space import BASELINE
from d2kd.apps.search.storage import (
    SearchInUse,
    journal_path,
    lock_output,
    open_storage,
    repair_journal,
)
from d2kd.config import ConfigError, load_config
from d2kd.config.validation import check_weights
from d2kd.engine.preflight import check_run
from d2kd.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger("d2kd.apps.search")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", help="a DetKDS distillation config (DetKDSHead)")
    parser.add_argument("--output", help="output directory (also holds the default storage)")
    parser.add_argument("--storage", default="",
                        help="Optuna storage: an SQL URL or a journal file (default "
                             "OUTPUT/journal.log)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine, one trial at a time each")
    parser.add_argument("--trials", type=int, default=0,
                        help="stage-1 trials per knowledge input (default "
                             "DISTILL.DETKDS.SEARCH.TRIALS_PER_INPUT)")
    parser.add_argument("--sampler", choices=("ga", "random"), default="ga")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="instead of searching: plot the best-so-far AP of these searches")
    parser.add_argument("--plot", default="best_so_far_comparison.png",
                        help="output PNG of --compare")
    parser.add_argument("--full-schedule", nargs="+", metavar="JSON", default=[],
                        help="with --compare: proxy-fidelity results (tools/benchmark.py "
                             "proxy-fidelity --json) holding the winners' full-schedule APs")
    parser.add_argument("--train-proxy-start", metavar="STUDENT.yaml",
                        help="instead of searching: train the proxy's starting checkpoint "
                             "(DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS) with this student config on "
                             "the training images the proxy does not validate on")
    parser.add_argument("--json", help="also write the --compare table as JSON to this path")
    parser.add_argument("--markdown", help="also write the --compare table to this path")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.train_proxy_start and not args.config_file:
        parser.error("--train-proxy-start needs --config-file (the search config).")
    if not (args.compare or args.train_proxy_start) and not (args.config_file and args.output):
        parser.error("--config-file and --output are required (or use --compare DIR ...).")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}.")
    return args


def load_search_config(args):
    """The config, checked before any worker starts (bad input: ConfigError / ValueError)."""
    cfg = load_config(args.config_file, args.opts)
    # a DigitsDet backbone is pre-trained once, here, after the rest of the config passed
    check_run(cfg, before_weights=lambda: ensure_pretrained_weights(cfg.MODEL.WEIGHTS))
    check_weights(cfg.DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS, "DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS")
    proxy_config(cfg, BASELINE, args.output)  # the proxy's own requirements
    return cfg


def trial_threads(workers: int) -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // workers)


def build_search(args, session: str) -> DetKDSSearch:
    cfg = load_config(args.config_file, args.opts)
    trials = args.trials or cfg.DISTILL.DETKDS.SEARCH.TRIALS_PER_INPUT
    evaluator = ProxyEvaluator(args.config_file, args.opts, trial_threads(args.workers))
    return DetKDSSearch(cfg, open_storage(args.storage, args.output), args.output, args.sampler,
                        args.seed, trials, evaluator, workers=args.workers, session=session)


def setup_logging(output: str) -> None:
    setup_logger(os.path.join(output, "search.log"), name="d2kd", abbrev_name="d2kd")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver logs the progress


def worker_main(args, session: str) -> None:
    """Entry point of a worker process (``--workers N`` > 1)."""
    die_with_parent()
    setup_logging(args.output)
    build_search(args, session).run_worker()


def run_workers(args, session: str) -> list:
    """``--workers`` processes (each on its own GPU when GPUs exist); waits for all and
    returns the names of those that failed."""
    import torch

    gpus = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    processes = []
    for index in range(args.workers):
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        process = ctx.Process(target=worker_main, args=(args, session), name=f"worker{index}")
        process.start()
        processes.append(process)
    for process in processes:
        process.join()
    return [p.name for p in processes if p.exitcode != 0]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        table, results = compare(args.compare, args.plot, full_schedule_aps(args.full_schedule))
        print(table, end="")
        if args.json:
            atomic_write_json(args.json, results)
        if args.markdown:
            atomic_write_text(args.markdown, table)
        return
    if args.train_proxy_start:
        try:
            weights = train_proxy_start(args.config_file, args.opts, args.train_proxy_start)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        print(f"The proxy's starting checkpoint: {weights}")
        return
    try:
        load_search_config(args)
        lock = lock_output(args.output)  # noqa: F841  (held until the process ends)
    except (ConfigError, ValueError, SearchInUse) as e:
        sys.exit(f"error: {e}")
    setup_logging(args.output)
    journal = journal_path(args.storage, args.output)
    if journal:
        repair_journal(journal)  # before any worker writes to it
    session, start = uuid.uuid4().hex[:12], time.time()
    search = build_search(args, session)
    if search.skipped:
        logger.info("Skipping knowledge inputs the student cannot use: %s", search.skipped)
    logger.info("[%s] searching %s, %d trials per input, %d worker(s); storage %s", search.arm,
                search.inputs, search.trials_per_input, args.workers,
                args.storage or os.path.join(args.output, "journal.log"))
    if args.workers == 1:
        search.run_worker()
    else:
        failed = run_workers(args, session)
        if failed and search.next_task() != "done":
            sys.exit(f"error: {', '.join(failed)} failed (see {args.output}/search.log); re-run "
                     "the same command to resume.")
        if failed:
            logger.warning("%s failed; the other workers finished the search.", ", ".join(failed))
    summary = finalize(search, args.config_file, args.opts, {
        "session": session, "started": start, "wall_seconds": time.time() - start,
        "workers": args.workers})
    logger.info("[%s] best genome %s (%s AP, baseline %s): %s/best_config.yaml", search.arm,
                summary["best_genome"], summary["best_ap"], summary["baseline_ap"], args.output)


if __name__ == "__main__":
    main()
