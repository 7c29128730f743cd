"""Comparing the config a run saved (detectron2's ``OUTPUT_DIR/config.yaml``) with a config
built now, to tell whether the run's results still belong to it."""
import os
from typing import Dict, List, Optional, Sequence

import yaml
from detectron2.config import CfgNode

from .loading import load_config


def _flat(node: Dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _same_setting(saved: object, current: object) -> bool:
    """Equal values; absolute paths (teacher configs resolved by load_config) compare by file
    name, so that a run made in another checkout of the repository still matches."""
    def by_name(value):
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.basename(value)
        if isinstance(value, list):
            return [by_name(v) for v in value]
        return value
    return by_name(saved) == by_name(current)


def _saved_settings(saved_config_file: str) -> Dict[str, object]:
    """The flat settings of a saved config; a distillation run saved before
    ``DISTILL.SEMANTICS`` existed computed version 1 (d2kd/config/defaults.py)."""
    with open(saved_config_file) as f:
        saved = _flat(yaml.safe_load(f))
    distils = (saved.get("MODEL.META_ARCHITECTURE") == "DistillationDetector"
               and bool(saved.get("DISTILL.HEADS")))
    if distils:
        saved.setdefault("DISTILL.SEMANTICS", 1)
    return saved


def changed_settings(saved_config_file: str, cfg: CfgNode,
                     ignored: Sequence[str] = ()) -> List[str]:
    """``KEY: saved -> now`` for each setting of ``saved_config_file`` that ``cfg`` no longer
    has. Compared are the keys both configs have except OUTPUT_DIR and those starting with an
    ``ignored`` prefix: a key added to d2kd after the run took what is now its default, a
    removed one is no setting any more; except ``DISTILL.SEMANTICS``, which a distillation
    run saved without it had at 1."""
    saved = _saved_settings(saved_config_file)
    current = _flat(yaml.safe_load(cfg.dump()))
    keys = sorted(k for k in (set(saved) & set(current)) - {"OUTPUT_DIR"}
                  if not k.startswith(tuple(ignored)))
    return [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in keys
            if not _same_setting(saved[key], current[key])]


def config_mismatches(output_dir: str, config_file: str, opts: Sequence[str],
                      ignored: Sequence[str] = ()) -> List[str]:
    """Settings of a finished run's saved ``config.yaml`` that ``config_file`` with ``opts`` no
    longer gives (:func:`changed_settings`); empty when the run saved none."""
    saved_config = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(saved_config) or config_file.endswith(".py"):
        return []  # a LazyConfig recipe: Python, compared by its file only
    return changed_settings(saved_config, load_config(config_file, opts), ignored)


def semantics_change(output_dir: str, cfg: CfgNode) -> Optional[str]:
    """``"saved -> now"`` when the distillation run saved in ``output_dir`` computed another
    ``DISTILL.SEMANTICS`` than ``cfg`` does, else None (no saved config, or no distillation)."""
    saved_config = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(saved_config):
        return None
    saved = _saved_settings(saved_config).get("DISTILL.SEMANTICS")
    now = cfg.DISTILL.SEMANTICS
    return None if saved is None or saved == now else f"{saved} -> {now}"
