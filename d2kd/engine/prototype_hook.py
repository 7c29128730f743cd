"""``PrototypeRefreshHook``: when :class:`DistillTrainer` (re)builds the prototype banks.

Schedule (a pure function of the iteration, so a resumed run refreshes at the same times):

- before any step at which some bank was never built (``version == 0``): the first step of a
  fresh run, and the first step of a teacher-schedule stage, whose heads are new (a resumed
  run restores its banks from the checkpoint instead). Stages may add, drop or change
  prototype heads: the hook serves the banks of the model's current heads, and does nothing
  in a stage that has none;
- after step ``t`` whenever ``t + 1`` is a multiple of the period and another step follows.
  The hook runs before detectron2's ``PeriodicCheckpointer``, so the checkpoint written after
  step ``t`` holds the bank step ``t + 1`` uses.

Refresh statistics go to the event storage (``prototypes/refresh_seconds``,
``prototypes/unique_fraction``, ``prototypes/total_seconds``) and to the log.
"""
from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from ..compat.cpu_distributed import unwrap_ddp
from ..prototypes.refresh import PrototypeRefresher, prototype_banks, refresh_period


class PrototypeRefreshHook(HookBase):
    def __init__(self, cfg):
        self.cfg = cfg
        self.refresher = None
        self.period = 0

    def _banks(self):
        """The prototype banks of the model's current heads (a stage switch replaces them)."""
        return prototype_banks(unwrap_ddp(self.trainer.model))

    def _ready_refresher(self) -> PrototypeRefresher:
        """The refresher, made when a stage first has banks (its index is built once)."""
        if self.refresher is None:
            # every training record, images without annotations included (as the index sees them)
            dicts = get_detection_dataset_dicts(self.cfg.DATASETS.TRAIN, filter_empty=False)
            self.refresher = PrototypeRefresher(self.cfg, unwrap_ddp(self.trainer.model), dicts)
            self.period = refresh_period(self.cfg, len(dicts))
        self.refresher.model = unwrap_ddp(self.trainer.model)  # DDP re-wraps at stage switches
        return self.refresher

    def before_step(self) -> None:
        if any(int(bank.version) == 0 for bank in self._banks()):
            self._refresh()

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if not (self.cfg.DISTILL.PROTOTYPES.REFRESH and next_iter < self.trainer.max_iter
                and self._banks()):
            return
        self._ready_refresher()  # the period (one epoch by default) needs the dataset
        if next_iter % self.period == 0:
            self._refresh()

    def _refresh(self) -> None:
        stats = self._ready_refresher().refresh()
        storage = get_event_storage()
        storage.put_scalar("prototypes/refresh_seconds", stats["seconds"], smoothing_hint=False)
        storage.put_scalar("prototypes/unique_fraction", stats["unique_fraction"],
                           smoothing_hint=False)
        storage.put_scalar("prototypes/total_seconds", self.refresher.total_seconds,
                           smoothing_hint=False)
