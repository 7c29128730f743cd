"""Print the software stack d2kd runs on: ``python -m d2kd.apps.collect_env``."""
import os
import platform
import sys

import detectron2
import torch
import torchvision

from d2kd import __version__
from d2kd.compat import has_compiled_extension
from d2kd.compat.projects import (
    missing_transformer_backbones,
    projects_dir,
    projects_dir_candidates,
)


def _transformer_teachers() -> str:
    """Whether ViTDet-project teachers can be built here: backbones, timm, projects/."""
    missing = missing_transformer_backbones()
    backbones = f"lacks {', '.join(missing)}" if missing else "ViT, Swin, MViTv2 backbones"
    try:
        import timm  # noqa: F401  (detectron2's transformer backbones import it)
        timm_state = "timm yes"
    except ImportError:
        timm_state = "timm no (pip install -e .[vitdet])"
    projects = projects_dir() or f"projects/ not found ({projects_dir_candidates()})"
    return f"{backbones}; {timm_state}; {projects}"


def collect_env_info() -> str:
    """One ``name: value`` line per fact; the detectron2 line is parsed by tools and tests."""
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.device_count()}x {torch.cuda.get_device_name(0)})"
    else:
        device = "cpu"
    rows = [
        ("d2kd", f"{__version__} @ {os.path.dirname(os.path.abspath(__file__))}"),
        ("python", f"{sys.version.split()[0]} ({platform.platform()})"),
        ("detectron2",
         f"{detectron2.__version__} compiled: {'yes' if has_compiled_extension() else 'no'}"),
        ("detectron2 location", os.path.dirname(detectron2.__file__)),
        ("transformer teachers", _transformer_teachers()),
        ("torch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torchvision", torchvision.__version__),
        ("device", device),
        ("torch threads", str(torch.get_num_threads())),
    ]
    return "\n".join(f"{name}: {value}" for name, value in rows)


if __name__ == "__main__":
    print(collect_env_info())
