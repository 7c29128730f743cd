"""The single place where d2kd adapts to the detectron2 it runs on.

``has_compiled_extension()`` is the one capability check that drives every fallback (e.g.
``COCOEvaluator(use_fast_impl=...)``). Importing this package does not import detectron2.
"""
import functools
import importlib.machinery
import importlib.util


@functools.lru_cache(maxsize=None)
def has_compiled_extension() -> bool:
    """True when ``detectron2._C`` is the compiled C++/CUDA extension.

    False for the pure-Python stand-in that d2kd provisions (a ``.py`` module).
    """
    spec = importlib.util.find_spec("detectron2._C")
    origin = spec.origin if spec is not None else None
    return bool(origin) and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
