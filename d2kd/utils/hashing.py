"""Content hashes of files: what caches are keyed by and what result files record."""
import hashlib
import os
from typing import Dict, Tuple

_CHUNK = 1 << 20
# (real path, size, mtime_ns, inode) -> sha256: a file rewritten in place gets a new key
_MEMO: Dict[Tuple[str, int, int, int], str] = {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks (memory does not grow with the
    file); remembered per process while the file's size, mtime and inode stay the same."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _MEMO:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        _MEMO[key] = digest.hexdigest()
    return _MEMO[key]


def weights_sha256(weights: str) -> str:
    """SHA-256 of a weights file: a local path, or a URL detectron2's ``PathManager`` resolves
    (its local copy)."""
    from detectron2.utils.file_io import PathManager

    return file_sha256(PathManager.get_local_path(weights))
