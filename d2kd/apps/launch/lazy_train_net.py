"""Train a distillation (or any detector) written as a LazyConfig ``.py`` recipe, like
detectron2's tools/lazyconfig_train_net.py.

    python -m d2kd.apps.launch.lazy_train_net \
        --config-file configs/DigitsDet/retinanet_R18_from_R50_mgd.py \
        [--num-gpus 2] [--resume] [train.seed=1 train.output_dir=... ...]

The recipe provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys, plus ``train.seed``).
A fresh run initialises the student from ``train.init_checkpoint`` (plain detector keys, e.g.
``digitsdet-pretrained://R18_FPN64``, pre-trained here first when missing); ``--resume``
continues from ``last_checkpoint``. At the end the student alone is written to
``model_final_student.pth`` and the final evaluation to ``inference/results.json``.

What the yacs path has and this one does not (docs/lazyconfig.md): teacher schedules (MTPD),
the prototype refresh of global-knowledge heads, and the iteration-addressed data stream that
makes ``--resume`` bit-exact — a LazyConfig recipe uses detectron2's own loaders and resumes
from the checkpoint's iteration with a fresh data order.
"""
import logging
import os
from typing import Optional, Sequence

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ...compat.cpu_distributed import create_ddp_model
from ...config import ConfigError
from ...engine.checkpoint import AtomicCheckpointer
from ...engine.export import StudentExportHook, save_student
from ...utils.io import atomic_write_json
from .entry import run_cli
from .pretrain import ensure_pretrained_weights

logger = logging.getLogger("d2kd.apps.launch.lazy_train_net")


def do_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test``; writes ``inference/results.json``."""
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                   instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
        atomic_write_json(os.path.join(cfg.train.output_dir, "inference", "results.json"),
                          results)
    return results


class LazyStudentExportHook(StudentExportHook):
    """:class:`StudentExportHook` for a LazyConfig run: the student's weights only (its
    architecture is the recipe's ``model.student``)."""

    def after_train(self) -> None:
        if self.trainer.iter < self.trainer.max_iter or not comm.is_main_process():
            return
        save_student(self.trainer.model, self.output_path, self.trainer.iter)


def do_train(args, cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader,
                                                                       optimizer)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        LazyStudentExportHook(os.path.join(cfg.train.output_dir, "model_final_student.pth")),
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    if args.resume and checkpointer.has_checkpoint():
        start_iter = checkpointer.resume_or_load("", resume=True).get("iteration", -1) + 1
    else:
        start_iter = 0
        distillation = getattr(model, "module", model)
        if cfg.train.init_checkpoint:
            distillation.initialize(cfg.train.init_checkpoint, init_from_teacher=False)
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="d2kd",
                 abbrev_name="d2kd")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        AtomicCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


def prepare_run(args) -> None:
    """In the launching process: the recipe loads and names ``train.output_dir``; a
    DigitsDet backbone it initialises from is pre-trained once."""
    try:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    except Exception as e:  # arbitrary user code: one line naming the file
        raise ConfigError(f"LazyConfig {args.config_file} cannot be loaded: "
                          f"{type(e).__name__}: {e}") from None
    if not cfg.train.get("output_dir"):
        raise ConfigError(f"{args.config_file}: train.output_dir is empty; set it in the "
                          "recipe or as train.output_dir=... on the command line.")
    ensure_pretrained_weights(cfg.train.get("init_checkpoint", ""), "train.init_checkpoint")


def cli(argv: Optional[Sequence[str]] = None) -> None:
    run_cli(main, prepare_run, argv)

if __name__ == "__main__":
    cli()
