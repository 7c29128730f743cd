"""tools/train_net.py in 2 CPU processes (gloo) through d2kd's launch()."""
import os
import subprocess
import sys

from conftest import REPO


def _launch_two_processes(config_file, output_dir, dataset_root, *opts):
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(dataset_root), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "DigitsDet", config_file),
        "--num-gpus", "2",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", str(output_dir), *opts,
    ]
    proc = subprocess.run(cmd, cwd=output_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (output_dir / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "copypaste: AP,AP50" in log


def test_two_process_launch_trains_and_evaluates(tiny_digitsdet, tmp_path):
    _launch_two_processes("retinanet_R18_student.yaml", tmp_path, tiny_digitsdet)
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_two_process_distillation_trains_evaluates_and_exports(tiny_digitsdet, tmp_path):
    from test_distillation_core import save_untrained_teacher

    weights = save_untrained_teacher("DigitsDet/retinanet_R50_teacher.yaml", tmp_path / "teacher")
    _launch_two_processes("retinanet_R18_from_R50_mgd.yaml", tmp_path, tiny_digitsdet,
                          "DISTILL.TEACHER.WEIGHTS", f"['{weights}']")
    assert os.path.isfile(tmp_path / "model_final_student.pth")
    assert "loss_kd_mgd_feat" in (tmp_path / "metrics.json").read_text()
