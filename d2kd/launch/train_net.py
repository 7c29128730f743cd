"""Train and evaluate detectors and distilled students, like detectron2's tools/train_net.py.

    python -m d2kd.launch.train_net --config-file CFG [--num-gpus 2] [KEY VALUE ...]
    python tools/train_net.py --config-file configs/DigitsDet/retinanet_R18_student.yaml

Before any process starts, in the launching process: the DigitsDet backbones the config names
are pre-trained if not cached yet (:mod:`d2kd.launch.pretrain`), then bad input (unknown config
key, unregistered dataset, missing or mismatching weights, corrupt annotations, bad head
options, an unreadable checkpoint on --resume, ...) is reported in one line
(d2kd/engine/preflight.py).
"""
from typing import Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..engine import DistillTrainer
from ..engine.preflight import check_run
from .entry import run_cli
from .pretrain import ensure_pretrained_weights


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # d2kd's own messages (teachers, stages, prototype refreshes) in the console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2kd", abbrev_name="d2kd")
    return cfg


def main(args):
    """One training (or evaluation) process: what ``launch`` runs on every rank."""
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


def prepare_run(args) -> None:
    """In the launching process: pre-train the DigitsDet backbones the config names, then
    check the config, the files it names and the model (:class:`ConfigError` on bad input)."""
    cfg = load_config(args.config_file, args.opts)
    ensure_pretrained_weights(cfg.MODEL.WEIGHTS)
    check_run(cfg, resume=args.resume)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(main, prepare_run, argv)

if __name__ == "__main__":
    cli()
