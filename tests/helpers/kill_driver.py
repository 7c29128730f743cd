"""Train a config in this process and SIGKILL it at a chosen point (used by
tests/engine/test_resume.py).

    python tests/helpers/kill_driver.py CONFIG.yaml DATASET_ROOT {fresh,resume} [KILL_POINT]

KILL_POINT: ``step:N`` (before step N), ``refresh:N`` (inside the N-th prototype refresh,
after feature extraction), ``switch:N`` (inside the N-th teacher-schedule stage switch, after
the new teacher was built), ``save:N`` (after the N-th checkpoint file was half written).
"""
import os
import signal
import sys

from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from d2kd.config import load_config
from d2kd.data import register_digitsdet
from d2kd.engine import DistillTrainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(owner, name: str, n: int, before: bool = False) -> None:
    """Kill the process in the ``n``-th call of ``owner.name`` (after it ran, or before)."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if before and len(calls) == n:
            _die()
        result = original(*args, **kwargs)
        if len(calls) == n:
            _die()
        return result

    setattr(owner, name, wrapper)


class _KillBeforeStep(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            _die()


def main(config_file: str, dataset_root: str, mode: str, kill_point: str = "") -> None:
    register_digitsdet(dataset_root, name_prefix="digitsdet_tiny")
    cfg = load_config(config_file)
    seed_all_rng(cfg.SEED)  # as default_setup does in tools/train_net.py
    trainer = DistillTrainer(cfg)
    kind, _, number = kill_point.partition(":")
    if kind == "step":
        trainer.register_hooks([_KillBeforeStep(int(number))])
    elif kind == "refresh":
        from d2kd.prototypes.refresh import PrototypeRefresher

        _kill_on_call(PrototypeRefresher, "_extract", int(number))
    elif kind == "switch":
        from d2kd.modeling.distillation_detector import DistillationDetector

        _kill_on_call(DistillationDetector, "activate", int(number))
    elif kind == "save":
        import torch

        def half_written(obj, f, *args, **kwargs):  # a torn checkpoint, then the kill
            if isinstance(f, (str, os.PathLike)):
                f = open(f, "wb")
            f.write(b"PK\x03\x04 torn")
            f.flush()
            _die()

        checkpointer, calls = trainer.checkpointer, []
        original_save = checkpointer.save

        def save(name, **extra):
            calls.append(1)
            if len(calls) == int(number):
                torch.save = half_written
            return original_save(name, **extra)

        checkpointer.save = save
    trainer.resume_or_load(resume=mode == "resume")
    trainer.train()


if __name__ == "__main__":
    main(*sys.argv[1:])
