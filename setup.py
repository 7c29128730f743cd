"""d2kd: knowledge distillation of object detectors on Detectron2.

detectron2 itself is not on PyPI, so it is not an install requirement here: `make setup`
provisions it (see d2kd/compat/provision.py) or uses the one already installed.
"""
from setuptools import find_packages, setup

setup(
    name="d2kd",
    version="0.1.0",
    description="Detectron2 extension for knowledge distillation of object detectors",
    packages=find_packages(include=["d2kd", "d2kd.*"]),
    python_requires=">=3.9",
    install_requires=[
        # The PyPI builds ENVIRONMENT.md verified on CPU (torchvision's nms/roi_align
        # register); the pre-seeded CPU-only torch 2.13 has no working torchvision.
        "torch==2.15.*",
        "torchvision==0.29.*",
        # detectron2 v0.6 and upstream main import pkg_resources, removed in setuptools 81.
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
