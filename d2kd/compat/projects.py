"""detectron2's ``projects/`` folder and the transformer backbones its ViTDet configs need.

A pip-installed detectron2 (either build) holds the package ``detectron2`` only; the
``projects/`` folder — ViTDet's configs for Cascade Mask R-CNN with ViT, Swin and MViTv2
backbones among them — lives in the source checkout. The backbones themselves (``ViT``,
``SimpleFeaturePyramid``, ``SwinTransformer``, ``MViT``) came to detectron2 after v0.6.
"""
import os
from typing import List, Optional

ENV_VAR = "DETECTRON2_PROJECTS"
TRANSFORMER_BACKBONES = ("ViT", "SimpleFeaturePyramid", "SwinTransformer", "MViT")


def missing_transformer_backbones() -> List[str]:
    """The transformer backbones of ViTDet's configs that this detectron2 lacks (all four on
    v0.6, none on upstream main)."""
    import detectron2.modeling

    return [name for name in TRANSFORMER_BACKBONES if not hasattr(detectron2.modeling, name)]


def _checkout_projects() -> str:
    """``projects/`` next to the imported ``detectron2`` package (a source checkout)."""
    import detectron2

    package = os.path.dirname(os.path.abspath(detectron2.__file__))
    return os.path.join(os.path.dirname(package), "projects")


def projects_dir() -> Optional[str]:
    """detectron2's ``projects/`` folder: ``$DETECTRON2_PROJECTS`` when set, else the
    ``projects/`` next to the imported ``detectron2`` package when detectron2 runs from a
    source checkout (``pip install -e``); None when that folder does not exist."""
    path = os.environ.get(ENV_VAR, "") or _checkout_projects()
    return path if os.path.isdir(path) else None


def projects_dir_candidates() -> str:
    """Where :func:`projects_dir` looks, for messages."""
    configured = os.environ.get(ENV_VAR, "")
    if configured:
        return f"${ENV_VAR}={configured}"
    return f"${ENV_VAR} (unset), then {_checkout_projects()}"
