"""Loading configs with errors that name the problem and the fix.

yacs reports a typo as ``KeyError: 'Non-existent config key: MODEL.RETINANT.NUM_CLASSES'``
deep in a traceback; :func:`load_config` turns this and other bad input into one
:class:`ConfigError` with the closest valid keys, raised before anything is built.
"""
import ast
import difflib
import importlib
import importlib.util
import os
import re
import sys
from typing import Iterator, List, Sequence, Tuple

import yaml
from detectron2.config import CfgNode, get_cfg

from .defaults import add_d2kd_config


class ConfigError(ValueError):
    """Bad user input found before training starts; the message says how to fix it."""


#: the longest error line (a message that runs longer is cut, saying so)
MAX_LINE = 600


def one_line(error: BaseException) -> str:
    """``error`` as one short line: a :class:`ConfigError`'s message, any other exception's
    type and message (whitespace folded, cut at :data:`MAX_LINE` characters)."""
    text = " ".join(str(error).split())
    if not isinstance(error, ConfigError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 15] + " ... (cut)"


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
    if key.split(".")[:3] == ["DISTILL", "DETKDS", "SEARCH"]:
        hint = (" The DetKDS search's keys belong to its application: run the config with "
                "tools/search_net.py (or import d2kd.apps.search first).")
    return ConfigError(f"{source}: unknown config key {key}.{hint}")


def _key_from_yacs_error(error: Exception) -> str:
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(error))
    return match.group(1) if match else str(error)


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """Merge ``config_file`` (with its ``_BASE_`` chain) and ``KEY VALUE`` overrides.

    Modules in ``D2KD.IMPORTS`` (of the file's ``_BASE_`` chain, and of the overrides:
    ``.py`` paths there are relative to the working directory) are imported first, so their
    registrations and config keys exist when the file and the overrides are merged.
    """
    if not os.path.isfile(config_file):
        raise ConfigError(f"Config file {config_file} does not exist; check --config-file.")
    chain = _yaml_chain(config_file)
    import_extensions([(entry, directory) for data, directory in chain
                       for entry in _lookup(data, "D2KD.IMPORTS") or []]
                      + [(entry, os.getcwd()) for entry in _override_imports(opts)])
    cfg = get_d2kd_cfg()
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise _unknown_key_error(cfg, _key_from_yacs_error(e), config_file) from None
    except FileNotFoundError as e:
        raise ConfigError(f"{config_file}: {e.strerror}: {e.filename} "
                          "(check its _BASE_).") from None
    except ValueError as e:
        raise ConfigError(f"{config_file}: {e}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"Overrides must be KEY VALUE pairs, got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as e:
        if "Non-existent" in str(e):
            raise _unknown_key_error(cfg, _key_from_yacs_error(e),
                                     "command-line override") from None
        raise ConfigError(f"command-line override: {e}") from None
    _resolve_teacher_configs(cfg, chain)
    return cfg


class _PeekLoader(yaml.SafeLoader):
    """Safe YAML that reads tagged values (``!!python/...`` in some detectron2 configs) as
    None: only ``_BASE_`` and ``D2KD.IMPORTS`` are read from it."""


_PeekLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _yaml_chain(config_file: str) -> List[Tuple[dict, str]]:
    """``(content, directory)`` of every file of the ``_BASE_`` chain, the base first."""
    with open(config_file) as f:
        data = yaml.load(f, Loader=_PeekLoader) or {}
    directory = os.path.dirname(os.path.abspath(config_file))
    chain = []
    base = data.get("_BASE_")
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(directory, base)
        if os.path.isfile(base_path):
            chain = _yaml_chain(base_path)
    return chain + [(data, directory)]


def _override_imports(opts: Sequence[str]) -> List[str]:
    """The entries of a ``D2KD.IMPORTS`` override among ``KEY VALUE`` pairs."""
    entries: List[str] = []
    for key, value in zip(list(opts)[0::2], list(opts)[1::2]):
        if key == "D2KD.IMPORTS":
            try:
                parsed = ast.literal_eval(value) if isinstance(value, str) else value
            except (ValueError, SyntaxError):
                parsed = [value]
            entries = [str(e) for e in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
    return entries


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def import_extensions(declared: Sequence[Tuple[str, str]]) -> None:
    """Import dotted module names, or ``.py`` files relative to the declaring config."""
    for entry, directory in declared:
        if entry.endswith(".py"):
            path = os.path.normpath(
                entry if os.path.isabs(entry) else os.path.join(directory, entry))
            if not os.path.isfile(path):
                raise ConfigError(f"D2KD.IMPORTS: {entry} not found (looked at {path}).")
            name = "d2kd_ext_" + re.sub(r"\W", "_", os.path.splitext(path)[0].lstrip(os.sep))
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(entry)
            except ImportError as e:
                raise ConfigError(f"D2KD.IMPORTS: cannot import {entry}: {e}") from None


def _resolve_teacher_configs(cfg: CfgNode, chain: List[Tuple[dict, str]]) -> None:
    """Relative ``DISTILL.TEACHER.CONFIGS`` are relative to the config file that declares
    them (like ``_BASE_``); paths given on the command line, to the working directory.
    References with a scheme (``model_zoo://...``) are left as they are."""
    declaring_dir = None
    for data, directory in chain:
        if _lookup(data, "DISTILL.TEACHER.CONFIGS") is not None:
            declaring_dir = directory  # the last (most derived) declaration wins
    resolved = []
    for path in cfg.DISTILL.TEACHER.CONFIGS:
        if (declaring_dir and "://" not in path and not os.path.isabs(path)
                and not os.path.isfile(path)):
            path = os.path.normpath(os.path.join(declaring_dir, path))
        resolved.append(path)
    cfg.DISTILL.TEACHER.CONFIGS = resolved

