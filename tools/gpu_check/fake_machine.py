#!/usr/bin/env python
"""A stand-in for the GPU machine's Python, to check tools/gpu_check.sh's install here.

The GPU machine's python3 is a virtualenv holding torch, torchvision and the packages of
``machine_packages.txt`` (numpy, scipy, matplotlib, tensorboard, pytest, pip, ...), and none of
fvcore, iopath, yacs, pycocotools, omegaconf, hydra, optuna, detectron2. This builds a
virtualenv with the same shape from an environment that has torch (e.g. ``.venv``): every
distribution of SOURCE_SITE whose name is in ``machine_packages.txt`` is linked into it, and
nothing else.

    python3.11 tools/gpu_check/fake_machine.py --source .venv/lib/python3.11/site-packages \
        --dest /tmp/machine311
    bash tools/gpu_check.sh --cpu --base-python /tmp/machine311/bin/python --wheels W311 ...

Run it with the Python of the source environment's version (the virtualenv is made from it).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

from packaging.utils import canonicalize_name

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="site-packages of an environment with torch")
    p.add_argument("--dest", required=True, help="the virtualenv to create (replaced)")
    args = p.parse_args()
    with open(os.path.join(HERE, "machine_packages.txt")) as f:
        machine = {canonicalize_name(l.strip()) for l in f if l.strip() and not l.startswith("#")}
    shutil.rmtree(args.dest, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", args.dest], check=True)
    site = subprocess.run([os.path.join(args.dest, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    source = os.path.abspath(args.source)
    dists = {canonicalize_name(d.metadata["Name"]): d
             for d in metadata.distributions(path=[source])}
    # the machine's packages and what they require (torch's CUDA libraries, ...): a pip-built
    # environment is consistent, and pip's resolver checks installed packages' requirements
    wanted, todo = set(), [n for n in dists if n in machine]
    while todo:
        name = todo.pop()
        if name in wanted or name not in dists:
            continue
        wanted.add(name)
        for req in dists[name].requires or []:
            if "extra ==" not in req:
                todo.append(canonicalize_name(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    linked, left = [], []
    for name, dist in sorted(dists.items()):
        if name not in wanted:
            left.append(name)
            continue
        tops = {str(f).split("/")[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            src, dst = os.path.join(source, top), os.path.join(site, top)
            if os.path.exists(src) and not os.path.lexists(dst) and top != "__pycache__":
                os.symlink(src, dst)
        linked.append(f"{name}=={dist.version}")
    print(f"{args.dest}: linked {len(linked)} distributions from {source}:",
          ", ".join(sorted(linked)))
    print("left out:", ", ".join(sorted(left)))


if __name__ == "__main__":
    main()
