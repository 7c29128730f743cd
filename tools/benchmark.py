#!/usr/bin/env python
"""Benchmarks that write machine-readable results (JSON) and a readable table (markdown).

    # box AP of configs over seeds (each run a tools/train_net.py process; resumable)
    python tools/benchmark.py accuracy --configs A.yaml B.yaml --seeds 0 1 \
        --output output/bench/recipes --json RESULTS.json --markdown RESULTS.md [--plot AP.png] \
        [KEY VALUE ...]

    # per-step cost of distillation vs student alone + teacher forward (JSON)
    python tools/benchmark.py overhead --config-file CFG --json OUT [--iters N] [--random-teacher]

    # one table (JSON + markdown) from several overhead result files
    python tools/benchmark.py overhead-summary --inputs A.json B.json --json OUT --markdown OUT

    # every loss of each config's model on one batch before training (KD vs detection scale)
    python tools/benchmark.py loss-scale --configs A.yaml B.yaml --json OUT --markdown OUT

    # PGM prototype selection: vectorised rule vs brute-force objective (JSON + markdown)
    python tools/benchmark.py pgm --json OUT --markdown OUT [--n 4000 --d 256 --k 10]

    # wall time of a run: measured (whole schedule) or projected from --iters iterations
    python tools/benchmark.py run-time --configs A.yaml B.yaml --iters 50 --json OUT --markdown OUT

    # peak memory of one prototype refresh for several index sizes (fresh process each)
    python tools/benchmark.py refresh-memory --config-file GK.yaml --sizes 100 1000 10000 \
        --json OUT --markdown OUT [--plot OUT.png]

    # start-up cost of --resume at iteration 10 vs 100,000 (fresh process each)
    python tools/benchmark.py resume-startup --config-file CFG --iters 10 100000 \
        --json OUT --markdown OUT [--plot OUT.png]

    # two training steps of every COCO distillation config at COCO resolution (DigitsDet data,
    # random model-zoo-format teachers; fresh process each): step/refresh time, peak RSS
    python tools/benchmark.py coco-runs --json OUT --markdown OUT [--device cuda] [--configs ...]

    # DetKDS proxy fidelity: one proxy trial and the full schedule over seeds per genome,
    # Kendall's tau between the two APs (JSON + markdown + scatter PNG; resumable)
    python tools/benchmark.py proxy-fidelity --search-config SEARCH.yaml --config-file CFG.yaml \
        --genomes G1 G2 ... --seeds 0 1 --output DIR --json OUT --markdown OUT [--plot OUT.png]
    # ... the same full-schedule runs against a variant of the proxy (overrides come last)
    python tools/benchmark.py proxy-fidelity ... --genomes G1 G2 ... --json OUT --markdown OUT \
        --proxy-variant val300 DISTILL.DETKDS.SEARCH.VAL_IMAGES 300
    # ... with the full-schedule APs of an earlier result (nothing but the proxy trials runs)
    python tools/benchmark.py proxy-fidelity ... --full-schedule-from EARLIER.json \
        --proxy-variant iters200 DISTILL.DETKDS.SEARCH.PROXY_ITERS 200

    # does a comparison's ranking hold on another dataset? two accuracy results with the same
    # rows: APs, ranks, gains over a baseline row, Kendall tau, pairs that hold / flip
    python tools/benchmark.py ranking --inputs DigitsDet=A.json DigitsDetHard=B.json \
        --baseline retinanet_R18_student --json OUT --markdown OUT [--plot OUT.png] \
        [--methods ROW ROW ROW ...]   # also Kendall tau among these rows

    # summarise finished train_net output directories (config, overrides, AP, step time)
    python tools/benchmark.py collect --runs out/a out/b --json RUNS.json --markdown RUNS.md
"""
import argparse
import logging
import os
import sys
from typing import Tuple

import d2kd  # noqa: F401
from d2kd.benchmark.accuracy import collect_runs, run_accuracy_benchmark
from d2kd.benchmark.coco_runs import run_coco_runs_benchmark
from d2kd.benchmark.loss_scale import run_loss_scale_probe
from d2kd.benchmark.overhead import run_overhead_benchmark, summarize_overhead
from d2kd.benchmark.pgm import run_pgm_benchmark
from d2kd.benchmark.proxy_fidelity import proxy_trials_dir, run_proxy_fidelity_benchmark
from d2kd.benchmark.ranking import run_ranking_comparison
from d2kd.benchmark.refresh_memory import run_refresh_memory_benchmark
from d2kd.benchmark.resume_startup import run_resume_startup_benchmark
from d2kd.benchmark.run_time import run_time_benchmark


def _reference(text: str) -> Tuple[str, float]:
    """``LABEL=AP`` of ``--reference`` as (label, AP)."""
    label, _, ap = text.rpartition("=")
    try:
        if label:
            return label, float(ap)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=AP (e.g. 'R-50/2 teacher=42.92')")


def _labelled_path(text: str) -> Tuple[str, str]:
    """``LABEL=PATH`` of ``ranking --inputs`` as (label, path)."""
    label, _, path = text.partition("=")
    if label and path:
        return label, path
    raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=JSON (e.g. "
                                     "'DigitsDetHard=benchmarks/digitsdet_hard/headline.json')")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="train + evaluate configs over seeds")
    acc.add_argument("--configs", nargs="+", required=True)
    acc.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    acc.add_argument("--output", required=True, help="parent of the runs' OUTPUT_DIRs")
    acc.add_argument("--json", required=True)
    acc.add_argument("--markdown", required=True)
    acc.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    acc.add_argument("--tag", default="", help="variant name for runs with overrides (ablations)")
    acc.add_argument("--finished-only", action="store_true",
                     help="tabulate finished runs only; train nothing")
    acc.add_argument("--plot", default="", help="also write the table as a PNG chart")
    acc.add_argument("--reference", type=_reference, action="append", default=[],
                     metavar="LABEL=AP", help="a dashed line on the chart at that box AP, e.g. "
                     "'R-50/2 teacher=42.92'; repeatable")
    acc.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    ovh = sub.add_parser("overhead", help="distillation step vs student step + teacher forward")
    ovh.add_argument("--config-file", required=True)
    ovh.add_argument("--json", required=True)
    ovh.add_argument("--iters", type=int, default=20)
    ovh.add_argument("--warmup", type=int, default=3)
    ovh.add_argument("--random-teacher", action="store_true",
                     help="use untrained teacher weights (step times do not depend on them)")
    ovh.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    ovs = sub.add_parser("overhead-summary", help="tabulate overhead result files")
    ovs.add_argument("--inputs", nargs="+", required=True)
    ovs.add_argument("--json", required=True)
    ovs.add_argument("--markdown", required=True)
    scl = sub.add_parser("loss-scale", help="initial losses of configs on one batch")
    scl.add_argument("--configs", nargs="+", required=True)
    scl.add_argument("--json", required=True)
    scl.add_argument("--markdown", required=True)
    pgm = sub.add_parser("pgm", help="PGM selection time vs brute-force objective evaluation")
    pgm.add_argument("--json", required=True)
    pgm.add_argument("--markdown", required=True)
    pgm.add_argument("--n", type=int, default=4000)
    pgm.add_argument("--d", type=int, default=256)
    pgm.add_argument("--k", type=int, default=10)
    rtm = sub.add_parser("run-time",
                         help="wall time of a run: measured, or projected from a short run")
    rtm.add_argument("--configs", nargs="+", required=True)
    rtm.add_argument("--json", required=True)
    rtm.add_argument("--markdown", required=True)
    rtm.add_argument("--iters", type=int, default=None,
                     help="run this many iterations and project the schedule (default: run it all)")
    rtm.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    rtm.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    mem = sub.add_parser("refresh-memory", help="peak RSS of one prototype refresh vs index size")
    mem.add_argument("--config-file", required=True, help="a global-knowledge distillation config")
    mem.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    mem.add_argument("--json", required=True)
    mem.add_argument("--markdown", required=True)
    mem.add_argument("--plot", default="")
    mem.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    rsm = sub.add_parser("resume-startup", help="--resume start-up vs the iteration resumed at")
    rsm.add_argument("--config-file", required=True)
    rsm.add_argument("--iters", nargs="+", type=int, default=[10, 100000])
    rsm.add_argument("--json", required=True)
    rsm.add_argument("--markdown", required=True)
    rsm.add_argument("--plot", default="")
    rsm.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    coco = sub.add_parser("coco-runs", help="two steps of every COCO distillation config")
    coco.add_argument("--configs", nargs="*", default=[], help="files or folders (configs/COCO)")
    coco.add_argument("--json", required=True)
    coco.add_argument("--markdown", required=True)
    coco.add_argument("--work-dir", default="output/bench/coco_runs", help="runs' directories")
    coco.add_argument("--device", default="cpu", help="MODEL.DEVICE of every run")
    coco.add_argument("--ims-per-batch", type=int, default=2)
    coco.add_argument("--iters", type=int, default=2)
    coco.add_argument("--max-images-per-class", type=int, default=2)
    coco.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    coco.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    coco.add_argument("--include-plain", action="store_true", help="also train teachers/students")
    coco.add_argument("--rerun", action="store_true", help="repeat configs already ok in --json")
    coco.add_argument("--keep-files", action="store_true", help="keep teachers and checkpoints")
    coco.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    fid = sub.add_parser("proxy-fidelity", help="DetKDS proxy AP vs full-schedule AP, Kendall tau")
    fid.add_argument("--search-config", required=True, help="the search config (its proxy)")
    fid.add_argument("--config-file", required=True, help="the full-schedule distillation config")
    fid.add_argument("--genomes", nargs="+", required=True)
    fid.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    fid.add_argument("--output", required=True, help="parent of the trials' and runs' folders")
    fid.add_argument("--json", required=True)
    fid.add_argument("--markdown", required=True)
    fid.add_argument("--plot", default="", help="also a scatter plot (PNG)")
    fid.add_argument("--threads", type=int, default=1, help="torch threads per trial / run")
    fid.add_argument("--proxy-variant", default="",
                     help="name of a proxy variant given by trailing KEY VALUE overrides")
    fid.add_argument("--full-schedule-from", action="append", default=[], metavar="JSON",
                     help="an earlier proxy-fidelity result (repeatable): its genomes' "
                          "full-schedule APs are reused instead of trained again")
    fid.add_argument("opts", nargs=argparse.REMAINDER,
                     help="KEY VALUE overrides of the search config's proxy (a variant)")
    rnk = sub.add_parser("ranking", help="does a ranking hold on another dataset (two results)")
    rnk.add_argument("--inputs", nargs=2, type=_labelled_path, required=True,
                     metavar="LABEL=JSON", help="two accuracy results with the same rows")
    rnk.add_argument("--baseline", required=True, help="the row gains are measured from")
    rnk.add_argument("--json", required=True)
    rnk.add_argument("--markdown", required=True)
    rnk.add_argument("--plot", default="", help="also a slope chart of the gains (PNG)")
    rnk.add_argument("--methods", nargs="+", default=[],
                     help="rows whose ranking among themselves is also reported (Kendall tau), "
                          "e.g. the distillation methods without the baseline")
    col = sub.add_parser("collect", help="summarise finished tools/train_net.py runs")
    col.add_argument("--runs", nargs="+", required=True, help="OUTPUT_DIRs of finished runs")
    col.add_argument("--json", required=True)
    col.add_argument("--markdown", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    if args.command == "accuracy":
        run_accuracy_benchmark(args.configs, args.seeds, args.output, args.json, args.markdown,
                               args.opts, threads=args.threads, tag=args.tag,
                               finished_only=args.finished_only, plot_path=args.plot,
                               references=args.reference)
    elif args.command == "overhead":
        result = run_overhead_benchmark(args.config_file, args.json, args.iters, args.warmup,
                                        args.opts, args.random_teacher)
        logging.getLogger("d2kd.benchmark").info("%s", result)
    elif args.command == "overhead-summary":
        summarize_overhead(args.inputs, args.json, args.markdown)
    elif args.command == "loss-scale":
        run_loss_scale_probe(args.configs, args.json, args.markdown)
    elif args.command == "pgm":
        result = run_pgm_benchmark(args.json, args.markdown, args.n, args.d, args.k)
        logging.getLogger("d2kd.benchmark").info("%s", result)
    elif args.command == "run-time":
        run_time_benchmark(args.configs, args.json, args.markdown, args.iters, args.threads,
                           args.opts)
    elif args.command == "refresh-memory":
        run_refresh_memory_benchmark(args.config_file, args.sizes, args.json, args.markdown,
                                     args.plot, args.opts)
    elif args.command == "resume-startup":
        run_resume_startup_benchmark(args.config_file, args.iters, args.json, args.markdown,
                                     args.plot, args.opts)
    elif args.command == "coco-runs":
        run_coco_runs_benchmark(args.configs, args.json, args.markdown, args.work_dir,
                                args.device, args.ims_per_batch, args.iters,
                                args.max_images_per_class, args.threads, args.include_plain,
                                args.rerun, args.timeout, args.keep_files, args.opts)
    elif args.command == "proxy-fidelity":
        try:  # checked before anything runs
            proxy_trials_dir(args.output, args.opts, args.proxy_variant)
        except ValueError as e:
            parser.error(str(e))
        missing = [p for p in args.full_schedule_from if not os.path.isfile(p)]
        if missing:
            parser.error(f"--full-schedule-from: no such file {missing[0]} (give the JSON a "
                         "proxy-fidelity benchmark wrote).")
        result = run_proxy_fidelity_benchmark(
            args.search_config, args.config_file, args.genomes, args.seeds, args.output,
            args.json, args.markdown, args.plot, args.threads, args.opts, args.proxy_variant,
            args.full_schedule_from)
        logging.getLogger("d2kd.benchmark").info("%s", result)
    elif args.command == "ranking":
        try:  # bad input is found before anything is written
            run_ranking_comparison(args.inputs, args.baseline, args.json, args.markdown,
                                   args.plot, args.methods)
        except ValueError as e:
            parser.error(str(e))
    elif args.command == "collect":
        collect_runs(args.runs, args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
