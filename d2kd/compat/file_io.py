"""Registering path handlers in detectron2's ``PathManager`` (iopath)."""
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler


def register_path_handler(handler: PathHandler) -> None:
    """Register ``handler`` unless a handler for its prefixes is registered already (a module
    imported twice, e.g. by path and by name, must not fail)."""
    registered = PathManager._path_handlers  # iopath keeps no public lookup by prefix
    if not any(prefix in registered for prefix in handler._get_supported_prefixes()):
        PathManager.register_handler(handler)
