#!/usr/bin/env python
"""Every run behind issue 19's numbers (docs/detkds_search.md "under the clean proxy",
docs/toward_the_teacher.md, the DigitsDetHard robustness table) as one queue of jobs that
lanes pull in order, each lane one process with one thread (one lane per core):

    export OMP_NUM_THREADS=1
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --lane A &
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --lane B &
    .venv-upstream/bin/python benchmarks/beyond_the_teacher.py --list   # what is done, running

``--only JOB ...`` runs those jobs and what they depend on; the lanes, claims and reuse of
finished work are benchmarks/job_queue.py's. Result files land in OUT; the committed copies
are listed in benchmarks/README.md.
"""
import json
import os
import sys
from typing import List, Sequence

from job_queue import REPO, Job, accuracy, main

S = "configs/DigitsDet"
H = "configs/DigitsDetHard"


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
        Job(f"pretrain_{name}", (), [[sys.executable, "-m", "d2kd.apps.launch.pretrain", name]])
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


if __name__ == "__main__":
    main(__doc__.splitlines()[0], jobs, "output/bench19")
