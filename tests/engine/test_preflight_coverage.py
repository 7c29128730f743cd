"""The pre-start check covers the whole run (docs/trust.md): every bad value or combination
below stops in one short line before anything is built, pre-trained or written."""
import json
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, distill_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from d2kd.apps.launch.entry import run_cli
from d2kd.config import ConfigError
from d2kd.config.loading import MAX_LINE
from d2kd.engine.preflight import check_run

GK = "DigitsDet/retinanet_R18_from_R50_gk.yaml"
MTPD = "DigitsDet/retinanet_R18_from_R50_R34_mtpd_mgd.yaml"


def _stops(cfg, pattern: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError, match=pattern) as error:
        check_run(cfg, world_size=world_size)
    message = str(error.value)
    assert "\n" not in message and len(message) <= MAX_LINE
    assert not os.path.exists(cfg.OUTPUT_DIR), "nothing may be written before start"
    return message


@pytest.fixture
def cfg(tiny_digitsdet, tmp_path, teacher_weights):
    return distill_cfg(str(tmp_path / "out"), teacher_weights)


def _gk(tmp_path, teacher_weights):
    cfg = distill_cfg(str(tmp_path / "out"), teacher_weights, heads=("GlobalKnowledgeHead",),
                      config=GK)
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 4.0
    return cfg


@pytest.mark.parametrize("key, value, pattern", [
    ("SOLVER.IMS_PER_BATCH", 0, r"^SOLVER\.IMS_PER_BATCH = 0: must be an integer >= 1\.$"),
    ("SOLVER.BASE_LR", float("nan"), r"^SOLVER\.BASE_LR = nan: must be a finite number > 0\.$"),
    ("SOLVER.MAX_ITER", -5, r"^SOLVER\.MAX_ITER = -5: must be an integer >= 1\.$"),
    ("DATALOADER.SAMPLER_TRAIN", "Random", r"^DATALOADER\.SAMPLER_TRAIN = 'Random': must be one "),
    ("DATALOADER.RANDOM_SUBSET_RATIO", 0.0, r"RANDOM_SUBSET_RATIO = 0\.0: must be a number in "),
    ("INPUT.MIN_SIZE_TRAIN", (), r"^INPUT\.MIN_SIZE_TRAIN = \(\): must be a non-empty list"),
    ("DISTILL.MGD.MASK_RATIO", 1.0,
     r"^DISTILL\.MGD\.MASK_RATIO = 1\.0: must be a number in \[0, 1\)"),
    ("DISTILL.LOGIT.TEMPERATURE", 0.0, r"^DISTILL\.LOGIT\.TEMPERATURE = 0\.0: must be a finite "),
    ("DISTILL.GLOBAL_KNOWLEDGE.TEMPERATURE", -1.0,
     r"^DISTILL\.GLOBAL_KNOWLEDGE\.TEMPERATURE = -1\.0: must be a finite "),
    ("DISTILL.PROTOTYPES.NUM_PROTOTYPES", 0, r"NUM_PROTOTYPES = 0: must be an integer >= 1"),
    ("DISTILL.PROTOTYPES.NUM_PROTOTYPES", -1, r"NUM_PROTOTYPES = -1: must be an integer >= 1"),
])
def test_a_value_out_of_its_range(cfg, key, value, pattern):
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    _stops(cfg, pattern)


def test_a_batch_that_does_not_split_over_the_processes(cfg):
    cfg.SOLVER.IMS_PER_BATCH = 6
    _stops(cfg, r"^SOLVER\.IMS_PER_BATCH = 6 does not split over the 4 processes .*multiple "
                r"of 4\.$", world_size=4)
    check_run(cfg, world_size=3)


def test_a_dataset_without_annotated_images(cfg, tiny_digitsdet, tmp_path):
    coco = json.loads(open(os.path.join(tiny_digitsdet, "val.json")).read())
    coco["annotations"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(coco))
    register_coco_instances("digitsdet_tiny_unannotated", {}, str(path), tiny_digitsdet)
    try:
        cfg.DATASETS.TRAIN = ("digitsdet_tiny_unannotated",)
        _stops(cfg, r"^Training dataset 'digitsdet_tiny_unannotated' has no annotated image "
                    r"\(8 images\): nothing to train on\.$")
    finally:
        DatasetCatalog.remove("digitsdet_tiny_unannotated")
        MetadataCatalog.remove("digitsdet_tiny_unannotated")


def test_a_student_with_another_number_of_classes(cfg):
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    _stops(cfg, r"^MODEL\.RETINANET\.NUM_CLASSES = 5 of the student, but dataset "
                r"'digitsdet_tiny_train' has 10 classes: set it to 10\.$")


def test_a_teacher_with_another_number_of_classes(cfg):
    cfg.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", "80"]
    _stops(cfg, r"^MODEL\.RETINANET\.NUM_CLASSES = 80 of teacher 0 \(.*retinanet_R50_teacher"
                r"\.yaml\), but dataset 'digitsdet_tiny_train' has 10 classes")


def test_no_distillation_heads(cfg):
    cfg.DISTILL.HEADS = []
    _stops(cfg, r"^DISTILL\.HEADS is empty: the run would train the student alone")


def test_a_schedule_stage_without_heads(tiny_digitsdet, tmp_path, teachers):
    from conftest import tiny_training_cfg

    cfg = tiny_training_cfg(MTPD, str(tmp_path / "out"))
    cfg.DISTILL.TEACHER.WEIGHTS = list(teachers)
    cfg.DISTILL.SCHEDULE.STAGE_ITERS = [1, 1]
    cfg.DISTILL.SCHEDULE.STAGE_OPTS = [[], ["DISTILL.HEADS", "[]"]]
    _stops(cfg, r"^DISTILL\.HEADS is empty in stage 1 of the teacher schedule")


def test_a_distillation_config_given_as_teacher(cfg):
    cfg.DISTILL.TEACHER.CONFIGS = [os.path.join(CONFIGS, "DigitsDet",
                                                "retinanet_R18_from_R50_mgd.yaml")]
    _stops(cfg, r"^Teacher 0 \(.*retinanet_R18_from_R50_mgd\.yaml\) is a distillation config; "
                r"a teacher is a detector\. Give the student config its run exported")


def test_a_prototype_filter_that_leaves_no_instance(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = _gk(tmp_path, teacher_weights)
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 1000.0
    _stops(cfg, r"^The prototype instance index is empty: .*MIN_BOX_SIZE = 1000\.0 px")


def test_more_distinct_prototypes_than_instances(tiny_digitsdet, tmp_path, teacher_weights):
    cfg = _gk(tmp_path, teacher_weights)
    cfg.DISTILL.PROTOTYPES.ALLOW_DUPLICATES = False
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 1000
    _stops(cfg, r"^DISTILL\.PROTOTYPES\.NUM_PROTOTYPES = 1000 distinct prototypes .* 10 classes "
                r"have fewer indexed instances \(\(class, instances\): 10, e\.g\. \(0, \d+\)")
    cfg.DISTILL.PROTOTYPES.ALLOW_DUPLICATES = True  # the released behaviour: repeats allowed
    check_run(cfg)


def test_any_exception_of_the_check_is_one_line(capsys):
    def prepare(args):
        raise RuntimeError("line one\n  line two " + "x" * 2000)

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda args: None, prepare, ["--config-file", "unused.yaml"])
    line = str(stop.value.code)
    assert line.startswith("error: RuntimeError: line one line two xxx")
    assert "\n" not in line and len(line) <= len("error: ") + MAX_LINE
    assert line.endswith("... (cut)")


@pytest.mark.slow
def test_train_net_stops_before_any_process_starts(tmp_path):
    """tools/train_net.py --num-gpus 2 with an odd batch: one line, nothing started or written."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_student.yaml"), "--num-gpus", "2",
           "SOLVER.IMS_PER_BATCH", "3", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: SOLVER.IMS_PER_BATCH = 3 does not split over the 2 processes (--num-gpus x "
        "--num-machines): make it a multiple of 2."]
    assert not (tmp_path / "out").exists()


def test_imports_given_on_the_command_line_are_imported(tmp_path, monkeypatch):
    """D2KD.IMPORTS as an override imports its files too (relative to the working folder),
    before the overrides are merged: it is not silently a no-op."""
    from d2kd.config import load_config

    (tmp_path / "extension.py").write_text(
        "from d2kd.config.defaults import register_config_extension\n\n\n"
        "@register_config_extension\n"
        "def add_keys(cfg):\n"
        "    cfg.D2KD.CLI_EXTENSION_KEY = 1\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet", "retinanet_R18_student.yaml"),
                      ["D2KD.IMPORTS", "['extension.py']", "D2KD.CLI_EXTENSION_KEY", "7"])
    assert cfg.D2KD.CLI_EXTENSION_KEY == 7


def _saved_without_semantics(cfg, folder: str) -> None:
    """``folder``/config.yaml as a distillation run of before issue 29 saved it."""
    import yaml
    saved = yaml.safe_load(cfg.dump())
    del saved["DISTILL"]["SEMANTICS"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)


def test_a_distillation_of_the_former_semantics_is_not_resumed(cfg):
    import torch
    _saved_without_semantics(cfg, cfg.OUTPUT_DIR)
    torch.save({"model": {}, "trainer": {}, "iteration": 4},
               os.path.join(cfg.OUTPUT_DIR, "model_0000004.pth"))
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000004.pth")
    with pytest.raises(ConfigError, match=r"trained with DISTILL.SEMANTICS 1 and this d2kd "
                                          r"computes 2 .* would mix two losses") as error:
        check_run(cfg, resume=True)
    assert "\n" not in str(error.value) and len(str(error.value)) <= MAX_LINE


def test_a_finished_run_of_the_former_semantics_no_longer_matches_its_config(cfg, tmp_path):
    from d2kd.config.saved import changed_settings
    distilled, plain = str(tmp_path / "distilled"), str(tmp_path / "plain")
    _saved_without_semantics(cfg, distilled)
    assert changed_settings(os.path.join(distilled, "config.yaml"), cfg) == [
        "DISTILL.SEMANTICS: 1 -> 2"]
    control = cfg.clone()  # no heads: nothing it computes changed, so it still matches
    control.DISTILL.HEADS = []
    _saved_without_semantics(control, plain)
    assert changed_settings(os.path.join(plain, "config.yaml"), control) == []
