"""tools/train_net.py in 2 CPU processes (gloo) through d2kd's launch()."""
import os

import pytest
from conftest import launch_two_processes, save_untrained_teacher

pytestmark = pytest.mark.slow


@pytest.mark.long
def test_two_process_launch_trains_and_evaluates(tiny_digitsdet, tmp_path):
    launch_two_processes("retinanet_R18_student.yaml", tmp_path, tiny_digitsdet)
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_two_process_distillation_trains_evaluates_and_exports(tiny_digitsdet, tmp_path):
    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "teacher")
    launch_two_processes("retinanet_R18_from_R50_mgd.yaml", tmp_path, tiny_digitsdet,
                         "DISTILL.TEACHER.WEIGHTS", f"['{weights}']")
    assert os.path.isfile(tmp_path / "model_final_student.pth")
    assert "loss_kd_mgd_feat" in (tmp_path / "metrics.json").read_text()
