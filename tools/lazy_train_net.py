#!/usr/bin/env python
"""Train a LazyConfig recipe, like detectron2's tools/lazyconfig_train_net.py (the same as
``python -m d2kd.apps.launch.lazy_train_net``; see there and docs/lazyconfig.md).

    python tools/lazy_train_net.py --config-file configs/DigitsDet/retinanet_R18_from_R50_mgd.py
    python tools/lazy_train_net.py --config-file CFG.py --num-gpus 2 train.seed=1
"""
from d2kd.apps.launch.lazy_train_net import cli

if __name__ == "__main__":
    cli()
