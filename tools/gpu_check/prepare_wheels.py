#!/usr/bin/env python
"""Prepare the folder of wheels that ``tools/gpu_check.sh`` installs on the GPU machine.

The GPU machine has no network and no fvcore, iopath, yacs, pycocotools, omegaconf, hydra,
optuna or detectron2; it has its own CUDA torch / torchvision and many common packages
(``machine_packages.txt``). This step runs HERE (package registries reachable) and writes
DEST (default ``gpu_wheels/``, git-ignored) with:

- ``*.whl``: every dependency of d2kd (``setup.py``: install_requires + the ``test`` extra) and
  of upstream detectron2 (``setup.py`` inside the source tarball), plus ``setuptools<81`` and
  ``wheel`` (detectron2 imports ``pkg_resources``; its build needs both), resolved by pip for
  the target Python (``--python-version``, manylinux x86_64, binary wheels only) with the
  versions of ``requirements/constraints.txt``. Never torch, torchvision or their CUDA
  libraries: the machine's stay. Packages that exist only as source distributions (fvcore,
  antlr4-python3-runtime, ...) are built into wheels here (pure Python: ``*-none-any``).
  Wheels of packages the machine already has are left out (pip keeps the installed ones),
  except small ones (``--small-kib``) and ``FORCE_INCLUDE``, as insurance;
- ``src/``: the detectron2 source tarball (compiled there) and the ``pb1-detectron2==0.6``
  sdist (the pure-Python fallback of ``d2kd.apps.provision`` if the CUDA build fails);
- ``requirements.txt``, ``manifest.json`` (what was carried and what was left to the machine,
  with sizes).

The folder must stay well under the device tool's 64 MiB per call together with the
working tree: ``--limit-mib`` (default 40) fails the step otherwise.

    python tools/gpu_check/prepare_wheels.py [--python-version 3.12] [--dest gpu_wheels]
"""
import argparse
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_D2_SRC = os.path.join(os.path.dirname(REPO), "shared", "third_party",
                              "detectron2-main-02b5c4e.tar.gz")
# Never carried: the machine's own CUDA builds must stay.
EXCLUDE = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# Carried even though the machine has them: detectron2 needs pkg_resources (setuptools < 81)
# and the build needs wheel.
FORCE_INCLUDE = {"setuptools", "wheel"}
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 35)]


def requirement_name(req: str) -> str:
    return canonicalize_name(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def setup_kwargs(source: str) -> dict:
    """The literal keyword arguments install_requires / extras_require of setup(...)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup":
            out = {}
            for kw in node.keywords:
                if kw.arg in ("install_requires", "extras_require"):
                    out[kw.arg] = ast.literal_eval(kw.value)
            return out
    raise ValueError("no setup(...) call found")


def requirements(d2_src: str) -> list:
    with open(os.path.join(REPO, "setup.py")) as f:
        d2kd = setup_kwargs(f.read())
    with tarfile.open(d2_src) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/setup.py")
                      and m.name.count("/") == 1)
        d2 = setup_kwargs(tar.extractfile(member).read().decode())
    reqs = (d2kd["install_requires"] + d2kd.get("extras_require", {}).get("test", [])
            + d2["install_requires"] + ["setuptools<81", "wheel"])
    out = []
    for req in reqs:
        if ";" in req and "python_version<'3.7'" in req.replace(" ", "").replace('"', "'"):
            continue
        if not EXCLUDE.match(requirement_name(req)) and req not in out:
            out.append(req)
    return out


def constraints(path: str) -> list:
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and not EXCLUDE.match(requirement_name(line)):
                out.append(line)
    return out


def run(cmd, **kw):
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kw)


def wheel_name(filename: str) -> str:
    return canonicalize_name(os.path.basename(filename).split("-")[0])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default="3.12",
                   help="target Python (3.12 on the GPU machine)")
    p.add_argument("--dest", default=os.path.join(REPO, "gpu_wheels"))
    p.add_argument("--cache", default="",
                   help="download cache (default build/gpu_check_cache/pyXY)")
    p.add_argument("--detectron2-src", default=os.getenv("DETECTRON2_SRC", DEFAULT_D2_SRC))
    p.add_argument("--limit-mib", type=float, default=40.0)
    p.add_argument("--small-kib", type=float, default=600.0,
                   help="also carry wheels of machine packages up to this size (insurance)")
    p.add_argument("--all", action="store_true",
                   help="carry every wheel (ignore machine_packages.txt)")
    args = p.parse_args(argv)

    pyver = args.python_version
    abi = "cp" + pyver.replace(".", "")
    cache = args.cache or os.path.join(REPO, "build", "gpu_check_cache",
                                       "py" + pyver.replace(".", ""))
    built, downloaded = os.path.join(cache, "built"), os.path.join(cache, "downloaded")
    os.makedirs(built, exist_ok=True)
    os.makedirs(downloaded, exist_ok=True)
    if not os.path.isfile(args.detectron2_src):
        sys.exit(f"error: detectron2 source tarball {args.detectron2_src} not found "
                 "(--detectron2-src)")

    reqs = requirements(args.detectron2_src)
    cons = constraints(os.path.join(REPO, "requirements", "constraints.txt"))
    req_file, con_file = (os.path.join(cache, "requirements.txt"),
                          os.path.join(cache, "constraints.txt"))
    with open(req_file, "w") as f:
        f.write("\n".join(reqs) + "\n")
    with open(con_file, "w") as f:
        f.write("\n".join(cons) + "\n")
    print("requirements:", ", ".join(reqs))

    pip = [sys.executable, "-m", "pip"]
    target = ["--only-binary=:all:", "--python-version", pyver, "--implementation", "cp",
              "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for plat in PLATFORMS:
        target += ["--platform", plat]
    # Source-only packages (no wheel on the index) are built here, then found by --find-links.
    for _ in range(10):
        for old in glob.glob(os.path.join(downloaded, "*")):
            os.remove(old)
        res = run(pip + ["download", *target, "-d", downloaded, "--find-links", built,
                         "-c", con_file, "-r", req_file], capture_output=True)
        sys.stdout.write(res.stdout[-3000:])
        if res.returncode == 0:
            break
        sys.stderr.write(res.stderr[-3000:])
        text = res.stdout + res.stderr
        missing = (re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", text)
                   or re.search(r"The user requested \(constraint\) ([A-Za-z0-9._-]+)==", text))
        if not missing:
            sys.exit("error: pip download failed (see above)")
        name = missing.group(1)
        pin = next((c for c in cons if requirement_name(c) == canonicalize_name(name)), name)
        if any(wheel_name(w) == canonicalize_name(name)
               for w in glob.glob(os.path.join(built, "*.whl"))):
            sys.exit(f"error: {name} was built here already and still cannot be resolved")
        print(f"{name}: no binary wheel for Python {pyver}; building one from source ({pin})")
        if run(pip + ["wheel", "--no-deps", "-w", built, pin]).returncode != 0:
            sys.exit(f"error: could not build a wheel for {pin}")
        for whl in glob.glob(os.path.join(built, "*.whl")):
            if not whl.endswith("-none-any.whl"):
                sys.exit(f"error: {whl} is not a pure-Python wheel: it cannot be built here "
                         f"for Python {pyver} on the GPU machine")
    else:
        sys.exit("error: pip download kept failing")

    machine = set()
    with open(os.path.join(HERE, "machine_packages.txt")) as f:
        machine = {canonicalize_name(l.strip()) for l in f if l.strip() and not l.startswith("#")}

    os.makedirs(args.dest, exist_ok=True)
    for old in glob.glob(os.path.join(args.dest, "*.whl")):
        os.remove(old)
    src_dir = os.path.join(args.dest, "src")
    shutil.rmtree(src_dir, ignore_errors=True)
    os.makedirs(src_dir)
    carried, left = [], []
    for path in sorted(glob.glob(os.path.join(downloaded, "*"))):
        name, size = wheel_name(path), os.path.getsize(path)
        entry = {"file": os.path.basename(path), "name": name, "bytes": size}
        if EXCLUDE.match(name):
            continue
        if (args.all or name not in machine or name in FORCE_INCLUDE
                or size <= args.small_kib * 1024):
            shutil.copy2(path, args.dest)
            carried.append(entry)
        else:
            left.append(entry)
    shutil.copy2(args.detectron2_src, src_dir)
    sdists = [os.path.join(src_dir, os.path.basename(args.detectron2_src))]
    # The pure-Python detectron2 fallback: the sdist d2kd.apps.provision would download.
    pb1 = os.path.join(REPO, "build", "downloads", "pb1-detectron2-0.6.tar.gz")
    if not os.path.isfile(pb1):
        venv_py = os.path.join(REPO, ".venv", "bin", "python")
        py = venv_py if os.path.exists(venv_py) else sys.executable
        run([py, "-c", "from pathlib import Path; "
             "from d2kd.apps.provision.build import download_sdist;"
             f" download_sdist(Path({os.path.dirname(pb1)!r}))"])
    if os.path.isfile(pb1):
        shutil.copy2(pb1, src_dir)
        sdists.append(os.path.join(src_dir, os.path.basename(pb1)))
    else:
        print("warning: no pb1-detectron2-0.6.tar.gz: the pure-Python fallback will be unavailable")
    shutil.copy2(req_file, os.path.join(args.dest, "requirements.txt"))

    total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(args.dest, "**"), recursive=True)
                if os.path.isfile(f))
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    manifest = {
        "python_version": pyver, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repo_commit": commit,
        "requirements": reqs, "carried": carried,
        "left_to_machine": left, "sources": [os.path.basename(s) for s in sdists],
        "total_bytes": total,
    }
    with open(os.path.join(args.dest, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    mib = total / 2**20
    print(f"\ncarried ({len(carried)} wheels):")
    for e in carried:
        print(f"  {e['bytes'] / 2**20:7.2f} MiB  {e['file']}")
    print(f"left to the machine's own packages ({len(left)}):")
    for e in left:
        print(f"  {e['bytes'] / 2**20:7.2f} MiB  {e['file']}")
    print(f"{args.dest}: {mib:.1f} MiB in all (limit {args.limit_mib} MiB)")
    if mib > args.limit_mib:
        sys.exit(f"error: {args.dest} is {mib:.1f} MiB, over --limit-mib {args.limit_mib}")


if __name__ == "__main__":
    main()
