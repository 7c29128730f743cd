"""Print the software stack d2kd runs on: ``python -m d2kd.collect_env``."""
import os
import platform
import sys

import torch
import torchvision

import detectron2

from d2kd import __version__
from d2kd.compat import has_compiled_extension


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
        ("torch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torchvision", torchvision.__version__),
        ("device", device),
        ("torch threads", str(torch.get_num_threads())),
    ]
    return "\n".join(f"{name}: {value}" for name, value in rows)


if __name__ == "__main__":
    print(collect_env_info())
