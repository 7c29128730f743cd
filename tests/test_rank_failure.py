"""One rank's failure ends every rank within a minute, with its error shown (docs/trust.md).

Two "machines" on this host (``--num-machines 2``, one process each, separate launchers: no
common parent to end them), a failure injected on rank 1 through ``D2KD.IMPORTS`` at three
places where rank 0 then waits in a collective: a prototype refresh, the teacher-ordering
reduction and a stage switch."""
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from d2kd.compat.cpu_distributed import free_local_port

pytestmark = [pytest.mark.slow, pytest.mark.long]

FAULTS = {
    "prototype_refresh": ("d2kd.prototypes.refresh", "PrototypeRefresher", "refresh",
                          "retinanet_R18_from_R50_gk.yaml", []),
    "teacher_ordering": ("d2kd.engine.stages", "TeacherScheduleHook", "_probe_order",
                         "retinanet_R18_from_R50_R34_mtpd_mgd.yaml",
                         ["DISTILL.SCHEDULE.ORDER", "adaptation_cost"]),
    "stage_switch": ("d2kd.engine.stages", "TeacherScheduleHook", "switch",
                     "retinanet_R18_from_R50_R34_mtpd_mgd.yaml", []),
}
FAULT_FILE = """
from detectron2.utils import comm
from {module} import {cls}

_original = {cls}.{method}


def _failing(self, *args, **kwargs):
    first_stage_build = "{method}" == "switch" and args and args[0] == 0
    if comm.get_rank() == 1 and not first_stage_build:
        raise RuntimeError("injected failure in {name}")
    return _original(self, *args, **kwargs)


{cls}.{method} = _failing
"""


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_failure_on_rank_1_stops_rank_0_within_a_minute(name, tiny_digitsdet, teachers,
                                                          tmp_path):
    module, cls, method, config, opts = FAULTS[name]
    fault = tmp_path / "fault.py"
    fault.write_text(FAULT_FILE.format(module=module, cls=cls, method=method, name=name))
    weights = str(list(teachers)) if "mtpd" in config else f"['{teachers[0]}']"
    port = free_local_port()
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digitsdet),
               OMP_NUM_THREADS="1")
    launchers = []
    for machine in (0, 1):
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
               os.path.join(REPO, "configs", "DigitsDet", config), "--num-gpus", "1",
               "--num-machines", "2", "--machine-rank", str(machine),
               "--dist-url", f"tcp://127.0.0.1:{port}",
               "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
               "DATALOADER.NUM_WORKERS", "0", "MODEL.WEIGHTS", "",
               "DISTILL.TEACHER.WEIGHTS", weights, "DISTILL.PROTOTYPES.MIN_BOX_SIZE", "4.0",
               "D2KD.IMPORTS", f"['{fault}']", "OUTPUT_DIR", str(tmp_path / "out"), *opts]
        if "mtpd" in config:
            cmd += ["DISTILL.SCHEDULE.STAGE_ITERS", "[2, 2]"]
        # output to files: an undrained pipe fills (64 KB of logs) and blocks the writer
        output = open(tmp_path / f"machine{machine}.txt", "w")
        launchers.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=output,
                                          stderr=subprocess.STDOUT, text=True))
        output.close()  # the child holds its own descriptor
    ended = {}
    deadline = time.monotonic() + 1200  # a hang guard; the claim is the 60 s below
    while len(ended) < 2 and time.monotonic() < deadline:
        for machine, proc in enumerate(launchers):
            if machine not in ended and proc.poll() is not None:
                ended[machine] = time.monotonic()
        time.sleep(0.5)
    for proc in launchers:
        if proc.poll() is None:
            proc.kill()
    for proc in launchers:
        proc.wait()
    errors = [(tmp_path / f"machine{machine}.txt").read_text() for machine in (0, 1)]
    assert sorted(ended) == [0, 1], f"a launcher did not end: {errors[0][-2000:]}"
    assert all(proc.returncode != 0 for proc in launchers), [e[-1500:] for e in errors]
    assert f"RuntimeError: injected failure in {name}" in errors[1]
    assert (f"d2kd: rank 0 stops because rank 1 failed: RuntimeError: injected failure in "
            f"{name}") in errors[0], errors[0][-3000:]
    assert ended[0] - ended[1] < 60
