#!/usr/bin/env python
"""Every run behind issue 19's numbers (docs/detkds_search.md "under the clean proxy",
docs/toward_the_teacher.md, the DigitsDetHard robustness table) as one queue of jobs that
lanes pull in order, each lane one process with one thread (one lane per core):

    export OMP_NUM_THREADS=1
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --lane A &
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --lane B &
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --list   # what is done, running

``--only JOB ...`` runs those jobs and what they depend on. A lane claims a job by creating
``OUT/claims/JOB`` (atomic ``mkdir``), waits for the job's dependencies to be done, runs it
and marks it ``OUT/done/JOB`` (or ``OUT/failed/JOB``). Every job reuses finished work
(pre-trained backbones, finished runs, finished search trials). A lane stopped with SIGTERM or
Ctrl-C stops its job's processes and gives its claim back, so starting the lanes again goes on
where they were; after a hard kill (SIGKILL, a lost machine) remove the claims of the jobs
that are not done first. Result files land in OUT; the committed copies are
listed in benchmarks/README.md.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = "configs/DigitsDet"
H = "configs/DigitsDetHard"


@dataclass
class Job:
    name: str
    deps: Tuple[str, ...]
    commands: List[List[str]]
    # (link under output/, target under OUT): where configs expect a run (teacher weights,
    # the proxy's starting checkpoint)
    links: List[Tuple[str, str]] = field(default_factory=list)


def accuracy(out: str, configs: Sequence[str], seeds: Sequence[int], parent: str,
             result: str, plot: bool = False) -> List[str]:
    """A ``tools/benchmark.py accuracy`` command writing OUT/RESULT.{json,md}[,png]."""
    command = [sys.executable, "tools/benchmark.py", "accuracy", "--threads", "1",
               "--seeds", *map(str, seeds), "--configs", *configs,
               "--output", f"{out}/{parent}", "--json", f"{out}/{result}.json",
               "--markdown", f"{out}/{result}.md"]
    return command + (["--plot", f"{out}/{result}.png"] if plot else [])


def search(out: str, sampler: str, seed: int, config: str, folder: str, trials: int,
           overrides: Sequence[str] = ()) -> List[str]:
    return [sys.executable, "tools/search_net.py", "--config-file", config,
            "--output", f"{out}/{folder}/{sampler}-seed{seed}", "--workers", "1",
            "--trials", str(trials), "--sampler", sampler, "--seed", str(seed),
            "DISTILL.DETKDS.SEARCH.INPUTS", "['global']", "DISTILL.DETKDS.SEARCH.POPULATION", "8",
            *overrides]


def winner_fidelity(out: str, name: str, search_config: str, config: str, search_dir: str,
                    proxy_variant: Sequence[str] = ()) -> List[str]:
    """Proxy trial + full schedule (2 seeds) of a search's winner (read when the job runs);
    ``proxy_variant``: NAME KEY VALUE ... of the proxy the search ran with."""
    variant = f" --proxy-variant {' '.join(proxy_variant)}" if proxy_variant else ""
    with_genome = (f'exec "$0" tools/benchmark.py proxy-fidelity --search-config {search_config} '
                   f'--config-file {config} --genomes "$(cat {out}/{search_dir}/best_genome.txt)" '
                   f"--seeds 0 1 --output {out}/fidelity_{name} --json {out}/fidelity_{name}.json "
                   f"--markdown {out}/fidelity_{name}.md{variant}")
    return ["bash", "-c", with_genome, sys.executable]


def jobs(out: str) -> List[Job]:
    """The queue, in the order lanes take it (every job after its dependencies)."""
    student, teacher = f"{S}/retinanet_R18_student.yaml", f"{S}/retinanet_R50_teacher.yaml"
    search_cfg = f"{S}/retinanet_R18_from_R50_detkds_search.yaml"
    searched = f"{S}/retinanet_R18_from_R50_detkds_searched.yaml"
    frcnn_search_cfg = f"{S}/faster_rcnn_R18_from_R50_detkds_search.yaml"
    frcnn_searched = f"{S}/faster_rcnn_R18_from_R50_detkds_searched.yaml"

    def run_of(parent: str, config: str) -> str:  # a config's seed-0 run under OUT/parent
        return f"{out}/{parent}/{os.path.basename(config)[:-5]}/seed0"

    queue = [
        Job(f"pretrain_{name}", (), [[sys.executable, "-m", "d2kd.launch.pretrain", name]])
        for name in ("R50_FPN128", "R18_FPN64", "R34_FPN96")
    ]
    queue += [
        Job("student_retinanet", ("pretrain_R18_FPN64",),
            [accuracy(out, [student], [0], "runs", "student_retinanet_seed0")],
            [("digitsdet/retinanet_R18_student", run_of("runs", student))]),
        Job("student_faster_rcnn", ("pretrain_R18_FPN64",),
            [accuracy(out, [f"{S}/faster_rcnn_R18_student.yaml"], [0], "runs",
                      "student_faster_rcnn_seed0")],
            [("digitsdet/faster_rcnn_R18_student",
              run_of("runs", f"{S}/faster_rcnn_R18_student.yaml"))]),
    ]
    for name, config, link in (
            ("teacher_retinanet", teacher, "digitsdet/retinanet_R50_teacher"),
            ("teacher_faster_rcnn", f"{S}/faster_rcnn_R50_teacher.yaml",
             "digitsdet/faster_rcnn_R50_teacher"),
            ("teacher_retinanet_R34", f"{S}/retinanet_R34_teacher.yaml",
             "digitsdet/retinanet_R34_teacher"),
            ("teacher_faster_rcnn_R34", f"{S}/faster_rcnn_R34_teacher.yaml",
             "digitsdet/faster_rcnn_R34_teacher"),
            ("teacher_hard", f"{H}/retinanet_R50_teacher.yaml",
             "digitsdet_hard/retinanet_R50_teacher"),
            ("teacher_hard_R34", f"{H}/retinanet_R34_teacher.yaml",
             "digitsdet_hard/retinanet_R34_teacher")):
        backbone = "pretrain_R34_FPN96" if "R34" in config else "pretrain_R50_FPN128"
        parent = "runs_hard" if config.startswith(H) else "teachers"
        queue.append(Job(name, (backbone,), [accuracy(out, [config], [0], parent, name)],
                         [(link, run_of(parent, config))]))
    retina_proxy = ("teacher_retinanet", "student_retinanet")
    queue += [
        Job(f"search_{sampler}{seed}", retina_proxy,
            [search(out, sampler, seed, search_cfg, "search", 40)])
        for seed in (1, 0) for sampler in ("ga", "random")
    ]
    # the same arms with the 200-iteration proxy (docs/detkds_search.md (b): the variant that
    # ranks the best genomes)
    proxy200 = ["DISTILL.DETKDS.SEARCH.PROXY_ITERS", "200",
                "DISTILL.DETKDS.SEARCH.PROXY_WARMUP_ITERS", "40"]
    queue += [
        Job(f"search200_{sampler}{seed}", retina_proxy,
            [search(out, sampler, seed, search_cfg, "search200", 40, proxy200)])
        for seed in (0, 1) for sampler in ("ga", "random")
    ]
    queue.append(Job("search_faster_rcnn", ("teacher_faster_rcnn", "student_faster_rcnn"),
                     [search(out, "ga", 0, frcnn_search_cfg, "search_faster_rcnn", 24)]))
    queue.append(Job("winner_faster_rcnn", ("search_faster_rcnn",),
                     [winner_fidelity(out, "faster_rcnn", frcnn_search_cfg, frcnn_searched,
                                      "search_faster_rcnn/ga-seed0")]))
    queue += [
        Job(f"winner_{sampler}{seed}", (f"search_{sampler}{seed}",),
            [winner_fidelity(out, f"{sampler}{seed}", search_cfg, searched,
                             f"search/{sampler}-seed{seed}")])
        for seed in (1, 0) for sampler in ("ga", "random")
    ]
    queue += [
        Job(f"winner200_{sampler}{seed}", (f"search200_{sampler}{seed}",),
            [winner_fidelity(out, f"200_{sampler}{seed}", search_cfg, searched,
                             f"search200/{sampler}-seed{seed}", ["iters200", *proxy200])])
        for seed in (0, 1) for sampler in ("ga", "random")
    ]
    # Variants of the proxy against the committed fidelity genomes' full-schedule APs
    # (only the variant's proxy trials run).
    fidelity = "benchmarks/detkds/holdout/proxy_fidelity.json"
    with open(os.path.join(REPO, fidelity)) as f:
        fidelity_genomes = [row["genome"] for row in json.load(f)["rows"]]
    clean_start = f"{out}/runs/retinanet_R18_student_proxy_train/model_0000199.pth"
    queue.append(Job("proxy_start_clean", ("pretrain_R18_FPN64",), [[
        sys.executable, "tools/search_net.py", "--config-file", search_cfg,
        "--train-proxy-start", student, "DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS", clean_start]]))
    for variant, overrides, deps in (
            ("iters200", ["DISTILL.DETKDS.SEARCH.PROXY_ITERS", "200",
                          "DISTILL.DETKDS.SEARCH.PROXY_WARMUP_ITERS", "40"], retina_proxy),
            ("cleanstart", ["DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS", clean_start],
             ("teacher_retinanet", "proxy_start_clean"))):
        queue.append(Job(f"proxy_{variant}", deps, [[
            sys.executable, "tools/benchmark.py", "proxy-fidelity", "--search-config", search_cfg,
            "--config-file", searched, "--genomes", *fidelity_genomes, "--seeds", "0", "1",
            "--output", f"{out}/fidelity", "--json", f"{out}/proxy_fidelity_{variant}.json",
            "--markdown", f"{out}/proxy_fidelity_{variant}.md",
            "--plot", f"{out}/proxy_fidelity_{variant}.png", "--full-schedule-from", fidelity,
            "--proxy-variant", variant, *overrides]]))
    # Toward the teacher (docs/toward_the_teacher.md): one job per (config, seed).
    ladder = [(f"{S}/retinanet_R18_from_R50_detkds_searched_gk.yaml", ("teacher_retinanet",)),
              (f"{S}/retinanet_R18_from_R50_detkds_searched_gk_1000.yaml",
               ("teacher_retinanet",)),
              (f"{S}/retinanet_R18_from_R34_detkds_searched_gk.yaml", ("teacher_retinanet_R34",)),
              (f"{S}/retinanet_R18_from_R34_detkds_searched_gk_1000.yaml",
               ("teacher_retinanet_R34",)),
              (f"{S}/retinanet_R18_student_1000.yaml", ("pretrain_R18_FPN64",))]
    frcnn_ladder = [
        (f"{S}/faster_rcnn_R18_student.yaml", ("student_faster_rcnn",)),  # its seed 0 reused
        (f"{S}/faster_rcnn_R18_from_R50_detkds_searched_gk.yaml", ("teacher_faster_rcnn",)),
        (f"{S}/faster_rcnn_R18_from_R50_detkds_searched_gk_1000.yaml", ("teacher_faster_rcnn",)),
        (f"{S}/faster_rcnn_R18_from_R34_detkds_searched_gk_1000.yaml",
         ("teacher_faster_rcnn_R34",)),
        (f"{S}/faster_rcnn_R18_student_1000.yaml", ("pretrain_R18_FPN64",))]
    # Robustness (DigitsDetHard) and the same comparison on DigitsDet, on one build: the
    # single methods at 600 iterations, then the ladder's best recipe and the student alone at
    # its budget, each after its teacher. On DigitsDet the student's seed-0 run is
    # student_retinanet's and the last two rows are the ladder's (same folders: reused).
    single = ["retinanet_R18_student", "retinanet_R18_from_R50_mgd", "retinanet_R18_from_R50_gk",
              "retinanet_R18_from_R50_dfd", "retinanet_R18_from_R50_detkds_searched"]
    best = ["retinanet_R18_student_1000", "retinanet_R18_from_R34_detkds_searched_gk_1000"]
    hard_deps = {n: ("teacher_hard",) for n in single}
    hard_deps.update({best[0]: ("pretrain_R18_FPN64",), best[1]: ("teacher_hard_R34",)})
    groups = {
        "ladder": ([c for c, _ in ladder], "runs", dict(ladder)),
        "ladder_faster_rcnn": ([c for c, _ in frcnn_ladder], "runs", dict(frcnn_ladder)),
        "headline_hard": ([f"{H}/{n}.yaml" for n in single + best], "runs_hard",
                          {f"{H}/{n}.yaml": deps for n, deps in hard_deps.items()}),
        "headline": ([f"{S}/{n}.yaml" for n in single + best], "runs",
                     {**{f"{S}/{n}.yaml": ("teacher_retinanet", "student_retinanet")
                         for n in single},
                      **{f"{S}/{n}.yaml": ("ladder",) for n in best}}),
    }
    for group, (configs, parent, dep_of) in groups.items():
        parts = []
        for config in configs:
            for seed in (0, 1):
                part = f"{group}_{os.path.basename(config)[:-5]}_seed{seed}"
                queue.append(Job(part, dep_of[config],
                                 [accuracy(out, [config], [seed], parent, f"parts/{part}")]))
                parts.append(part)
        # the table: every run above, reused
        queue.append(Job(group, tuple(parts),
                         [accuracy(out, configs, [0, 1], parent, group, plot=True)]))
    # Does the DigitsDet ranking hold on DigitsDetHard?
    queue.append(Job("robustness", ("headline", "headline_hard"), [[
        sys.executable, "tools/benchmark.py", "ranking", "--inputs",
        f"DigitsDet={out}/headline.json", f"DigitsDetHard={out}/headline_hard.json",
        "--baseline", "retinanet_R18_student", "--methods", *single[1:],
        "--json", f"{out}/robustness.json", "--markdown", f"{out}/robustness.md",
        "--plot", f"{out}/robustness.png"]]))
    return queue


def closure(queue: List[Job], names: Sequence[str]) -> List[Job]:
    """``names`` and everything they depend on, in queue order."""
    by_name: Dict[str, Job] = {job.name: job for job in queue}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"Unknown job(s) {unknown}; --list shows the queue.")
    wanted, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].deps)
    return [job for job in queue if job.name in wanted]


def _run_job_command(command: List[str], log) -> int:
    """Run one command in its own process group; a SIGTERM or Ctrl-C to the lane stops the
    whole group (the training processes and their data loader workers) before the lane ends,
    so no orphan goes on writing into a run that a restarted lane resumes."""
    child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        return child.wait()
    except BaseException:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        raise


def run_lane(lane: str, queue: List[Job], out: str) -> None:
    for sub in ("claims", "done", "failed", "logs"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    # SIGTERM ends the lane as Ctrl-C does: through the cleanup below
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def marked(kind: str, name: str) -> bool:
        return os.path.exists(os.path.join(out, kind, name))

    def mark(kind: str, name: str, text: str = "") -> None:
        with open(os.path.join(out, kind, name), "w") as f:
            f.write(text)
        print(f"[{time.strftime('%H:%M')}] lane {lane}: {name} {kind}", flush=True)

    for job in queue:
        if marked("done", job.name) or marked("failed", job.name):
            continue
        claim = os.path.join(out, "claims", job.name)
        try:
            os.mkdir(claim)
        except FileExistsError:  # another lane has it
            continue
        try:
            while not all(marked("done", d) for d in job.deps):
                if any(marked("failed", d) for d in job.deps):
                    break
                time.sleep(20)
            if any(marked("failed", d) for d in job.deps):
                mark("failed", job.name, "a dependency failed\n")
                continue
            print(f"[{time.strftime('%H:%M')}] lane {lane}: {job.name} started", flush=True)
            with open(os.path.join(out, "logs", f"{job.name}.log"), "a") as log:
                codes = [_run_job_command(c, log) for c in job.commands]
        except KeyboardInterrupt:
            os.rmdir(claim)
            print(f"[{time.strftime('%H:%M')}] lane {lane}: stopped, {job.name} given back",
                  flush=True)
            raise SystemExit(130)
        if any(codes):
            mark("failed", job.name, f"exit codes {codes}, see logs/{job.name}.log\n")
            continue
        for link, target in job.links:
            path = os.path.join(REPO, "output", link)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(os.path.join(REPO, target), path)
        mark("done", job.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lane", default="A", help="this lane's name (in the progress lines)")
    parser.add_argument("--output", default="output/bench19", help="OUT (relative to the repo)")
    parser.add_argument("--only", nargs="+", default=[], help="these jobs and their dependencies")
    parser.add_argument("--list", action="store_true", help="print the queue and its state")
    args = parser.parse_args()
    queue = jobs(args.output)
    if args.only:
        queue = closure(queue, args.only)
    out = os.path.join(REPO, args.output)
    if args.list:
        for job in queue:
            states = [state for state, folder in (("done", "done"), ("failed", "failed"),
                                                  ("claimed", "claims"))
                      if os.path.exists(os.path.join(out, folder, job.name))]
            print(f"{job.name:60s} {(states or ['to do'])[0]}")
        return
    run_lane(args.lane, queue, out)


if __name__ == "__main__":
    main()
