#!/usr/bin/env python
"""Random (untrained) teachers for the distillation runs of tools/gpu_check.sh.

The runs check that distillation trains on the device (losses, AMP, stage switches, prototype
refresh, evaluation), which does not need trained teachers: one randomly initialised
checkpoint per teacher of each config (``dev.benchmark.random_teachers``), built on the CPU.

    python tools/gpu_check/teachers.py --out DIR --json OUT.json CONFIG [CONFIG ...]

writes ``DIR/<config name>/teacher<i>.pth`` and ``OUT.json``: ``{config: [paths]}``, each
list ready for ``DISTILL.TEACHER.WEIGHTS``.
"""
import argparse
import json
import os
import sys

import d2kd  # noqa: F401  (registrations)
from d2kd.config import load_config

# the benchmark tooling lives in the checkout (dev/), two folders up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dev.benchmark.random_teachers import save_random_teachers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    result = {}
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0]
        directory = os.path.join(args.out, name)
        os.makedirs(directory, exist_ok=True)
        cfg = load_config(config, ["MODEL.DEVICE", "cpu"])
        result[config] = [os.path.abspath(p) for p in save_random_teachers(cfg, directory)]
        print(f"{config}: {result[config]}", flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
