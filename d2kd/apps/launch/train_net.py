"""Train and evaluate detectors and distilled students, like detectron2's tools/train_net.py.

    python -m d2kd.apps.launch.train_net --config-file CFG [--num-gpus 2] [KEY VALUE ...]
    python tools/train_net.py --config-file configs/DigitsDet/retinanet_R18_student.yaml

Before any process starts, in the launching process: bad input (unknown config key,
unregistered or empty dataset, missing or mismatching weights, corrupt annotations, bad head
options, an unreadable checkpoint on --resume, ...) is reported in one line
(d2kd/engine/preflight.py); the DigitsDet backbones the config names are pre-trained if not
cached yet (:mod:`d2kd.apps.launch.pretrain`) after the rest of the config passed, before its
weights are checked.
"""
from typing import Optional, Sequence

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ...config import load_config
from ...engine import DistillTrainer
from ...engine.checkpoint import resume_checkpoint
from ...engine.preflight import check_run, evaluated_config
from ...modeling import load_for_evaluation
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
    """One training (or evaluation) process: what ``launch`` runs on every rank.

    ``--eval-only`` evaluates the deployed detector (a distillation config: its student
    alone, no teacher is built) with every tensor loaded from ``MODEL.WEIGHTS`` (with
    ``--resume``: from the run's last training checkpoint)."""
    cfg = setup(args)
    if args.eval_only:
        model = DistillTrainer.build_model(evaluated_config(cfg))
        weights = resume_checkpoint(cfg.OUTPUT_DIR) if args.resume else None
        load_for_evaluation(model, weights or cfg.MODEL.WEIGHTS)
        return DistillTrainer.test(cfg, model)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def prepare_run(args) -> None:
    """In the launching process: check the config, the files it names, the model and the
    weights it loads, then pre-train the DigitsDet backbones the config names
    (:class:`ConfigError` on bad input, before anything trains)."""
    cfg = load_config(args.config_file, args.opts)
    check_run(cfg, resume=args.resume, eval_only=args.eval_only,
              before_weights=lambda: ensure_pretrained_weights(cfg.MODEL.WEIGHTS),
              world_size=args.num_gpus * args.num_machines)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(main, prepare_run, argv)

if __name__ == "__main__":
    cli()
