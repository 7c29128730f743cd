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
  one is skipped for the previous readable one, with a warning).
"""
import warnings

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..config import ConfigError, check_inputs
from ..config.schedule import TeacherSchedule
from ..utils.meta_build import modules_on_meta
from .checkpoint import resume_checkpoint


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split())


def check_model(cfg: CfgNode) -> None:
    """Build ``cfg``'s model on the meta device (and every stage of a teacher schedule);
    raise :class:`ConfigError` with the builder's message if it cannot be built."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    try:
        with modules_on_meta(), warnings.catch_warnings():
            # loading a checkpoint into meta parameters only checks keys and shapes
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model = build_model(cfg)
            schedule = (TeacherSchedule.from_config(cfg)
                        if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector" else None)
            for stage in range(1, schedule.num_stages if schedule else 0):
                model.activate(schedule.stage_teachers(stage), schedule.head_config(cfg, stage))
    except ConfigError:
        raise
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(_one_line(e)) from None


def check_run(cfg: CfgNode, resume: bool = False) -> None:
    """Raise :class:`ConfigError` for the first bad input of a run of ``cfg``."""
    check_inputs(cfg, resume=resume)
    check_model(cfg)
    if resume:
        resume_checkpoint(cfg.OUTPUT_DIR)
