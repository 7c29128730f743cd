#!/usr/bin/env python
"""Train and evaluate detectors and distilled students, like detectron2's tools/train_net.py.

    python tools/train_net.py --config-file configs/DigitsDet/retinanet_R18_student.yaml
    python tools/train_net.py --config-file CFG --num-gpus 2 SOLVER.IMS_PER_BATCH 16
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth

The same as ``python -m d2kd.apps.launch.train_net`` (an installed d2kd has no tools/ folder).
Bad input (unknown config key, unregistered dataset, missing or mismatching weights, corrupt
annotations, bad head options, an unreadable checkpoint on --resume, ...) is reported in one
line before any process starts (d2kd/engine/preflight.py).
"""
from d2kd.apps.launch.train_net import cli

if __name__ == "__main__":
    cli()
