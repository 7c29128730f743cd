"""``python -m d2kd.apps.certify CONFIG --seeds N`` (``tools/certify.py``): is a distillation's
gain real? (docs/certify.md)

    python -m d2kd.apps.certify configs/DigitsDet/retinanet_R18_from_R50_mgd.yaml --seeds 3 \\
        --splits digitsdet_test --teacher-seeds 3 [--num-gpus 8] [KEY VALUE ...]

Trains N seeds of the distilled student and of its matched control (the same student,
schedule, data and seeds, without distillation), optionally the teachers over seeds,
evaluates every run on every split and writes OUTPUT/certificate.{json,md,png}: per-seed APs,
the paired difference with its 95 % interval and a verdict (gain certified, no measurable
gain, loss), and the same against the teacher. Finished runs are reused; run it again after a
kill to go on. On a cluster, run the same command on every machine with ``--num-machines``,
``--machine-rank`` and ``--dist-url``: every run is a multi-machine ``train_net``; the
report is written by machine 0.
"""
import argparse
import logging
import os
import sys
import time
from typing import List, Optional, Sequence

from ...compat.weight_loading import summarize
from ...config import ConfigError, load_config
from ...config.loading import one_line
from ...config.validation import check_datasets
from ...engine.preflight import check_run
from ..launch.pretrain import ensure_pretrained_weights
from . import report
from .provenance import code_version, software_stack
from .runs import CertifyPlan, control_config, run_plan

logger = logging.getLogger("d2kd.apps.certify")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m d2kd.apps.certify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_file", help="a distillation config")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--splits", nargs="+", default=[],
                        help="datasets to evaluate on (default: the config's DATASETS.TEST)")
    parser.add_argument("--teacher-seeds", type=int, default=0,
                        help="also train each teacher config with seeds 0..K-1")
    parser.add_argument("--output", default="",
                        help="folder of the runs and the certificate (default "
                             "output/certify/<config name>)")
    parser.add_argument("--teacher-runs", nargs="+", default=[], metavar="DIR",
                        help="finished runs of the (first) teacher to evaluate as its seeds, "
                             "instead of training it (--teacher-seeds)")
    parser.add_argument("--shared", default="",
                        help="folder whose controls/ and teachers/ hold runs shared by content "
                             "between certificates (default: the folder above OUTPUT)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto")
    # trailing KEY VALUE overrides of every run: what the options above leave
    args, args.opts = parser.parse_known_args(argv)
    unknown = [a for a in args.opts if a.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _launch_args(args: argparse.Namespace) -> List[str]:
    return ["--num-gpus", str(args.num_gpus), "--num-machines", str(args.num_machines),
            "--machine-rank", str(args.machine_rank), "--dist-url", args.dist_url]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    output = args.output or os.path.join("output", "certify", name)
    try:
        if args.seeds < 1 or args.teacher_seeds < 0:
            raise ConfigError(f"--seeds must be >= 1 and --teacher-seeds >= 0, got {args.seeds} "
                              f"and {args.teacher_seeds}.")
        missing = [d for d in args.teacher_runs
                   if not os.path.isfile(os.path.join(d, "model_final.pth"))]
        if missing:
            raise ConfigError(f"--teacher-runs: no model_final.pth in {summarize(missing)}.")
        cfg = load_config(args.config_file, args.opts)
        control_config(cfg)  # a distillation config
        splits = args.splits or list(cfg.DATASETS.TEST)
        world_size = args.num_gpus * args.num_machines
        check_run(cfg, world_size=world_size,
                  before_weights=lambda: ensure_pretrained_weights(cfg.MODEL.WEIGHTS))
        check_datasets(splits)
        plan = CertifyPlan(args.config_file, list(args.opts), list(range(args.seeds)), splits,
                           output, list(range(args.teacher_seeds)), _launch_args(args),
                           args.threads, args.shared, list(args.teacher_runs))
        meta = {"config": args.config_file, "opts": list(args.opts), "seeds": plan.seeds,
                "teacher_seeds": plan.teacher_seeds, "code": code_version(),
                "software": software_stack(args.threads)}
    except Exception as e:  # bad input: one line before anything runs
        sys.exit(f"error: {one_line(e)}")
    paths = [os.path.join(output, f"certificate.{ext}") for ext in ("json", "md", "png")]
    start = time.time()

    def on_progress(arms, done: int, total: int) -> None:
        elapsed = time.time() - start
        logger.info("certify: %d/%d evaluations done, %.0f s elapsed, about %.0f s left", done,
                    total, elapsed, elapsed / done * (total - done))
        if args.machine_rank == 0:
            report.write(report.certificate(arms, splits, meta), *paths)

    arms = run_plan(plan, on_progress)
    cert = report.certificate(arms, splits, meta)
    if args.machine_rank == 0:
        report.write(cert, *paths)
        print(report.markdown(cert), end="")


if __name__ == "__main__":
    main()
