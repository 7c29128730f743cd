#!/usr/bin/env python
"""Train and evaluate detectors and distilled students, like detectron2's tools/train_net.py.

    python tools/train_net.py --config-file configs/DigitsDet/retinanet_R18_student.yaml
    python tools/train_net.py --config-file CFG --num-gpus 2 SOLVER.IMS_PER_BATCH 16
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth

Bad input (unknown config key, unregistered dataset, missing or mismatching weights, corrupt
annotations, bad head options, an unreadable checkpoint on --resume, ...) is reported in one
line before any process starts (d2kd/engine/preflight.py).
"""
import sys

import d2kd  # noqa: F401  (registers d2kd's backbones, meta-architectures and datasets)
from d2kd.compat.distributed import launch
from d2kd.config import ConfigError, load_config
from d2kd.engine import DistillTrainer
from d2kd.engine.preflight import check_run
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # d2kd's own messages (teachers, stages, prototype refreshes) in the console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2kd", abbrev_name="d2kd")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DistillTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return DistillTrainer.test(cfg, model)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_args(args) -> None:
    """Validate the config, the files it names and the model in the launching process."""
    check_run(load_config(args.config_file, args.opts), resume=args.resume)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    try:
        check_args(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
