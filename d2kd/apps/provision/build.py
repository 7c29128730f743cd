"""Provision detectron2 into the current Python environment.

detectron2 is not published on PyPI. Policy (README.md, "detectron2 provisioning"):

1. If ``detectron2`` is importable (e.g. a user's official source build), use it as is: never
   replace or downgrade it.
2. Otherwise build a pure-Python detectron2 0.6 distribution from the PyPI source distribution
   ``pb1-detectron2==0.6`` (upstream v0.6 Python sources, no C++ sources):
   - apply the fixes upstream made later for modern NumPy / Pillow
     (``np.bool|np.float|np.int`` -> builtins, ``Image.LINEAR`` -> ``Image.BILINEAR``) and
     for ``MODEL.RETINANET.NORM: GN`` (v0.6 builds a 1-channel GroupNorm(32) just to log it),
   - add ``detectron2/_C.py`` from :mod:`d2kd.apps.provision.detectron2_C_standin`,
   - install it with pip as the distribution ``detectron2==0.6+purepython`` so that
     ``pip show detectron2`` and ``pip uninstall detectron2`` work.

Run as ``python -m d2kd.apps.provision``; idempotent. Imports nothing from detectron2.
"""

import argparse
import hashlib
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict

logger = logging.getLogger(__name__)

SDIST_REQUIREMENT = "pb1-detectron2==0.6"
SDIST_FILENAME = "pb1-detectron2-0.6.tar.gz"
# sha256 of the sdist that was verified file-by-file against upstream detectron2 v0.6.
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DISTRIBUTION_VERSION = "0.6+purepython"

# Upstream v0.6 install_requires minus "black" (pinned to a 2021 release; only used to pretty-
# print LazyConfig files), "future" and "pydot" (caffe2 export only).
INSTALL_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

# (pattern, replacement, minimum number of replacements expected in the v0.6 sources).
# \b after the alias excludes np.bool_, np.float32, np.int64 and friends.
SOURCE_FIXES = [
    (re.compile(r"\bnp\.bool\b(?!_)"), "bool", 6),
    (re.compile(r"\bnp\.float\b(?!_)"), "float", 4),
    (re.compile(r"\bnp\.int\b(?!_)"), "int", 4),
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR", 1),
    (re.compile(r"get_norm\(norm, 1\)"), "get_norm(norm, 32)", 1),
]

SETUP_PY = '''\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version={version!r},
    description="detectron2 v0.6 Python sources with a pure-Python _C stand-in (built by d2kd)",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
    install_requires={requires!r},
)
'''


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def download_sdist(cache_dir: Path) -> Path:
    """Download the sdist into ``cache_dir`` (reused when present) and verify its hash."""
    sdist = cache_dir / SDIST_FILENAME
    if not sdist.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Metadata generation of this sdist imports torch, hence no build isolation.
        _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "-d", str(cache_dir), SDIST_REQUIREMENT)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(
            f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}: it is not the verified "
            f"{SDIST_REQUIREMENT} sdist. Delete it and re-run `make setup`."
        )
    return sdist


def apply_source_fixes(package_dir: Path) -> Dict[str, int]:
    """Apply :data:`SOURCE_FIXES` to every ``.py`` file under ``package_dir`` in place.

    Returns the number of replacements per pattern; raises if fewer than expected were made
    (a sign that the sources are not the expected v0.6).
    """
    counts = {pattern.pattern: 0 for pattern, _, _ in SOURCE_FIXES}
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text()
        fixed = text
        for pattern, replacement, _ in SOURCE_FIXES:
            fixed, n = pattern.subn(replacement, fixed)
            counts[pattern.pattern] += n
        if fixed != text:
            path.write_text(fixed)
    for pattern, _, minimum in SOURCE_FIXES:
        if counts[pattern.pattern] < minimum:
            raise RuntimeError(
                f"Expected at least {minimum} occurrences of {pattern.pattern} in the detectron2 "
                f"v0.6 sources, found {counts[pattern.pattern]}: unexpected sdist contents."
            )
    return counts


def stage_distribution(sdist: Path, stage_dir: Path) -> None:
    """Unpack the sdist, fix it and lay out an installable ``detectron2`` project."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (source,) = Path(tmp).glob("pb1-detectron2-*")
        shutil.copytree(source / "detectron2", stage_dir / "detectron2")
    counts = apply_source_fixes(stage_dir / "detectron2")
    logger.info("Applied compatibility fixes: %s", counts)
    standin = Path(__file__).with_name("detectron2_C_standin.py")
    shutil.copyfile(standin, stage_dir / "detectron2" / "_C.py")
    (stage_dir / "setup.py").write_text(
        SETUP_PY.format(version=DISTRIBUTION_VERSION, requires=INSTALL_REQUIRES)
    )


def provision(work_dir: Path) -> None:
    if detectron2_importable():
        import detectron2  # noqa: F401 (only to report where it lives)

        logger.info("Using the installed detectron2 %s at %s (left untouched).",
                    getattr(detectron2, "__version__", "?"), Path(detectron2.__file__).parent)
        return
    sdist = download_sdist(work_dir / "downloads")
    stage_dir = work_dir / "detectron2-purepython"
    stage_distribution(sdist, stage_dir)
    _pip("install", "--no-build-isolation", str(stage_dir))
    logger.info("Installed detectron2 %s (pure Python).", DISTRIBUTION_VERSION)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m d2kd.apps.provision",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="build", type=Path,
                        help="where the sdist is cached and the distribution is staged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[provision] %(message)s")
    provision(args.work_dir)
