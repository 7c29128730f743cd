"""d2kd's configs, reachable from an installed package, and its pre-trained DigitsDet backbones.

``get_config_file("DigitsDet/retinanet_R18_from_R50_mgd.yaml")`` is the path of one of the
repository's ``configs/`` files inside the installed package (``setup.py`` ships them as
package data, like detectron2's model zoo), so ``pip install .`` users train with them:

    python -m d2kd.apps.launch.train_net --config-file \\
        $(python -c "from d2kd.model_zoo import get_config_file as f; \\
                     print(f('DigitsDet/retinanet_R18_from_R50_mgd.yaml'))")

``MODEL.WEIGHTS: "digitsdet-pretrained://R18_FPN64"`` names a backbone pre-trained on DigitsDet
(the offline stand-in for ImageNet initialisation, d2kd/modeling/pretext.py). It resolves,
through a handler in detectron2's ``PathManager``, to
``$DETECTRON2_DATASETS/digitsdet/pretrained/R18_FPN64.pth``. Producing a missing one is a
training, which the core never starts: the launchers do it before a run starts
(``d2kd.apps.launch.pretrain``; ``tools/train_net.py`` and the demo call it); a missing file here
is an error that says so.
"""
import os

from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from ..compat.file_io import register_path_handler
from ..data import digitsdet_root

__all__ = ["PRETRAINED_PREFIX", "DigitsDetPretrainedHandler", "get_config_file", "pretrain_config",
           "pretrained_backbone_path"]

PRETRAINED_PREFIX = "digitsdet-pretrained://"
_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(config_path: str) -> str:
    """The packaged copy of ``configs/<config_path>`` (e.g. ``"DigitsDet/Base-DigitsDet.yaml"``)."""
    path = os.path.join(_CONFIGS, config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_path} is not one of d2kd's configs (looked in "
                                f"{_CONFIGS}).")
    return path


def pretrain_config(name: str) -> str:
    """The pre-training config of backbone ``name`` (``configs/DigitsDet/pretrain/NAME.yaml``)."""
    folder = os.path.join(_CONFIGS, "DigitsDet", "pretrain")
    path = os.path.join(folder, f"{name}.yaml")
    if not os.path.isfile(path):
        available = sorted(f[:-5] for f in os.listdir(folder)
                           if f.endswith(".yaml") and not f.startswith("Base-"))
        raise FileNotFoundError(
            f"No pre-training config for {PRETRAINED_PREFIX}{name} ({path}). Available: "
            f"{available}."
        )
    return path


def pretrained_backbone_path(name: str, root: str = "") -> str:
    """Where backbone ``name`` of the DigitsDet copy at ``root`` is cached (may not exist)."""
    return os.path.join(root or digitsdet_root(), "pretrained", f"{name}.pth")


class DigitsDetPretrainedHandler(PathHandler):
    """Resolves ``digitsdet-pretrained://NAME`` (see module docstring)."""

    def _get_supported_prefixes(self):
        return [PRETRAINED_PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        name = path[len(PRETRAINED_PREFIX):]
        pretrain_config(name)  # an unknown name is its own error
        local = pretrained_backbone_path(name)
        if not os.path.isfile(local):
            raise FileNotFoundError(
                f"{path} is not pre-trained yet ({local} does not exist): run "
                f"`python -m d2kd.apps.launch.pretrain {name}` (tools/train_net.py and "
                "tools/benchmark.py do it before a run starts)."
            )
        return local

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs) -> bool:
        return os.path.isfile(pretrained_backbone_path(path[len(PRETRAINED_PREFIX):]))


register_path_handler(DigitsDetPretrainedHandler())
