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

    # throughput over processes / machine ranks on this host (training), and over search
    # workers on a throw-away PostgreSQL server (the search); JSON + markdown + PNG each
    python tools/benchmark.py scaling-training --config-file CFG --json OUT --markdown OUT \
        --plot OUT.png [--iters 60 --cores 2]
    python tools/benchmark.py scaling-search --config-file SEARCH.yaml --json OUT \
        --markdown OUT --plot OUT.png [--trials 6 --workers 1 2 3]

    # summarise finished train_net output directories (config, overrides, AP, step time)
    python tools/benchmark.py collect --runs out/a out/b --json RUNS.json --markdown RUNS.md
"""
import argparse
import logging
import os
import sys

# experiment tooling lives in the checkout (dev/), next to this script, not in the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dev.benchmark import (  # noqa: E402
    accuracy,
    coco_runs,
    loss_scale,
    overhead,
    pgm,
    proxy_fidelity,
    ranking,
    refresh_memory,
    resume_startup,
    run_time,
    scaling,
)

#: the sub-command modules, each adding its own sub-commands (``add_command``)
COMMANDS = (accuracy, overhead, loss_scale, pgm, run_time, refresh_memory, resume_startup,
            coco_runs, proxy_fidelity, ranking, scaling)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_command(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
