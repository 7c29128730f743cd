"""d2kd: knowledge distillation of object detectors on Detectron2.

``import d2kd`` registers d2kd's backbones, meta-architectures and datasets in detectron2's
registries. While detectron2 is not installed yet (only during ``make setup``, which runs
``d2kd.apps.provision``) the registrations are skipped.
"""
import importlib.util
import warnings

__version__ = "0.2.0"

# Deprecation notices that detectron2 triggers at import time in modern torch / setuptools;
# a user cannot act on them, and they would bury d2kd's one-line input errors.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)

if importlib.util.find_spec("detectron2") is not None:
    from . import data, model_zoo, modeling  # noqa: F401  (registration side effects)
