"""Per-stage outputs of a teacher schedule, in ``OUTPUT_DIR``:

- ``stage{k}/model_student.pth``: the student at the end of stage k (plain detectron2 keys);
- ``stage{k}/results.json``: its evaluation (COCOEvaluator results per dataset);
- ``stages.json``: every completed stage (teachers, iterations, AP);
- ``stages_ap.png``: AP per stage.

Stages are 1-based in file names and records (stage 0 in code is ``stage1``).
"""
import json
import logging
import os
from typing import Dict, List

from detectron2.config import CfgNode
from detectron2.utils import comm
from matplotlib.figure import Figure
from torch import nn

from ..config.schedule import TeacherSchedule
from ..utils.io import atomic_save_figure, atomic_write_json
from .export import save_student

logger = logging.getLogger(__name__)

SUMMARY_FILE = "stages.json"
PLOT_FILE = "stages_ap.png"


def stage_ap(results: Dict) -> Dict[str, float]:
    """``{"bbox": AP, "segm": AP}`` of the first evaluated dataset (tasks it has)."""
    if not results:
        return {}
    first = next(iter(results.values())) if "bbox" not in results else results
    return {task: float(first[task]["AP"]) for task in ("bbox", "segm") if task in first}


def plot_stage_ap(records: List[Dict], path: str) -> None:
    """AP (box, and mask when present) against the stage, one line per task."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for task in ("bbox", "segm"):
        points = [(r["stage"], r["ap"][task]) for r in records if task in r["ap"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{task} AP")
    ax.set_xlabel("stage")
    ax.set_ylabel("AP")
    ax.set_xticks([r["stage"] for r in records])
    ax.set_xticklabels([f"{r['stage']}\n{r['teachers']}" for r in records], fontsize=7)
    ax.set_title("Student AP at the end of each stage")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


class StageReporter:
    """Writes the per-stage outputs (main process only)."""

    def __init__(self, cfg: CfgNode, schedule: TeacherSchedule):
        self.output_dir = cfg.OUTPUT_DIR
        self.teacher_configs = list(cfg.DISTILL.TEACHER.CONFIGS)
        self.schedule = schedule

    def stage_dir(self, stage: int) -> str:
        return os.path.join(self.output_dir, f"stage{stage + 1}")

    def record(self, stage: int, results: Dict, model: nn.Module, iteration: int) -> None:
        """Export the student, write ``stage`` 's results and update the summary and plot."""
        if not comm.is_main_process():
            return
        folder = self.stage_dir(stage)
        save_student(model, os.path.join(folder, "model_student.pth"), iteration)
        atomic_write_json(os.path.join(folder, "results.json"), results)
        summary_path = os.path.join(self.output_dir, SUMMARY_FILE)
        records = []
        if os.path.isfile(summary_path):  # earlier stages (possibly of a resumed process)
            with open(summary_path) as f:
                records = [r for r in json.load(f)["stages"] if r["stage"] != stage + 1]
        teachers = sorted(self.schedule.stage_teachers(stage))
        records.append({
            "stage": stage + 1, "teachers": teachers,
            "teacher_configs": [self.teacher_configs[i] for i in teachers],
            "iterations": [self.schedule.boundaries[stage], self.schedule.boundaries[stage + 1]],
            "ap": stage_ap(results), "results": results,
        })
        records.sort(key=lambda r: r["stage"])
        atomic_write_json(summary_path, {"mode": self.schedule.mode, "stages": records})
        plot_stage_ap(records, os.path.join(self.output_dir, PLOT_FILE))
        logger.info("Stage %d done at iteration %d: AP %s; outputs in %s", stage + 1,
                    iteration + 1, stage_ap(results) or "(no test dataset)", folder)
