"""d2kd: knowledge distillation of object detectors on Detectron2.

detectron2 itself is not on PyPI, so it is not an install requirement here: `make setup`
provisions it (see d2kd/apps/provision/build.py) or uses the one already installed.

install_requires states what d2kd needs with lower bounds only, so that `pip install d2kd`
leaves an installed torch / torchvision / detectron2 in place (tests/test_install.py checks
this with pip's resolver). The exact versions of the embedded environment are pinned in
requirements/constraints.txt, which `make setup` passes to pip with `-c`.
"""
import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def packaged_configs():
    """configs/ ships inside the package as d2kd/model_zoo/configs (a symlink in the source
    tree, copied into wheels), so an installed d2kd finds them: d2kd.model_zoo.get_config_file."""
    folder = os.path.join(HERE, "d2kd", "model_zoo")
    return sorted(os.path.relpath(path, folder)
                  for pattern in ("configs/**/*.yaml", "configs/**/*.py", "configs/**/*.md")
                  for path in glob.glob(os.path.join(folder, pattern), recursive=True))


def version() -> str:
    """``__version__`` of d2kd/__init__.py, read without importing the package."""
    with open(os.path.join(HERE, "d2kd", "__init__.py")) as f:
        return re.search(r'^__version__ = "(.+)"$', f.read(), re.M).group(1)


setup(
    name="d2kd",
    version=version(),
    description="Detectron2 extension for knowledge distillation of object detectors",
    packages=find_packages(include=["d2kd", "d2kd.*"]),
    package_data={"d2kd.model_zoo": packaged_configs()},
    python_requires=">=3.9",
    install_requires=[
        # Lower bounds only: installing d2kd must never replace the torch / torchvision (and
        # the detectron2 compiled against them) already in an environment. 1.13 is the first
        # torch with torch.load(weights_only=...). The exact versions of the embedded
        # environment that `make setup` builds are in requirements/constraints.txt.
        "torch>=1.13",
        "torchvision>=0.14",
        # No setuptools here: detectron2 (v0.6 and upstream main) imports pkg_resources,
        # removed in setuptools 81, but an upper bound in install_requires would downgrade a
        # user's setuptools. The environment provides it (constraints file: setuptools<81).
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
        # LazyConfig teachers (d2kd/config/teachers.py); detectron2 depends on it as well
        "omegaconf>=2.1",
        "optuna>=4.0",
    ],
    extras_require={
        # the config-surface property test (tests/test_config_surface.py); `make lint`;
        # `make test-fast` (two pytest workers)
        "test": ["pytest>=7", "hypothesis>=6.100", "ruff>=0.6", "pytest-xdist>=3"],
        # tools/predict.py (detectron2's Visualizer imports cv2) and ONNX export; headless
        # OpenCV is not a hard requirement: it conflicts with an installed opencv-python
        "deploy": ["opencv-python-headless", "onnx>=1.14", "onnxruntime>=1.16"],
        # transformer teachers from detectron2's ViTDet project (docs/transformer_teachers.md):
        # detectron2 main's ViT, Swin and MViTv2 backbones import timm's DropPath / Mlp
        "vitdet": ["timm>=0.9"],
        # the DetKDS search on a PostgreSQL server (--storage postgresql://..., several
        # machines; docs/detkds_search.md): psycopg 3, which SQLAlchemy 2.1 and later take for
        # postgresql:// URLs (before, they needed psycopg2)
        "postgres": ["psycopg[binary]>=3.1", "SQLAlchemy>=2.1"],
        # the documentation site and its API reference (mkdocs.yml, `make docs`;
        # tests/dev/test_docs_build.py): mkdocstrings reads the docstrings through griffe's static
        # analysis; pymdown-extensions: mkdocs.yml's pymdownx.* extensions
        "docs": ["mkdocs>=1.6", "mkdocstrings>=1.0", "mkdocstrings-python>=2.0",
                 "mkdocs-material>=9.5", "pymdown-extensions>=10"],
    },
)
