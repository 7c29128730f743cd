"""A head registered outside d2kd (projects/AttentionKD) runs with tools/train_net.py unchanged."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, save_untrained_teacher

PROJECT_CONFIG = os.path.join(REPO, "projects", "AttentionKD", "configs",
                              "retinanet_R18_from_R50_attention.yaml")


@pytest.mark.slow
def test_project_head_trains_through_train_net(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "teacher")
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digitsdet), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           PROJECT_CONFIG, "MODEL.WEIGHTS", "", "DISTILL.TEACHER.WEIGHTS", f"['{weights}']",
           "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
           "DATALOADER.NUM_WORKERS", "0", "DISTILL.ATTENTION.WEIGHT", "3.0",
           "OUTPUT_DIR", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.json").open()]
    assert any("loss_kd_attention_map" in r for r in records)
    assert any("kd/attention/loss/p3" in r for r in records)
    assert (tmp_path / "run" / "model_final_student.pth").is_file()


def test_project_head_is_zero_for_identical_maps():
    import torch
    from detectron2.utils.events import EventStorage

    from d2kd.config import load_config
    from d2kd.heads import DISTILL_HEAD_REGISTRY, TeacherOutputs
    from d2kd.structures import StudentTaps

    cfg = load_config(PROJECT_CONFIG)  # imports the project, which registers the head
    from detectron2.layers import ShapeSpec

    shapes = {level: ShapeSpec(channels=4, stride=2 ** int(level[1]))
              for level in cfg.DISTILL.IN_FEATURES}
    head = DISTILL_HEAD_REGISTRY.get("AttentionTransferHead")(cfg, shapes, shapes)
    maps = {level: torch.randn(2, 4, 5, 5) for level in cfg.DISTILL.IN_FEATURES}
    other = {level: torch.randn(2, 4, 5, 5) for level in cfg.DISTILL.IN_FEATURES}
    with EventStorage():
        same = head(StudentTaps(features=maps), TeacherOutputs(features=maps))
        diff = head(StudentTaps(features=maps), TeacherOutputs(features=other))
    assert same["loss_kd_attention_map"].item() == 0
    assert diff["loss_kd_attention_map"].item() > 0
