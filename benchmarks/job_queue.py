"""The job runner behind the benchmark queues (beyond_the_teacher.py, citable_numbers.py):
jobs with dependencies that lanes pull in order, each lane one process with one thread.

A lane takes the first job in queue order whose dependencies are done (a job waiting for
another lane's run does not hold a lane idle), claims it by creating ``OUT/claims/JOB``
(atomic ``mkdir``), runs it and marks it ``OUT/done/JOB`` (or ``OUT/failed/JOB``, and so
every job that depends on it). Every
job reuses finished work, so starting the lanes again goes on where they were. A lane stopped
with SIGTERM or Ctrl-C stops its job's processes and gives its claim back; after a hard kill
(SIGKILL, a lost machine) remove the claims of the jobs that are not done first.
"""
import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    while True:
        open_jobs = [job for job in queue if not (marked("done", job.name)
                                                  or marked("failed", job.name)
                                                  or marked("claims", job.name))]
        if not open_jobs:
            return
        job = next((j for j in open_jobs
                    if all(marked("done", d) or marked("failed", d) for d in j.deps)), None)
        if job is None:  # every open job waits for a job another lane runs
            time.sleep(20)
            continue
        claim = os.path.join(out, "claims", job.name)
        try:
            os.mkdir(claim)
        except FileExistsError:  # another lane took it meanwhile
            continue
        if any(marked("failed", d) for d in job.deps):
            mark("failed", job.name, "a dependency failed\n")
            continue
        try:
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


def main(description: str, jobs: Callable[[str], List[Job]], default_output: str) -> None:
    """The command line of a queue: ``--lane NAME``, ``--only JOB ...``, ``--list``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lane", default="A", help="this lane's name (in the progress lines)")
    parser.add_argument("--output", default=default_output, help="OUT (relative to the repo)")
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
