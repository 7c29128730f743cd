"""Peak memory of one prototype refresh against the size of the instance index.

Each size runs in a fresh process: a global-knowledge distillation model with random teachers
is built, the training set is repeated to ``num_images`` records (every record kept in the
index: ``MAX_IMAGES_PER_CLASS`` 0, boxes of any size), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), one refresh runs (extraction of student and teacher features,
PGM selection, bank fill), and the new peak is read (``VmHWM``). The refresh itself must not
grow with the index; what rank 0 gathers — the pooled (M, C) features of the M instances —
does, so the table reports the peak both with and without it.
"""
import argparse
import json
import sys
import tempfile
from typing import Dict, List, Sequence

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from d2kd.config import load_config
from d2kd.prototypes.refresh import PrototypeRefresher
from d2kd.utils.host_memory import retain_freed_host_memory
from d2kd.utils.io import atomic_write_json, atomic_write_text

from .fresh_process import measure_in_fresh_process, save_curves
from .process_memory import reset_peak_rss, status_mb
from .random_teachers import save_random_teachers


def measure(config_file: str, num_images: int, opts: Sequence[str]) -> Dict:
    """One refresh over ``num_images`` repeated training records, in this process."""
    if status_mb("VmHWM") is None:
        raise RuntimeError("The refresh memory benchmark reads the peak resident size from "
                           "/proc/self/status (VmHWM); run it on Linux.")
    cfg = load_config(config_file, list(opts) + [
        "DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS", "0", "DISTILL.PROTOTYPES.MIN_BOX_SIZE", "0.0"])
    if cfg.D2KD.RETAIN_HOST_MEMORY:  # as DistillTrainer does
        retain_freed_host_memory()
    model = build_model(cfg)
    base = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    dicts = [dict(base[i % len(base)], image_id=i) for i in range(num_images)]
    refresher = PrototypeRefresher(cfg, model, dicts)
    rss_before = status_mb("VmRSS")
    reset_peak_rss()
    stats = refresher.refresh()
    peak = status_mb("VmHWM")
    instances = len(refresher.classes)
    channels = sum(bank.teacher.shape[-1] + bank.student.shape[-1]
                   for bank in refresher.banks for _ in bank.levels)
    pooled_mb = instances * channels * 4 / 2**20  # float32 (M, C) per level, both models
    return {"num_images": num_images, "index_images": len(refresher.index),
            "instances": instances, "rss_before_mb": rss_before, "peak_rss_mb": peak,
            "refresh_increase_mb": peak - rss_before, "pooled_features_mb": pooled_mb,
            "increase_without_pooled_mb": peak - rss_before - pooled_mb,
            "seconds": stats["seconds"], "threads": torch.get_num_threads()}


def run_refresh_memory_benchmark(config_file: str, sizes: Sequence[int], json_path: str,
                                 markdown_path: str, plot_path: str = "",
                                 opts: Sequence[str] = ()) -> List[Dict]:
    """:func:`measure` for each index size in a fresh process; JSON, markdown, optional PNG
    (rewritten after every size)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_teachers(load_config(config_file, opts), tmp)
        run_opts = list(opts) + ["DISTILL.TEACHER.WEIGHTS", repr(weights), "OUTPUT_DIR", tmp,
                                 "MODEL.WEIGHTS", ""]
        for size in sizes:
            results.append(measure_in_fresh_process(
                "refresh_memory", [config_file, str(size), json.dumps(run_opts)]))
            _write(results, config_file, json_path, markdown_path, plot_path)
    return results


def _write(results: List[Dict], config_file: str, json_path: str, markdown_path: str,
           plot_path: str) -> None:
    from tabulate import tabulate

    atomic_write_json(json_path, {"config": config_file, "runs": results})
    rows = [[r["num_images"], r["instances"], round(r["rss_before_mb"]),
             round(r["peak_rss_mb"]), round(r["refresh_increase_mb"], 1),
             round(r["pooled_features_mb"], 1), round(r["increase_without_pooled_mb"], 1),
             round(r["seconds"], 1)] for r in results]
    headers = ["index images", "instances", "RSS before MB", "peak RSS MB",
               "refresh increase MB", "pooled features MB", "increase without pooled MB",
               "refresh s"]
    atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    if plot_path:
        save_curves(plot_path, [r["num_images"] for r in results], [
            ([r["refresh_increase_mb"] for r in results], "o-",
             "peak RSS increase of the refresh"),
            ([r["increase_without_pooled_mb"] for r in results], "s--",
             "... without the pooled features")],
            "images in the prototype index", "MB",
            "One prototype refresh: memory vs index size")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py refresh-memory``."""
    mem = subparsers.add_parser("refresh-memory",
                                help="peak RSS of one prototype refresh vs index size")
    mem.add_argument("--config-file", required=True, help="a global-knowledge distillation config")
    mem.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    mem.add_argument("--json", required=True)
    mem.add_argument("--markdown", required=True)
    mem.add_argument("--plot", default="")
    mem.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    mem.set_defaults(run=lambda args: run_refresh_memory_benchmark(
        args.config_file, args.sizes, args.json, args.markdown, args.plot, args.opts))


if __name__ == "__main__":  # one measuring process: CONFIG NUM_IMAGES OPTS_JSON OUT_JSON
    import d2kd  # noqa: F401  (registrations in the measuring process)

    config, size, extra, out_path = sys.argv[1:5]
    atomic_write_json(out_path, measure(config, int(size), json.loads(extra)))
