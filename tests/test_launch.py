"""tools/train_net.py in 2 CPU processes (gloo) through d2kd's launch()."""
import os
import subprocess
import sys

from conftest import REPO


def test_two_process_launch_trains_and_evaluates(tiny_digitsdet, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digitsdet),
               OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "DigitsDet", "retinanet_R18_student.yaml"),
        "--num-gpus", "2",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
        "OUTPUT_DIR", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "model_final.pth")
    log = (tmp_path / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    assert "copypaste: AP,AP50" in log
