"""The public API of docs/api/index.md stays importable, and the tools keep their flags.

The lists below are the record: a name or a flag that goes fails here, and then either comes
back or the CHANGELOG says it went (a new minor version)."""
import importlib
import os
import runpy
import sys

import pytest
from conftest import REPO

#: package -> the names of its ``__all__`` that are public (0.2.0)
PUBLIC = {
    "d2kd.search": ["DISTANCES", "Formula", "Genome", "GenomeError", "KNOWLEDGE_INPUTS",
                    "SLOT_OPS", "WEIGHTS", "apply_formula", "dry_run", "format_genome",
                    "parse_genome"],
    "d2kd.heads": ["DFDHead", "DISTILL_HEAD_REGISTRY", "DetKDSHead", "DistillHead", "FGDHead",
                   "FGFIHead", "FgBgHead", "FitNetHead", "GlobalKnowledgeHead", "LocKDHead",
                   "LogitKDHead", "MGDHead", "StudentTaps", "TeacherOutputs",
                   "build_distill_heads"],
    "d2kd.prototypes": ["PrototypeBank", "batched_box_pool", "box_cells", "box_pool",
                        "coupled_coefficients", "density_candidates", "kmeans_prototypes",
                        "roi_align_mean", "select_prototypes"],
    "d2kd.config": ["ConfigError", "add_d2kd_config", "check_inputs", "get_d2kd_cfg",
                    "load_config", "register_config_extension"],
    "d2kd.engine": ["DistillTrainer"],
    "d2kd.modeling": ["DistillationDetector", "FCOS", "FrozenTeacher", "SegmentationPretext",
                      "build_scalable_resnet_backbone", "build_scalable_resnet_fpn_backbone",
                      "build_swin_fpn_backbone", "deployed_detector", "load_for_evaluation",
                      "load_initialisation", "load_teacher", "scalable_resnet"],
    "d2kd.structures": ["StudentKind", "StudentTapper", "StudentTaps", "TeacherOutputs",
                        "detector_class", "is_dense_detector", "level_id"],
    "d2kd.data": ["HARD_SPEC", "digitsdet_root", "ensure_digitsdet", "register_builtin_datasets",
                  "register_digitsdet"],
    "d2kd.model_zoo": ["DigitsDetPretrainedHandler", "PRETRAINED_PREFIX", "get_config_file",
                       "pretrain_config", "pretrained_backbone_path"],
}
DETECTRON2_FLAGS = ["--config-file", "--resume", "--eval-only", "--num-gpus", "--num-machines",
                    "--machine-rank", "--dist-url"]
#: tool (with its sub-command) -> its public flags
TOOLS = {
    ("train_net.py",): DETECTRON2_FLAGS,
    ("lazy_train_net.py",): DETECTRON2_FLAGS,
    ("search_net.py",): ["--config-file", "--output", "--storage", "--workers", "--trials",
                         "--sampler", "--seed", "--compare", "--plot", "--full-schedule",
                         "--train-proxy-start", "--json", "--markdown"],
    ("certify.py",): ["--seeds", "--splits", "--teacher-seeds", "--output", "--teacher-runs",
                      "--shared", "--threads", "--num-gpus", "--num-machines",
                      "--machine-rank", "--dist-url"],
    ("export_student.py",): ["--format", "--config-file", "--sample-image", "--opts"],
    ("predict.py",): ["--config-file", "--input", "--output", "--confidence-threshold",
                      "--opts"],
    ("benchmark.py", "overhead"): ["--config-file", "--json", "--iters", "--warmup",
                                   "--random-teacher"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_exported_and_importable(package):
    module = importlib.import_module(package)
    assert set(PUBLIC[package]) <= set(module.__all__)
    missing = [name for name in PUBLIC[package] if not hasattr(module, name)]
    assert missing == []


def test_the_api_page_names_every_public_package():
    with open(os.path.join(REPO, "docs", "api", "index.md")) as f:
        page = f.read()
    assert [p for p in PUBLIC if f"[{p}]" not in page] == []


@pytest.mark.parametrize("tool", sorted(TOOLS), ids=" ".join)
def test_tools_keep_their_flags(tool, monkeypatch, capsys):
    """Each tool run as a script with ``--help`` (in this process: argparse prints and
    exits before anything else runs)."""
    script, *command = tool
    path = os.path.join(REPO, "tools", script)
    monkeypatch.setattr(sys, "argv", [path, *command, "--help"])
    with pytest.raises(SystemExit) as end:
        runpy.run_path(path, run_name="__main__")
    assert end.value.code == 0
    out = capsys.readouterr().out
    assert [flag for flag in TOOLS[tool] if flag not in out] == []
