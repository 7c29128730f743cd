"""Everything that can be checked before a training starts, in the launching process.

``tools/train_net.py`` (and ``tools/search_net.py``) call :func:`check_run` before any worker
process starts, so bad input is one line naming the problem and the fix, and nothing is
trained or overwritten:

- the config's inputs (datasets, annotation files, weights files, teachers' files, loss
  weights; :func:`d2kd.config.check_inputs`);
- the model itself, built on the ``meta`` device (no memory, no compute): head names and
  options, DetKDS genomes, distilled levels and channels on both sides, response heads'
  compatibility, and every teacher's config and weights — each checkpoint is read and matched
  key by key and shape by shape, as the real build will; with a teacher schedule, every
  stage's teachers and heads;
- with ``--resume``, the checkpoint to resume from (:func:`resume_checkpoint`: an unreadable
  one is skipped for the previous readable one, with a warning; exports are never resumed);
- the weights the run loads, against the model (d2kd/modeling/weights.py): every tensor of
  the evaluated detector for ``--eval-only``, at least one parameter of ``MODEL.WEIGHTS`` for
  a fresh training.
"""
import contextlib
import warnings
from typing import Callable, Iterator, Optional

from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.modeling import build_model
from torch import nn

from ..compat.weight_loading import summarize
from ..config import ConfigError, check_inputs
from ..config.ranges import check_key_ranges
from ..config.saved import semantics_change
from ..config.schedule import TeacherSchedule
from ..config.validation import num_classes_of
from ..modeling import deployed_detector, load_for_evaluation, load_initialisation
from ..modeling.distillation_detector import student_config
from ..prototypes.index import build_instance_index, instances_per_class
from ..prototypes.refresh import prototype_banks
from ..utils.meta_build import modules_on_meta
from .checkpoint import resume_checkpoint


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split())


def _meta_config(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    return cfg


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    """Build modules on the meta device; builders' errors become :class:`ConfigError`."""
    try:
        with modules_on_meta(), warnings.catch_warnings():
            # loading a checkpoint into meta parameters only checks keys and shapes
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            yield
    except ConfigError:
        raise
    except (ValueError, KeyError, AssertionError, IndexError) as e:
        raise ConfigError(_one_line(e)) from None


def evaluated_config(cfg: CfgNode) -> CfgNode:
    """The config of the model ``--eval-only`` builds: a distillation config's student."""
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        return student_config(cfg)
    return cfg


def check_model(cfg: CfgNode) -> nn.Module:
    """Build ``cfg``'s model on the meta device (and every stage of a teacher schedule);
    raise :class:`ConfigError` with the builder's message if it cannot be built, if a stage
    has no distillation head, or if a stage's prototype banks would find no (or too few)
    instances; returns the model (its last stage's heads)."""
    cfg = _meta_config(cfg)
    with _on_meta():
        model = build_model(cfg)
        if cfg.MODEL.META_ARCHITECTURE != "DistillationDetector":
            return model
        schedule = TeacherSchedule.from_config(cfg)
        num_stages = schedule.num_stages if schedule else 1
        for stage in range(num_stages):
            head_cfg = schedule.head_config(cfg, stage) if schedule else cfg
            if stage:
                check_key_ranges(head_cfg)  # its STAGE_OPTS
                model.activate(schedule.stage_teachers(stage), head_cfg)
            _check_stage_heads(head_cfg, stage, num_stages)
            if prototype_banks(model):
                check_prototype_index(head_cfg)
    return model


def _check_stage_heads(cfg: CfgNode, stage: int, num_stages: int) -> None:
    if not cfg.DISTILL.HEADS:
        where = f" in stage {stage} of the teacher schedule" if num_stages > 1 else ""
        raise ConfigError(
            f"DISTILL.HEADS is empty{where}: the run would train the student alone. Name the "
            "distillation heads (e.g. ['MGDHead']), or train the student's own config.")


def check_prototype_index(cfg: CfgNode) -> None:
    """The instance index of the prototype banks has instances, and K of every class that
    has any when duplicates are excluded."""
    options = cfg.DISTILL.PROTOTYPES
    num_classes = num_classes_of(cfg)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    index = build_instance_index(dicts, num_classes[1] if num_classes else 0,
                                 options.MIN_BOX_SIZE, options.MAX_IMAGES_PER_CLASS,
                                 options.INDEX_SEED) if num_classes else []
    if num_classes and not index:
        raise ConfigError(
            f"The prototype instance index is empty: no training box of "
            f"{list(cfg.DATASETS.TRAIN)} is larger than DISTILL.PROTOTYPES.MIN_BOX_SIZE = "
            f"{options.MIN_BOX_SIZE} px in both sides; lower it.")
    if not options.ALLOW_DUPLICATES and index:
        counts = instances_per_class(index, num_classes[1])
        short = [(c, n) for c, n in enumerate(counts) if 0 < n < options.NUM_PROTOTYPES]
        if short:
            raise ConfigError(
                f"DISTILL.PROTOTYPES.NUM_PROTOTYPES = {options.NUM_PROTOTYPES} distinct prototypes "
                f"(ALLOW_DUPLICATES False), but {len(short)} classes have fewer indexed "
                f"instances ((class, instances): {summarize(short)}): lower it, allow "
                "duplicates, or lower MIN_BOX_SIZE.")


def check_model_weights(cfg: CfgNode, model: Optional[nn.Module], eval_only: bool,
                        checkpoint: Optional[str]) -> None:
    """The weights the run loads fit the model (checked on the meta-built ``model``): for
    ``--eval-only`` every tensor of the evaluated detector (:func:`load_for_evaluation`);
    for a fresh training at least one parameter of ``MODEL.WEIGHTS``
    (:func:`load_initialisation`); a resumed training loads its own checkpoint."""
    if eval_only:
        with _on_meta():
            detector = build_model(_meta_config(evaluated_config(cfg)))
            load_for_evaluation(detector, checkpoint or cfg.MODEL.WEIGHTS)
    elif model is not None and checkpoint is None and cfg.MODEL.WEIGHTS:
        with _on_meta():
            load_initialisation(deployed_detector(model), cfg.MODEL.WEIGHTS)


def check_resumed_semantics(cfg: CfgNode) -> None:
    """A resumed distillation must compute what its first iterations computed
    (``DISTILL.SEMANTICS``, d2kd/config/defaults.py)."""
    change = semantics_change(cfg.OUTPUT_DIR, cfg)
    if change is not None:
        raise ConfigError(
            f"{cfg.OUTPUT_DIR} was trained with DISTILL.SEMANTICS {change.split()[0]} and this "
            f"d2kd computes {cfg.DISTILL.SEMANTICS} (the authors' DetKDS ops and global-knowledge "
            "rules, docs/methods/README.md, Fidelity): resuming would mix two losses in one "
            "run. Finish it with the d2kd that started it, or train it again in a new "
            "OUTPUT_DIR.")


def check_run(cfg: CfgNode, resume: bool = False, eval_only: bool = False,
              before_weights: Callable[[], None] = lambda: None, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for the first bad input of a run of ``cfg`` on
    ``world_size`` processes: the config and its files, the model, then (after
    ``before_weights()``, e.g. a backbone's pre-training) the weights it loads."""
    check_inputs(cfg, resume=resume, world_size=world_size)
    model = check_model(cfg) if not eval_only else None
    checkpoint = resume_checkpoint(cfg.OUTPUT_DIR) if resume else None
    if checkpoint is not None:
        check_resumed_semantics(cfg)
    before_weights()
    check_model_weights(cfg, model, eval_only, checkpoint)
