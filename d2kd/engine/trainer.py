"""The trainer behind ``tools/train_net.py``."""
import os

from detectron2.engine import DefaultTrainer
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..compat import has_compiled_extension
from ..compat.cpu_distributed import create_ddp_model, unwrap_ddp
from ..compat.trainer_internals import default_trainer_parts
from ..data.step_loader import build_step_train_loader
from ..modeling import DistillationDetector, load_initialisation
from ..utils.host_memory import retain_freed_host_memory
from ..utils.io import atomic_write_json
from .checkpoint import AtomicCheckpointer, remove_torn_writes, resume_checkpoint
from .exact_resume import ExactResumeHook
from .export import StudentExportHook
from .optimizer import build_optimizer
from .prototype_hook import PrototypeRefreshHook
from .stages import build_stage_lr_scheduler, insert_schedule_hooks, schedule_of


class DistillTrainer(DefaultTrainer):
    """detectron2's :class:`DefaultTrainer` for d2kd models.

    Differences from the parent: ``--resume`` is exact and its cost does not grow with the
    iteration (the training data is a stream addressed by iteration, every step is seeded
    from ``(SEED, iteration, rank)``: :class:`ExactResumeHook`), freed host memory may stay
    in the process between steps (``D2KD.RETAIN_HOST_MEMORY``), DDP also works on CPU (gloo),
    ``SOLVER.OPTIMIZER`` may be AdamW, checkpoints hold the optimizer state on every detectron2
    version, fresh distillation runs initialise the student from ``MODEL.WEIGHTS``, and evaluation
    is a :class:`COCOEvaluator` (box AP, plus mask AP when ``MODEL.MASK_ON``) that uses the fast
    C++ implementation only when detectron2's compiled extension exists. Every evaluation
    also writes its results to ``OUTPUT_DIR/inference/results.json`` (machine-readable); a
    completed distillation run writes ``OUTPUT_DIR/model_final_student.pth``.
    """

    def __init__(self, cfg):
        if cfg.D2KD.RETAIN_HOST_MEMORY:
            retain_freed_host_memory()
        if cfg.SEED < 0:  # the data stream and per-step seeds need one (kept in checkpoints)
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SEED = comm.shared_random_seed()
            cfg.freeze()
        self.schedule_hook = None  # build_hooks sets it
        if comm.is_main_process():
            remove_torn_writes(cfg.OUTPUT_DIR)
        # detectron2's constructor, with DDP that also runs on CPU (gloo) and atomic checkpoints
        with default_trainer_parts(create_ddp_model, AtomicCheckpointer):
            super().__init__(cfg)

    def state_dict(self):
        """Also the optimizer state (detectron2 v0.6 checkpoints omit it; upstream main does
        the same as this)."""
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume: bool = True) -> None:
        """As detectron2's, except that ``--resume`` loads only this run's own training
        checkpoints (:func:`resume_checkpoint`) and a fresh run initialises from
        ``MODEL.WEIGHTS`` with :func:`load_initialisation` (a distillation model: its student,
        then ``DISTILL.INIT_FROM_TEACHER``)."""
        model = unwrap_ddp(self.model)
        checkpoint = resume_checkpoint(self.cfg.OUTPUT_DIR) if resume else None
        if self.schedule_hook is not None:
            self.schedule_hook.prepare(checkpoint is not None)  # teacher order; its stage
        if checkpoint is not None:
            self.checkpointer.load(checkpoint)  # model, optimizer, scheduler, iteration
            self.start_iter = self.iter + 1
        elif isinstance(model, DistillationDetector):
            model.initialize(self.cfg.MODEL.WEIGHTS, self.cfg.DISTILL.INIT_FROM_TEACHER)
        elif self.cfg.MODEL.WEIGHTS:
            load_initialisation(model, self.cfg.MODEL.WEIGHTS)

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks.insert(0, ExactResumeHook(self.data_loader.batch_sampler,  # first: seeds steps
                                        self.cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter))
        self.schedule_hook = insert_schedule_hooks(hooks, self.cfg)  # MTPD teacher schedule
        if self.cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
            export = os.path.join(self.cfg.OUTPUT_DIR, "model_final_student.pth")
            hooks.insert(-1, StudentExportHook(export))  # before the final writer
            # after stage switches, before the checkpointer; it serves whichever stage has
            # prototype heads (none: it does nothing)
            checkpointer = next(i for i, h in enumerate(hooks)
                                if isinstance(h, (PeriodicCheckpointer, EvalHook)))
            hooks.insert(checkpointer, PrototypeRefreshHook(self.cfg))
        return hooks

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's; with a teacher schedule, restarted in every stage."""
        schedule = schedule_of(cfg)
        if schedule is None:
            return super().build_lr_scheduler(cfg, optimizer)
        return build_stage_lr_scheduler(cfg, optimizer, schedule)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training data, as a stream addressed by iteration (exact, O(1)
        ``--resume``; d2kd/data/step_loader.py)."""
        return build_step_train_loader(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(
            dataset_name,
            tasks=tasks,
            distributed=True,
            output_dir=output_folder,
            use_fast_impl=has_compiled_extension(),
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "inference", "results.json"), results)
        return results
