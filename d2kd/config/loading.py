"""Loading configs with errors that name the problem and the fix.

yacs reports a typo as ``KeyError: 'Non-existent config key: MODEL.RETINANT.NUM_CLASSES'``
deep in a traceback; :func:`load_config` turns this and other bad input into one
:class:`ConfigError` with the closest valid keys, raised before anything is built.
"""
import difflib
import os
import re
from typing import Iterator, List, Sequence

from detectron2.config import CfgNode, get_cfg

from .defaults import add_d2kd_config


class ConfigError(ValueError):
    """Bad user input found before training starts; the message says how to fix it."""


def get_d2kd_cfg() -> CfgNode:
    """detectron2's default config plus every d2kd key."""
    cfg = get_cfg()
    add_d2kd_config(cfg)
    return cfg


def _all_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        key = prefix + name
        yield key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, key + ".")


def _unknown_key_error(cfg: CfgNode, key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key}.{hint}")


def _key_from_yacs_error(error: Exception) -> str:
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(error))
    return match.group(1) if match else str(error)


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """Merge ``config_file`` (with its ``_BASE_`` chain) and ``KEY VALUE`` overrides."""
    cfg = get_d2kd_cfg()
    if not os.path.isfile(config_file):
        raise ConfigError(f"Config file {config_file} does not exist; check --config-file.")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise _unknown_key_error(cfg, _key_from_yacs_error(e), config_file) from None
    except FileNotFoundError as e:
        raise ConfigError(f"{config_file}: {e.strerror}: {e.filename} (check its _BASE_).") from None
    except ValueError as e:
        raise ConfigError(f"{config_file}: {e}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"Overrides must be KEY VALUE pairs, got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as e:
        if "Non-existent" in str(e):
            raise _unknown_key_error(cfg, _key_from_yacs_error(e), "command-line override") from None
        raise ConfigError(f"command-line override: {e}") from None
    _resolve_teacher_configs(cfg, config_file)
    return cfg


def _resolve_teacher_configs(cfg: CfgNode, config_file: str) -> None:
    """Relative ``DISTILL.TEACHER.CONFIGS`` are relative to the working directory or, failing
    that, to the directory of ``config_file`` (like ``_BASE_``)."""
    resolved = []
    for path in cfg.DISTILL.TEACHER.CONFIGS:
        beside = os.path.join(os.path.dirname(os.path.abspath(config_file)), path)
        if not os.path.isabs(path) and not os.path.isfile(path) and os.path.isfile(beside):
            path = beside
        resolved.append(path)
    cfg.DISTILL.TEACHER.CONFIGS = resolved


def config_keys(cfg: CfgNode) -> List[str]:
    """All dotted keys of ``cfg`` (used for suggestions and docs checks)."""
    return list(_all_keys(cfg))
