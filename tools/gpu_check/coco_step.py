#!/usr/bin/env python
"""Print the command of tools/gpu_check.sh's COCO step, or exit 1 if there is none.

The COCO 2-iteration benchmark is ``tools/benchmark.py coco-runs`` (every distillation config
of configs/COCO, two steps each at COCO resolution on DigitsDet images, random teachers in
model-zoo format). This looks for that sub-command and its ``--device`` option in the
checkout's tools/benchmark.py, so that the GPU check runs it where it exists and records the
step as skipped where it does not.

    coco_step.py PYTHON DEVICE LOGS      (env COCO_CONFIGS: config files, space-separated)
"""
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    python, device, logs = sys.argv[1:4]
    work = os.path.join(os.path.dirname(logs), "coco_runs")
    benchmark = os.path.join(REPO, "tools", "benchmark.py")

    def help_text(*args):
        res = subprocess.run([python, benchmark, *args, "-h"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        return res.stdout + res.stderr

    if "coco-runs" not in help_text():
        sys.exit("tools/benchmark.py has no coco-runs sub-command")
    sub = help_text("coco-runs")
    if "--device" not in sub:
        sys.exit("tools/benchmark.py coco-runs has no --device option")
    cmd = [python, benchmark, "coco-runs", "--device", device,
           "--json", os.path.join(logs, "coco_2iter.json"),
           "--markdown", os.path.join(logs, "coco_2iter.md")]
    if "--work-dir" in sub:
        cmd += ["--work-dir", work]
    if "--timeout" in sub:
        cmd += ["--timeout", "150" if device == "cuda" else "1200"]
    configs = os.getenv("COCO_CONFIGS", "")
    if not configs and device != "cuda":  # the CPU dry run: one config
        configs = "configs/COCO/retinanet_R50_from_R101_gk.yaml"
    if not configs:  # every distillation config, the most informative first (the step may
        # be cut at its time limit; the JSON is rewritten after every config)
        names = sorted(n for n in os.listdir(os.path.join(REPO, "configs", "COCO"))
                       if "_from_" in n and n.endswith(".yaml"))
        groups = [[n for n in names if next((i for i, k in enumerate(("mtpd", "_gk", "zoo"))
                                             if k in n), 3) == g] for g in range(4)]
        ordered = [g[i] for i in range(len(names)) for g in groups if i < len(g)]  # round robin
        configs = " ".join("configs/COCO/" + n for n in ordered)
    if configs and "--configs" in sub:
        cmd += ["--configs", *configs.split()]
    print(" ".join(shlex.quote(c) for c in cmd))


if __name__ == "__main__":
    main()
