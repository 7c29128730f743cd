"""The layering of DESIGN.md, checked on the source: one core, applications on top.

- The core never imports an application package (also not inside a function).
- No import cycles between d2kd's packages.
- Library code computes no paths into the git checkout (``tools/``, ``configs/`` next to the
  package): everything a training needs comes with an installed d2kd.
- ``pip install .`` (not editable) into a scratch folder trains a DigitsDet distillation with
  the packaged configs (``d2kd.model_zoo.get_config_file``) and ``python -m
  d2kd.apps.launch.train_net``, from a directory that is not the checkout.

Each checker is also run on a small bad example, so that it is known to fail.
"""
import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import torch
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd.config import load_config
from d2kd.config.teachers import load_teacher_config, teacher_specs

PACKAGE = os.path.join(REPO, "d2kd")
#: the library: d2kd's top-level packages (``search``: the public name of the genome language)
CORE = {"compat", "utils", "structures", "config", "data", "model_zoo", "modeling", "heads",
        "prototypes", "engine", "search"}
#: the applications, each under d2kd/apps/
APPLICATIONS = {"apps.search", "apps.certify", "apps.launch", "apps.collect_env",
                "apps.provision"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(source: str, module: str, is_package: bool) -> Iterator[Tuple[str, int]]:
    """(imported d2kd module, line) for every import in ``source``, relative ones resolved."""
    parts = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None else [target]
            for name in names:
                if name.startswith("d2kd"):
                    yield name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("d2kd"):
                    yield alias.name, node.lineno


def package_of(module: str) -> str:
    """``d2kd.heads.detkds.head`` -> ``heads``; ``d2kd.apps.search.driver`` -> ``apps.search``;
    ``d2kd`` and ``d2kd.apps`` -> ``""``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "apps":
        return f"apps.{parts[2]}" if len(parts) > 2 else ""
    return parts[1] if len(parts) > 1 else ""


def _sources() -> Iterator[Tuple[str, str, bool]]:
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield path, f.read(), name == "__init__.py"


def package_edges(sources) -> Dict[Tuple[str, str], List[str]]:
    """(importing package, imported package) -> where ("file:line")."""
    edges: Dict[Tuple[str, str], List[str]] = {}
    for path, source, is_package in sources:
        module = _module_name(path)
        for target, line in imports_of(source, module, is_package):
            a, b = package_of(module), package_of(target)
            if a and b and a != b:
                edges.setdefault((a, b), []).append(f"{os.path.relpath(path, REPO)}:{line}")
    return edges


def core_to_application(edges) -> List[str]:
    return [f"{a} -> {b} ({', '.join(where)})" for (a, b), where in sorted(edges.items())
            if a in CORE and b in APPLICATIONS]


def package_cycles(edges) -> List[List[str]]:
    """Every cycle of the package graph, each once (as found by a depth-first search)."""
    graph: Dict[str, Set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycles, seen = [], set()

    def visit(node: str, path: List[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle + [nxt])
            elif len(path) < len(graph) + 1:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return cycles


def _is_file_dunder(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "__file__"


def _dirname_depth(node: ast.AST) -> int:
    """How many ``os.path.dirname`` calls wrap ``__file__`` in ``node`` (0: not about it)."""
    if isinstance(node, ast.Call):
        func = node.func
        inner = max((_dirname_depth(a) for a in node.args), default=0)
        if isinstance(func, ast.Attribute) and func.attr == "dirname" and node.args:
            return inner + 1 if inner or any(_mentions_file(a) for a in node.args) else 0
        return inner
    return 0


def _mentions_file(node: ast.AST) -> bool:
    return any(_is_file_dunder(n) for n in ast.walk(node))


def checkout_paths(source: str) -> List[int]:
    """Lines that compute a path outside the module's own package folder from ``__file__``
    (two or more ``dirname``s, ``Path(__file__).parents`` / ``.parent.parent``) or join a
    ``"tools"`` folder into a path."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _dirname_depth(node) >= 2:
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and _mentions_file(node.value) and (
                node.attr == "parents" or (node.attr == "parent" and isinstance(
                    node.value, ast.Attribute) and node.value.attr == "parent")):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "join"
              and any(isinstance(a, ast.Constant) and a.value == "tools" for a in node.args)):
            lines.append(node.lineno)
    return sorted(set(lines))


PROCESS_MODULES = {"subprocess", "multiprocessing", "torch.multiprocessing"}
OS_PROCESS_CALLS = ("system", "popen", "fork", "exec", "spawn", "posix_spawn")


def process_launches(source: str) -> List[int]:
    """Lines that can start a process: imports of ``subprocess`` / ``multiprocessing`` /
    ``torch.multiprocessing`` (or of names from them), and ``os.system``, ``os.popen``,
    ``os.fork``, ``os.exec*``, ``os.spawn*`` calls."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(
                a.name.split(".")[0] in PROCESS_MODULES or a.name in PROCESS_MODULES
                for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and (
                node.module in PROCESS_MODULES or (node.module == "torch" and any(
                    a.name == "multiprocessing" for a in node.names))):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
              and node.func.attr.startswith(OS_PROCESS_CALLS)):
            lines.append(node.lineno)
    return sorted(set(lines))


# ---- the checkers catch what they should -----------------------------------------------------
def test_checkers_find_planted_violations(tmp_path):
    bad = [
        (os.path.join(PACKAGE, "heads", "x.py"), "from ..apps.search.driver import run\n",
         False),
        (os.path.join(PACKAGE, "engine", "y.py"),
         "def f():\n    from d2kd.apps.certify import runs\n", False),
        (os.path.join(PACKAGE, "apps", "search", "z.py"), "from ...heads import DistillHead\n",
         False),
    ]
    edges = package_edges(bad)
    assert core_to_application(edges) == [
        "engine -> apps.certify (d2kd/engine/y.py:2)",
        "heads -> apps.search (d2kd/heads/x.py:1)"]
    assert package_cycles(edges) == [["apps.search", "heads", "apps.search"]]
    assert checkout_paths(
        "import os\nREPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
        "T = os.path.join(REPO, 'tools', 'train_net.py')\n"
        "from pathlib import Path\nP = Path(__file__).resolve().parents[2]\n"
        "Q = Path(__file__).parent.parent\n") == [2, 3, 5, 6]
    # a package's own data folder is fine
    assert checkout_paths(
        "import os\nC = os.path.join(os.path.dirname(__file__), 'configs')\n") == []
    assert process_launches(
        "import subprocess\nimport torch.multiprocessing as mp\nfrom torch import multiprocessing\n"
        "from multiprocessing import Pool\nimport os\nos.system('ls')\nos.execvp('ls', [])\n"
        "os.path.join('a')\nimport torch.distributed as dist\n") == [1, 2, 3, 4, 6, 7]


# ---- the tree ---------------------------------------------------------------------------------
def _entries(folder: str) -> Set[str]:
    return {name[:-3] if name.endswith(".py") else name for name in os.listdir(folder)
            if not name.startswith(("_", ".")) and name != "__pycache__"}


def test_the_tree_shows_the_layers():
    """The library's packages at the top of d2kd/, every application under d2kd/apps/."""
    assert _entries(PACKAGE) - {"apps"} == CORE
    assert {f"apps.{name}" for name in _entries(os.path.join(PACKAGE, "apps"))} == APPLICATIONS


#: file names several packages use, each for the same role in the same layer
SHARED_FILE_NAMES = {"__init__.py", "__main__.py",
                     "registry.py",  # heads/ and heads/detkds/: registries of heads, of ops
                     "report.py"}  # apps/search/ and apps/certify/: an application's tables


def test_no_file_name_repeats_across_packages():
    seen: Dict[str, List[str]] = {}
    for path, _, _ in _sources():
        seen.setdefault(os.path.basename(path), []).append(os.path.relpath(path, REPO))
    assert {name: paths for name, paths in seen.items()
            if len(paths) > 1 and name not in SHARED_FILE_NAMES} == {}


def test_core_never_imports_an_application():
    assert core_to_application(package_edges(_sources())) == []


def test_no_two_packages_import_each_other():
    assert package_cycles(package_edges(_sources())) == []


def test_core_never_launches_processes():
    found = {os.path.relpath(path, REPO): lines for path, source, _ in _sources()
             if package_of(_module_name(path)) in CORE and (lines := process_launches(source))}
    assert found == {}


def test_library_computes_no_paths_into_the_checkout():
    found = {os.path.relpath(path, REPO): lines for path, source, _ in _sources()
             if (lines := checkout_paths(source))}
    assert found == {}


@pytest.mark.slow
def test_application_keys_stay_out_of_model_configs():
    """Without the search application, configs have no DISTILL.DETKDS.SEARCH node, and a config
    that sets one is an error that names the application (a fresh process: the test session
    has imported d2kd.apps.search)."""
    search_config = os.path.join(REPO, "configs", "DigitsDet",
                                 "retinanet_R18_from_R50_detkds_search.yaml")
    code = ("import d2kd\n"
            "from d2kd.config import ConfigError, get_d2kd_cfg, load_config\n"
            "assert 'SEARCH' not in get_d2kd_cfg().DISTILL.DETKDS\n"
            "assert 'GENOME' in get_d2kd_cfg().DISTILL.DETKDS\n"
            "try:\n"
            f"    load_config({search_config!r})\n"
            "except ConfigError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "unknown config key DISTILL.DETKDS.SEARCH" in out
    assert "tools/search_net.py" in out


# ---- an installed (not editable) d2kd trains --------------------------------------------------
@pytest.mark.slow
@pytest.mark.long
def test_non_editable_install_trains_a_distillation_with_packaged_configs(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target",
                    str(site), REPO], check=True, cwd=tmp_path)
    assert (site / "d2kd" / "model_zoo" / "configs" / "DigitsDet").is_dir()
    assert not (site / "d2kd" / "model_zoo" / "configs").is_symlink()
    work = tmp_path / "work"  # not the checkout: no tools/, no configs/
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1",
               DETECTRON2_DATASETS=os.path.join(REPO, "datasets"))
    config = "DigitsDet/retinanet_R18_from_R50_mgd.yaml"
    where = subprocess.run(
        [sys.executable, "-c", "import d2kd, d2kd.model_zoo as z; print(d2kd.__file__); "
         f"print(z.get_config_file({config!r}))"],
        check=True, cwd=work, env=env, capture_output=True, text=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site))
    # the teacher's weights: random, saved where the config's key says
    cfg = load_config(where[1])
    teacher_cfg = load_teacher_config(teacher_specs(cfg)[0], cfg)
    torch.manual_seed(0)
    weights = work / "teacher.pth"
    DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(work)).save("teacher")
    out = work / "out"
    subprocess.run(
        [sys.executable, "-m", "d2kd.apps.launch.train_net", "--config-file", where[1],
         "DISTILL.TEACHER.WEIGHTS", f"['{weights}']", "MODEL.WEIGHTS", "",
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)],
        check=True, cwd=work, env=env, capture_output=True, text=True)
    assert (out / "model_final.pth").is_file()
    assert (out / "model_final_student.yaml").is_file()
