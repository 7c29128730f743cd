#!/usr/bin/env python
"""The runs behind issue 30's numbers (teachers over seeds, what moved the R-34/2 RetinaNet
teacher, the headline certified on the test split) as one queue of jobs that lanes pull in
order, each lane one process with one thread (one lane per core):

    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    .venv-upstream/bin/python benchmarks/citable_numbers.py --lane A &
    .venv-upstream/bin/python benchmarks/citable_numbers.py --lane B &
    .venv-upstream/bin/python benchmarks/citable_numbers.py --list   # what is done, running

``--only JOB ...`` runs those jobs and what they depend on; the lanes, claims and reuse of
finished work are benchmarks/job_queue.py's. Every training evaluates on val (the split that
chooses); ``eval_*`` jobs evaluate the finished models on test (the split that reports).
Result files land in OUT; the committed copies are listed in benchmarks/README.md.
"""
import os
import sys
from typing import List

from job_queue import REPO, Job, accuracy, main

S = "configs/DigitsDet"
H = "configs/DigitsDetHard"
SEEDS = (0, 1, 2)
#: (job name, config, backbone, the path distillation configs read the teacher from)
TEACHERS = (
    ("retinanet_R34", f"{S}/retinanet_R34_teacher.yaml", "R34_FPN96",
     "digitsdet/retinanet_R34_teacher"),
    ("retinanet_R50", f"{S}/retinanet_R50_teacher.yaml", "R50_FPN128",
     "digitsdet/retinanet_R50_teacher"),
    ("faster_rcnn_R50", f"{S}/faster_rcnn_R50_teacher.yaml", "R50_FPN128",
     "digitsdet/faster_rcnn_R50_teacher"),
    ("faster_rcnn_R34", f"{S}/faster_rcnn_R34_teacher.yaml", "R34_FPN96",
     "digitsdet/faster_rcnn_R34_teacher"),
    ("hard_retinanet_R50", f"{H}/retinanet_R50_teacher.yaml", "R50_FPN128",
     "digitsdet_hard/retinanet_R50_teacher"),
    ("hard_retinanet_R34", f"{H}/retinanet_R34_teacher.yaml", "R34_FPN96",
     "digitsdet_hard/retinanet_R34_teacher"),
)
#: the headline, certified at the teachers' budget of 1,000 iterations: (name, config, teacher
#: job, split); the 600-iteration configs are stretched by BUDGET
FROM_R50 = ("mgd", "dfd", "gk", "detkds_searched")
#: rows of the DigitsDet pairs only (issue 29): the FGD baseline and the released DetKDS
#: distiller of each detector
EXTRA_FROM_R50 = ("fgd", "detkds")
HEADLINE = (
    [(f"retinanet_{m}", f"{S}/retinanet_R18_from_R50_{m}.yaml", "retinanet_R50", "digitsdet")
     for m in FROM_R50 + EXTRA_FROM_R50]
    + [("retinanet_best", f"{S}/retinanet_R18_from_R34_detkds_searched_gk_1000.yaml",
        "retinanet_R34", "digitsdet")]
    + [(f"faster_rcnn_{m}", f"{S}/faster_rcnn_R18_from_R50_{m}.yaml", "faster_rcnn_R50",
        "digitsdet") for m in FROM_R50 + EXTRA_FROM_R50]
    + [("faster_rcnn_best", f"{S}/faster_rcnn_R18_from_R34_detkds_searched_gk_1000.yaml",
        "faster_rcnn_R34", "digitsdet")]
    + [(f"hard_retinanet_{m}", f"{H}/retinanet_R18_from_R50_{m}.yaml", "hard_retinanet_R50",
        "digitsdet_hard") for m in FROM_R50]
    + [("hard_retinanet_best", f"{H}/retinanet_R18_from_R34_detkds_searched_gk_1000.yaml",
        "hard_retinanet_R34", "digitsdet_hard")])
#: certificates of the methods issue 29 changed or added (DetKDS ops, global knowledge's
#: release defaults, FGD): queued last, after every teacher and the MGD / DFD certificates
AFTER_FAITHFUL = ("_gk", "_detkds_searched", "_best", "_fgd", "_detkds")
BUDGET = ["SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "400"]
#: the commit that measured the R-34/2 RetinaNet teacher at 48.32
#: (benchmarks/digitsdet/teachers_R34.md)
COMMIT_48_32 = "681eb3828734cb9ca8a32abe56f8032339e4fc72"
V06_PYTHON = os.path.join(REPO, ".venv", "bin", "python")


def data_of(config: str) -> str:
    """The dataset family a config trains on."""
    return "digitsdet_hard" if config.startswith(H) else "digitsdet"


def teachers_folder(config: str) -> str:
    return "teachers_hard" if config.startswith(H) else "teachers"


def teacher_run(out: str, config: str, seed: int) -> str:
    return f"{out}/{teachers_folder(config)}/{os.path.basename(config)[:-5]}/seed{seed}"


def evaluate(config: str, run: str, dataset: str) -> List[str]:
    """Evaluate a finished run's ``model_final.pth`` on ``dataset`` into ``RUN/eval/DATASET``
    (``inference/results.json``), as a user would with ``--eval-only``."""
    return [sys.executable, "-m", "d2kd.apps.launch.train_net", "--config-file", config,
            "--eval-only", "MODEL.WEIGHTS", f"{run}/model_final.pth",
            "DATASETS.TEST", f"('{dataset}',)", "OUTPUT_DIR", f"{run}/eval/{dataset}"]


def old_commit_run(out: str) -> List[str]:
    """The R-34/2 RetinaNet teacher, seed 0, trained by the code of COMMIT_48_32 on the v0.6
    build in a worktree of its own (its own DigitsDet copy and pre-trained backbone)."""
    tree = f"{REPO}/{out}/commit_681eb38"
    script = (f"test -d {tree} || git -C {REPO} worktree add --detach {tree} {COMMIT_48_32}; "
              f"cd {tree} && PYTHONPATH={tree} DETECTRON2_DATASETS={tree}/datasets "
              f"{V06_PYTHON} tools/benchmark.py accuracy --threads 1 --seeds 0 --configs "
              f"{S}/retinanet_R34_teacher.yaml --output {tree}/runs "
              f"--json {REPO}/{out}/r34_commit_681eb38.json "
              f"--markdown {REPO}/{out}/r34_commit_681eb38.md")
    return ["bash", "-c", script]


def certify_jobs(out: str, name: str, config: str, teacher: str, teacher_config: str,
                 data: str) -> List[Job]:
    """``certify`` of one headline config on test and val, in two jobs: ``students_NAME``
    trains and evaluates the distilled and control students as soon as the teacher's seed-0
    run (the one distilled from) is done; ``certify_NAME`` repeats the command with the
    teacher's three runs, reusing every student run, once all three are done."""
    runs = [teacher_run(out, teacher_config, k) for k in SEEDS]
    budget = [] if config.endswith("_1000.yaml") else BUDGET
    command = [sys.executable, "-m", "d2kd.apps.certify", config, "--seeds", str(len(SEEDS)),
               "--splits", f"{data}_test", f"{data}_val", "--output", f"{out}/certify/{name}",
               "--threads", "1"]
    return [Job(f"students_{name}", (f"teacher_{teacher}_seed0", "pretrain_R18_FPN64"),
                [command + budget]),
            Job(f"certify_{name}", (f"students_{name}", f"teacher_{teacher}"),
                [command + ["--teacher-runs", *runs] + budget])]


def jobs(out: str) -> List[Job]:
    """The queue, in the order lanes take it (every job after its dependencies)."""
    deferred: List[Job] = []
    queue = [Job(f"pretrain_{name}", (),
                 [[sys.executable, "-m", "d2kd.apps.launch.pretrain", name]])
             for name in ("R34_FPN96", "R50_FPN128", "R18_FPN64")]
    r34 = TEACHERS[0][1]
    # What moved the R-34/2 RetinaNet teacher (48.32 -> 43.79): the v0.6 build on today's code,
    # and the code of the commit that measured 48.32 (v0.6) -- beside the seeds below.
    queue.append(Job("r34_v06_build", ("pretrain_R34_FPN96",), [[
        V06_PYTHON, "tools/benchmark.py", "accuracy", "--threads", "1", "--seeds", "0",
        "--configs", r34, "--output", f"{out}/teachers_v06", "--json", f"{out}/r34_v06.json",
        "--markdown", f"{out}/r34_v06.md"]]))
    for name, config, backbone, link in TEACHERS:
        parts = []
        for seed in SEEDS:
            part = f"teacher_{name}_seed{seed}"
            run = teacher_run(out, config, seed)
            queue.append(Job(part, (f"pretrain_{backbone}",), [
                accuracy(out, [config], [seed], teachers_folder(config), f"parts/{part}"),
                evaluate(config, run, f"{data_of(config)}_test")],
                [(link, run)] if seed == 0 else []))
            parts.append(part)
            if name == "retinanet_R34" and seed == 0:
                queue.append(Job("r34_commit_681eb38", (), [old_commit_run(out)]))
        queue.append(Job(f"teacher_{name}", tuple(parts), [
            accuracy(out, [config], list(SEEDS), teachers_folder(config), f"teacher_{name}",
                     plot=True)]))
        # the certificates against this teacher come next: each needs only its own teacher
        for student, student_config, teacher, data in HEADLINE:
            if teacher == name:
                certify = certify_jobs(out, student, student_config, name, config, data)
                (deferred if student.endswith(AFTER_FAITHFUL) else queue).extend(certify)
    return queue + deferred


if __name__ == "__main__":
    main(__doc__.splitlines()[0], jobs, "output/bench30")
