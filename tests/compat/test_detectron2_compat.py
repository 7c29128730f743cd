"""The detectron2 capability check and the pure-Python ``_C`` stand-in."""
import importlib
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from d2kd.apps.provision.build import SOURCE_FIXES, apply_source_fixes
from d2kd.compat import has_compiled_extension

needs_standin = pytest.mark.skipif(
    has_compiled_extension(), reason="detectron2 has its compiled extension"
)


@needs_standin
def test_standin_raises_documented_error_for_unsupported_op():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]])
    with pytest.raises(NotImplementedError, match="compiled extension"):
        pairwise_iou_rotated(boxes, boxes)


@needs_standin
def test_standin_defines_every_name_detectron2_imports():
    standin = importlib.import_module("detectron2._C")
    for name in [
        "box_iou_rotated", "deform_conv_forward", "deform_conv_backward_input",
        "deform_conv_backward_filter", "modulated_deform_conv_forward",
        "modulated_deform_conv_backward", "roi_align_rotated_forward",
        "roi_align_rotated_backward", "InstanceAnnotation", "COCOevalEvaluateImages",
        "COCOevalAccumulate", "get_compiler_version", "get_cuda_version",
    ]:
        assert callable(getattr(standin, name)), name
    # Every detectron2 module that imports _C at module level imports.
    for module in ["detectron2.layers.deform_conv", "detectron2.layers.rotated_boxes",
                   "detectron2.layers.roi_align_rotated", "detectron2.evaluation.fast_eval_api"]:
        importlib.import_module(module)


@pytest.mark.slow
@needs_standin
def test_provisioned_detectron2_is_a_real_distribution():
    out = subprocess.run([sys.executable, "-m", "pip", "show", "detectron2"],
                         capture_output=True, text=True, check=True).stdout
    assert "Version: 0.6+purepython" in out


def test_source_fixes_rewrite_removed_aliases_only(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    source = (
        "a = np.bool\nb = np.bool_\nc = np.float\nd = np.float32\ne = np.int\nf = np.int64\n"
        "g = Image.LINEAR\nh = get_norm(norm, 1)\n"
    )
    (package / "m.py").write_text(source * 6)
    counts = apply_source_fixes(package)
    fixed = (package / "m.py").read_text()
    expected = (
        "a = bool\nb = np.bool_\nc = float\nd = np.float32\ne = int\nf = np.int64\n"
        "g = Image.BILINEAR\nh = get_norm(norm, 32)\n"
    )
    assert fixed == expected * 6
    assert sorted(counts.values()) == [6] * len(SOURCE_FIXES)


def test_source_fixes_reject_unexpected_sources(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(RuntimeError, match="unexpected sdist contents"):
        apply_source_fixes(tmp_path)


# Private attributes of objects that are not detectron2's: torch's Module._apply, Optuna's
# trial ids and storage, iopath handler methods d2kd's own handler overrides, os._exit (a
# public function of the standard library).
_NOT_DETECTRON2 = {"_apply", "_trial_id", "_storage", "_get_local_path", "_open", "_exists",
                   "_exit"}


def test_private_detectron2_attributes_are_used_only_in_compat():
    """Outside d2kd/compat/, no ``obj._name`` on anything but ``self``/``cls`` (detectron2's
    private API differs between v0.6 and main: e.g. ``_load_file`` asserts on main)."""
    import ast
    import pathlib

    root = pathlib.Path(REPO)
    found = []
    for path in list((root / "d2kd").rglob("*.py")) + list((root / "tools").glob("*.py")):
        if "compat" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2"):
                found += [f"{path.name}: import {a.name}" for a in node.names
                          if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in _NOT_DETECTRON2
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_padded_size_follows_divisibility_and_square_padding():
    from d2kd.compat.padding import padded_size

    class V06Backbone:  # detectron2 v0.6: size_divisibility only
        size_divisibility = 32

    class SquareBackbone(V06Backbone):  # upstream main, ViTDet / LSJ recipes
        padding_constraints = {"square_size": 256}

    class OverridingBackbone(V06Backbone):
        padding_constraints = {"size_divisibility": 64}

    assert padded_size(V06Backbone(), 144, 190) == (160, 192)
    assert padded_size(SquareBackbone(), 144, 190) == (256, 256)
    assert padded_size(OverridingBackbone(), 144, 190) == (192, 192)
