"""A few training iterations plus COCO evaluation for every detector family."""
import json
import os

import pytest
from conftest import tiny_training_cfg

from d2kd.engine import DistillTrainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "config_file, tasks",
    [
        ("DigitsDet/retinanet_R18_student.yaml", {"bbox"}),
        ("DigitsDet/fcos_R18_student.yaml", {"bbox"}),
        ("DigitsDet/faster_rcnn_R18_student.yaml", {"bbox"}),
        ("DigitsDet/mask_rcnn_R18_student.yaml", {"bbox", "segm"}),
    ],
)
def test_train_and_evaluate(tiny_digitsdet, tmp_path, config_file, tasks):
    cfg = tiny_training_cfg(config_file, str(tmp_path))
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "inference" / "results.json") as f:
        results = json.load(f)  # written by every DistillTrainer evaluation
    assert set(results) == tasks
    for task in tasks:
        assert "AP" in results[task]
    assert os.path.isfile(tmp_path / "model_final.pth")
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    assert any("total_loss" in r and r["iteration"] == cfg.SOLVER.MAX_ITER - 1 for r in records)
    assert any("bbox/AP" in r for r in records), "evaluation results reach metrics.json"
