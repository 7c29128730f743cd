"""d2kd: knowledge distillation of object detectors on Detectron2.

``import d2kd`` registers d2kd's backbones, meta-architectures and datasets in detectron2's
registries. While detectron2 is not installed yet (only during ``make setup``, which runs
``d2kd.compat.provision``) the registrations are skipped.
"""
import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("detectron2") is not None:
    from . import data, modeling  # noqa: F401  (registration side effects)
