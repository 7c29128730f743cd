"""Installing d2kd leaves an installed torch / torchvision / detectron2 / setuptools in place.

Checked with pip's own resolver, offline, in seconds: a scratch virtualenv whose site-packages
holds metadata-only ``*.dist-info`` folders (a user's torch 2.13.0, torchvision 0.28.0,
detectron2 0.6, setuptools 82 and everything else at the versions of the running environment),
a folder of metadata-only wheels the resolver *could* pick (torch 2.15.0, torchvision 0.29.2,
setuptools 80.10.2, the embedded environment's pins), and

    pip --python SCRATCH/bin/python install --dry-run --report R --no-index --find-links W
        --no-build-isolation -e PROJECT

where PROJECT holds a copy of d2kd's setup.py. The report must install d2kd and nothing else.
The same check on the old install_requires (``torch==2.15.*``, ``torchvision==0.29.*``,
``setuptools<81``) must report those three as replaced: the check can fail.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the user's environment already has (metadata only) ...
USER_INSTALLED = {"torch": "2.13.0", "torchvision": "0.28.0", "detectron2": "0.6",
                  "setuptools": "82.0.0"}
# ... and what the resolver could install instead (the embedded environment's pins).
INDEX = {"torch": "2.15.0", "torchvision": "0.29.2", "setuptools": "80.10.2"}
# torchvision builds require their exact torch.
REQUIRES = {("torchvision", "0.28.0"): ["torch==2.13.0"],
            ("torchvision", "0.29.2"): ["torch==2.15.0"]}

# d2kd's install_requires before the fix (setup.py up to commit 731f0f8).
OLD_SETUP_PY = '''\
from setuptools import find_packages, setup

setup(
    name="d2kd",
    version="0.1.0",
    packages=find_packages(include=["d2kd", "d2kd.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch==2.15.*",
        "torchvision==0.29.*",
        "setuptools<81",
        "numpy>=1.23",
        "Pillow>=9.0",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "scikit-learn>=1.3",
        "matplotlib",
        "tensorboard",
        "tqdm",
        "yacs>=0.1.8",
        "optuna>=4.0",
    ],
    extras_require={"test": ["pytest>=7"]},
)
'''


def _pip_version():
    return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("pip"))[:2])


pytestmark = pytest.mark.skipif(
    _pip_version() < (22, 3), reason="needs pip >= 22.3 (pip --python, install --report)"
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(name: str, version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in REQUIRES.get((name, version), [])]
    return "\n".join(lines) + "\n"


def _dist_info_name(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"


def _write_installed(site_packages: Path, name: str, version: str) -> None:
    dist_info = site_packages / _dist_info_name(name, version)
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(_metadata(name, version))
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text("")


def _write_wheel(folder: Path, name: str, version: str) -> None:
    stem = re.sub(r"[-_.]+", "_", name)
    dist_info = _dist_info_name(name, version)
    with zipfile.ZipFile(folder / f"{stem}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{dist_info}/METADATA", _metadata(name, version))
        whl.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: d2kd-test\n"
                                           "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "")


def _scratch_environment(root: Path) -> Path:
    """A virtualenv without pip whose installed packages are metadata only; returns its python.

    setuptools' code (needed to read setup.py without build isolation) is importable through a
    .pth file, from a folder without metadata, so that pip sees the user's setuptools 82 (whose
    fake metadata carries the real setuptools' entry points).
    """
    env = root / "env"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    build_tools = root / "build-tools"
    build_tools.mkdir()
    for module in ("setuptools", "pkg_resources", "_distutils_hack"):
        origin = Path(importlib.util.find_spec(module).origin)
        (build_tools / module).symlink_to(origin.parent, target_is_directory=True)
    (site_packages / "build-tools.pth").write_text(f"{build_tools}\n")

    running = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in ("d2kd", "pip"):
            running.setdefault(_canonical(name), (name, dist.version))
    for name, version in USER_INSTALLED.items():
        running[_canonical(name)] = (name, version)
    for name, version in running.values():
        _write_installed(site_packages, name, version)
    # setuptools registers its commands and setup() keywords as entry points of its metadata.
    entry_points = importlib.metadata.distribution("setuptools").read_text("entry_points.txt")
    (site_packages / _dist_info_name("setuptools", USER_INSTALLED["setuptools"])
     / "entry_points.txt").write_text(entry_points)
    return python


def _resolve(project: Path, tmp_path: Path) -> dict:
    """{name: version} that ``pip install -e PROJECT`` would install into the scratch env."""
    python = _scratch_environment(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in INDEX.items():
        _write_wheel(wheels, name, version)
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
           "--quiet", "--report", str(report), "--no-index", "--find-links", str(wheels),
           "--no-build-isolation", "-e", str(project)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    items = json.loads(report.read_text())["install"]
    return {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def _replaced(installs: dict) -> dict:
    """The user's packages that the install would replace: {name: new version}."""
    return {name: version for name, version in installs.items()
            if name in USER_INSTALLED and version != USER_INSTALLED[name]}


def _project(tmp_path: Path, setup_py: str) -> Path:
    project = tmp_path / "project"
    (project / "d2kd").mkdir(parents=True)
    # setup.py reads the version from it
    (project / "d2kd" / "__init__.py").write_text((REPO / "d2kd" / "__init__.py").read_text())
    (project / "setup.py").write_text(setup_py)
    return project


@pytest.mark.slow
def test_installing_d2kd_keeps_the_users_torch_torchvision_detectron2(tmp_path):
    project = _project(tmp_path, (REPO / "setup.py").read_text())
    installs = _resolve(project, tmp_path)
    assert _replaced(installs) == {}
    assert installs.keys() == {"d2kd"}, installs


@pytest.mark.slow
def test_the_check_fails_on_the_old_exact_pins(tmp_path):
    installs = _resolve(_project(tmp_path, OLD_SETUP_PY), tmp_path)
    assert _replaced(installs) == {"torch": "2.15.0", "torchvision": "0.29.2",
                                   "setuptools": "80.10.2"}


def test_constraints_pin_what_the_embedded_environment_needs():
    """The pins left setup.py for requirements/constraints.txt, which the Makefile passes."""
    lines = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    assert pins["torch"] == INDEX["torch"] and pins["torchvision"] == INDEX["torchvision"]
    assert int(pins["setuptools"].split(".")[0]) < 81  # detectron2 imports pkg_resources
    assert not {"d2kd", "detectron2"} & set(pins)
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(CONSTRAINTS)" in makefile and "PIP_CONSTRAINT=" in makefile
