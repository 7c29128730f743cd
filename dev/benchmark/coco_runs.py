"""The COCO configs train: two iterations of every distillation config under configs/COCO/.

Each config runs as a user's run does — ``check_inputs``, ``default_setup`` and
:class:`DistillTrainer`, as in ``tools/train_net.py`` — in a fresh process, with:

- **COCO resolution**: the config's own ``INPUT`` sizes (short side 640-800, long side at most
  1333); DigitsDet's 192 x 256 images are upscaled to them;
- **DigitsDet** (``digitsdet_train``) instead of COCO, with the student's and every teacher's
  class count overridden to the dataset's, from its metadata's ``thing_classes`` (DigitsDet's
  10; yacs teachers: ``DISTILL.TEACHER.OPTS``; LazyConfig teachers:
  ``DISTILL.TEACHER.LAZY_OVERRIDES``, the key their ``model`` has) and
  ``INPUT.MASK_FORMAT bitmask`` (DigitsDet's masks are RLE, COCO's polygons);
- **random teachers** saved in detectron2's model-zoo ``.pkl`` format (the format users
  download) and named in ``DISTILL.TEACHER.WEIGHTS``, ``model_zoo://`` teachers included:
  nothing is downloaded;
- for ``MODEL.WEIGHTS``, a random stand-in of the ImageNet backbone users start from (the
  student's ``backbone.bottom_up``, model-zoo ``.pkl`` format), no download;
- no evaluation (``DATASETS.TEST ()``), the prototype index limited to
  ``MAX_IMAGES_PER_CLASS`` images per class, the run's checkpoint and student export written
  to the run's directory and deleted afterwards;
- a teacher schedule (MTPD) split into one stage per iteration, so that every teacher of the
  chain trains a step and the stage switch runs.

Random ResNets with the frozen (or not yet trained) batch norms of these configs are not
usable as they come: a norm with statistics (0, 1) normalises nothing, activations grow by
about 2x per residual block (~1e5 after the 33 blocks of an R-101), and a random COCO R-50
student alone diverges to NaN within 4 steps, distillation or not. Every random checkpoint
here (teachers and backbone) therefore has the last norm of each residual branch set to zero
scale — the "zero-init residual" initialisation — which keeps activations at their input
scale while every layer is still computed: the cost measured is the models', the losses are
finite.

Recorded per config: the time of each step (``run_step``: data, forward, backward, update),
the prototype refresh time (``prototypes/refresh_seconds``, GK configs), building the trainer
(teachers loaded), the whole process, the peak RSS of the process (``ru_maxrss`` from
``wait4``), each step's total loss, and ok / error with a one-line reason (the child's full
traceback is in its log). Results are rewritten atomically after every config; a config that
already has an ``ok`` record with the same settings is skipped (``--rerun`` repeats it).
Non-distillation configs (teachers, students) are listed as skipped, or trained the same way
with ``--include-plain``.
"""
import argparse
import glob
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from typing import Dict, List, Sequence

from d2kd.model_zoo import get_config_file
from d2kd.utils.io import atomic_path, atomic_write_json, atomic_write_text

from .fresh_process import module_command, module_env
from .process_memory import status_mb

logger = logging.getLogger("dev.benchmark.coco_runs")

# the COCO configs (their source files in a checkout, the packaged copies in an installation)
COCO_CONFIGS = os.path.dirname(os.path.realpath(get_config_file("COCO/Base-RetinaNet.yaml")))
#: the dataset every run trains on (instead of COCO, which is not downloaded)
DATASET = "digitsdet_train"
CLASS_KEYS = ("MODEL.RETINANET.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES",
              "MODEL.FCOS.NUM_CLASSES")
# LazyConfig keys of the class count, in the order tried (Mask R-CNN, RetinaNet / FCOS)
LAZY_CLASS_KEYS = ("model.roi_heads.num_classes", "model.num_classes")


def zero_residual_branches(state: Dict) -> int:
    """Zero the scale (``norm.weight``) of the last norm of every residual block of the
    ResNets in ``state`` (``...res<k>.<i>.conv<n>.norm.weight``), in place; returns the number
    of blocks."""
    last: Dict[str, int] = {}
    for key in state:
        match = re.match(r"((?:.*\.)?res[2-5]\.\d+)\.conv(\d)\.norm\.weight$", key)
        if match:
            last[match.group(1)] = max(last.get(match.group(1), 0), int(match.group(2)))
    for prefix, conv in last.items():
        state[f"{prefix}.conv{conv}.norm.weight"] = state[f"{prefix}.conv{conv}.norm.weight"] * 0
    return len(last)


def _zero_residual_pkl(path: str) -> None:
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not zero_residual_branches(data["model"]):
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f)


def save_random_backbone(cfg, path: str, seed: int = 0) -> str:
    """A random stand-in of an ImageNet backbone for ``MODEL.WEIGHTS``: the student's
    ``backbone.bottom_up`` (residual branches zero-initialised), model-zoo ``.pkl`` format."""
    import torch
    from detectron2.modeling import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone(cfg)
    bottom_up = getattr(backbone, "bottom_up", backbone)
    prefix = "backbone.bottom_up." if bottom_up is not backbone else "backbone."
    state = {prefix + k: v.detach().cpu().numpy() for k, v in bottom_up.state_dict().items()}
    zero_residual_branches(state)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"model": state, "__author__": "d2kd random backbone"}, f)
    return path


def _relpath(path: str) -> str:
    """``path`` relative to the working directory (records name configs as users type them)."""
    return os.path.relpath(os.path.realpath(path))


def classify(config_file: str) -> Dict:
    """``{"kind": "distill" | "plain" | "base", "teachers": [...], "reason": ...}``."""
    from d2kd.config import load_config

    name = os.path.basename(config_file)
    cfg = load_config(config_file)
    teachers = list(cfg.DISTILL.TEACHER.CONFIGS)
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        if not teachers:
            return {"kind": "base", "teachers": [],
                    "reason": "base of distillation configs (no teachers)"}
        teachers = [t if "://" in t else _relpath(t) for t in teachers]
        return {"kind": "distill", "teachers": teachers, "reason": ""}
    if name.startswith("Base-"):
        return {"kind": "base", "teachers": [], "reason": "base config (_BASE_ of others)"}
    role = "teacher" if "teacher" in name else "student" if "student" in name else "detector"
    return {"kind": "plain", "teachers": [],
            "reason": f"not a distillation config ({role}, {cfg.MODEL.META_ARCHITECTURE})"}


def dataset_classes(dataset: str) -> int:
    """The class count of ``dataset``: its metadata's ``thing_classes`` (d2kd registers
    DigitsDet's on import)."""
    from detectron2.data import MetadataCatalog

    return len(MetadataCatalog.get(dataset).thing_classes)


def _lazy_class_overrides(config_file: str, num_classes: int) -> List[str]:
    """``key=num_classes`` for the class-count key the LazyConfig's ``model`` has."""
    from detectron2.config import LazyConfig

    lazy = LazyConfig.load(config_file)
    for key in LAZY_CLASS_KEYS:
        node = lazy
        for part in key.split(".")[:-1]:
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None and hasattr(node, "get") and key.split(".")[-1] in node:
            return [f"{key}={num_classes}"]
    raise ValueError(f"{config_file}: none of {LAZY_CLASS_KEYS} in its LazyConfig")


def run_overrides(config_file: str, device: str, ims_per_batch: int, iters: int,
                  max_images_per_class: int, output_dir: str,
                  opts: Sequence[str] = ()) -> List[str]:
    """``KEY VALUE`` overrides of a benchmark run of ``config_file`` (teacher weights apart)."""
    from d2kd.config import load_config
    from d2kd.config.teachers import LAZY, teacher_specs

    cfg = load_config(config_file, opts)
    num_classes = dataset_classes(DATASET)
    run = ["DATASETS.TRAIN", repr((DATASET,)), "DATASETS.TEST", "()",
           "MODEL.DEVICE", device, "SOLVER.IMS_PER_BATCH", str(ims_per_batch),
           "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir,
           "INPUT.MASK_FORMAT", "bitmask"]  # DigitsDet's masks are RLE (COCO's: polygons)
    for key in CLASS_KEYS:
        run += [key, str(num_classes)]
    stages = 1
    if cfg.MODEL.META_ARCHITECTURE == "DistillationDetector":
        teacher_opts = list(cfg.DISTILL.TEACHER.OPTS)
        for key in CLASS_KEYS:
            teacher_opts += [key, str(num_classes)]
        lazy = list(cfg.DISTILL.TEACHER.LAZY_OVERRIDES)
        for spec in teacher_specs(cfg):
            if spec.kind == LAZY:
                lazy += [o for o in _lazy_class_overrides(spec.config_file, num_classes)
                         if o not in lazy]
        run += ["DISTILL.TEACHER.OPTS", repr(teacher_opts),
                "DISTILL.TEACHER.LAZY_OVERRIDES", repr(lazy),
                "DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS", str(max_images_per_class)]
        if cfg.DISTILL.SCHEDULE.MODE == "progressive":  # one stage per iteration (at least)
            stages = len(cfg.DISTILL.SCHEDULE.STAGE_ITERS) or len(cfg.DISTILL.TEACHER.CONFIGS)
            total = max(iters, stages)
            split = [total // stages + (i < total % stages) for i in range(stages)]
            run += ["DISTILL.SCHEDULE.STAGE_ITERS", repr(split)]
    run += ["SOLVER.MAX_ITER", str(max(iters, stages))]
    return list(opts) + run


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message (file:line of the raising frame)``."""
    message = (str(error).strip().splitlines() or [""])[0]
    if len(message) > 300:
        message = message[:297] + "..."
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        path = (_relpath(frame.filename) if frame.filename.startswith(os.getcwd())
                else frame.filename)
        where = f" ({path}:{frame.lineno})"
    return f"{type(error).__name__}: {message}{where}"


def train_steps(config_file: str, opts: Sequence[str], record: Dict) -> Dict:
    """In this process: ``tools/train_net.py``'s set-up, then train with timed steps; the
    measurements go to ``record`` as they come (a failing run keeps what it measured)."""
    import torch
    from detectron2.engine import default_argument_parser, default_setup
    from detectron2.utils.logger import setup_logger

    from d2kd.config import check_inputs, load_config
    from d2kd.engine import DistillTrainer
    from d2kd.engine.prototype_hook import PrototypeRefreshHook

    record.update(step_seconds=[], total_loss=[], refresh_seconds=[], peak_rss_after_step_mb=[])
    began = time.perf_counter()
    args = default_argument_parser().parse_args(["--config-file", config_file, *opts])
    check_inputs(load_config(config_file, opts))
    cfg = load_config(config_file, opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, name="d2kd", abbrev_name="d2kd")
    cuda = cfg.MODEL.DEVICE.startswith("cuda")

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    class RecordingRefreshHook(PrototypeRefreshHook):
        """Records each refresh's seconds (the refresher's own clock) as it happens."""

        def _seconds(self) -> float:
            """The refresher's seconds so far (none before the hook makes it, at the first
            refresh; never for a model without prototype banks)."""
            return self.refresher.total_seconds if self.refresher is not None else 0.0

        def _note(self, call) -> None:
            before, peak_before = self._seconds(), status_mb("VmHWM")
            call()
            if self._seconds() != before:
                record["refresh_seconds"].append(self._seconds() - before)
                record["refresh_images"] = len(self.refresher.index)
                record.setdefault("peak_rss_before_refresh_mb", peak_before)
                record.setdefault("peak_rss_after_refresh_mb", status_mb("VmHWM"))

        def before_step(self) -> None:
            self._note(super().before_step)

        def after_step(self) -> None:
            self._note(super().after_step)

    class TimedTrainer(DistillTrainer):
        """DistillTrainer whose steps (``run_step``: data, forward, backward, update) are
        timed, prototype refreshes excluded (they run in a hook before the step)."""

        def build_hooks(self):
            return [RecordingRefreshHook(self.cfg) if isinstance(h, PrototypeRefreshHook) else h
                    for h in super().build_hooks()]

        def run_step(self):
            synchronize()
            start = time.perf_counter()
            super().run_step()
            synchronize()
            record["step_seconds"].append(time.perf_counter() - start)
            record["peak_rss_after_step_mb"].append(status_mb("VmHWM"))
            if "total_loss" in self.storage.histories():
                record["total_loss"].append(self.storage.history("total_loss").latest())

    trainer = TimedTrainer(cfg)
    trainer.resume_or_load(resume=False)
    record["build_seconds"] = time.perf_counter() - began
    record["rss_after_build_mb"] = status_mb("VmRSS")
    trainer.train()
    history = trainer.storage.histories()
    record["data_seconds"] = [v for v, _ in history["data_time"].values()] \
        if "data_time" in history else []
    record["iterations"] = trainer.iter + 1
    record["train_seconds"] = time.perf_counter() - began
    record["vm_hwm_mb"] = status_mb("VmHWM")
    record["threads"] = torch.get_num_threads()
    if cuda:
        record["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        record["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return record


def _child_main(config_file: str, opts_json: str, out_path: str) -> int:
    import d2kd  # noqa: F401  pylint: disable=unused-import  (registrations, as train_net.py)

    opts = json.loads(opts_json)
    record: Dict = {}
    try:
        train_steps(config_file, opts, record)
        record["status"] = "ok"
        code = 0
    except BaseException as e:  # noqa: B902  (any failure is the result)
        traceback.print_exc()
        record.update(status="error", error=_one_line(e))
        code = 1
    atomic_write_json(out_path, record)
    return code


def _run_child(config_file: str, opts: Sequence[str], out_path: str, log_path: str,
               timeout: float, threads: int) -> Dict:
    """The child process; its peak RSS from ``wait4`` whatever its end."""
    env = module_env(PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [*module_command("coco_runs"), config_file, json.dumps(list(opts)), out_path]
    if os.path.exists(out_path):
        os.unlink(out_path)
    began = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    record = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            record = json.load(f)
    if not record:
        if time.perf_counter() - began >= timeout:
            reason = f"timeout after {timeout:.0f} s"
        elif proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        else:
            reason = f"exit code {proc.returncode} without a result"
        record = {"status": "error", "error": reason}
    record["process_seconds"] = wall
    record["peak_rss_mb"] = usage.ru_maxrss / 1024  # kB on Linux
    return record


def _settings(device: str, ims_per_batch: int, iters: int, max_images_per_class: int,
              threads: int, opts: Sequence[str]) -> Dict:
    return {"device": device, "ims_per_batch": ims_per_batch, "iterations": iters,
            "max_images_per_class": max_images_per_class, "threads": threads or "default",
            "dataset": DATASET, "num_classes": dataset_classes(DATASET), "opts": list(opts)}


def _environment() -> Dict:
    import detectron2
    import torch

    from d2kd.compat import has_compiled_extension

    return {"torch": torch.__version__, "detectron2": detectron2.__version__,
            "detectron2_compiled": has_compiled_extension(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def _delete_large_files(directory: str) -> None:
    """Checkpoints, exported students, random weights, cached features (logs stay)."""
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith((".pth", ".pkl")):
                os.unlink(os.path.join(root, name))


def run_coco_runs_benchmark(configs: Sequence[str], json_path: str, markdown_path: str,
                            work_dir: str, device: str = "cpu", ims_per_batch: int = 2,
                            iters: int = 2, max_images_per_class: int = 2, threads: int = 0,
                            include_plain: bool = False, rerun: bool = False,
                            timeout: float = 1800, keep_files: bool = False,
                            opts: Sequence[str] = ()) -> Dict:
    """Train every config of ``configs`` (files or directories) for ``iters`` steps, each in a
    fresh process; JSON and markdown rewritten after each config."""
    from d2kd.config import load_config

    from .random_teachers import save_random_teachers

    files = []
    for entry in configs or [COCO_CONFIGS]:
        files += (sorted(glob.glob(os.path.join(entry, "*.yaml"))) if os.path.isdir(entry)
                  else [entry])
    settings = _settings(device, ims_per_batch, iters, max_images_per_class, threads, opts)
    records: Dict[str, Dict] = {}  # config -> record; other configs' earlier records are kept
    if os.path.exists(json_path):
        with open(json_path) as f:
            records = {r["config"]: r for r in json.load(f).get("runs", [])}
    results = {"settings": settings, "environment": _environment(), "runs": []}

    def write(name: str, record: Dict) -> None:
        records[name] = record
        results["runs"] = [records[k] for k in sorted(records)]
        _write(results, json_path, markdown_path)

    for number, config_file in enumerate(files, 1):
        name = _relpath(config_file)
        try:
            kind = classify(config_file)
        except Exception as e:  # a config that does not even load is a result too
            kind = {"kind": "distill", "teachers": [], "reason": ""}
            write(name, {"config": name, **kind, "status": "error", "error": _one_line(e),
                         "settings": settings})
            continue
        if kind["kind"] == "base" or (kind["kind"] == "plain" and not include_plain):
            write(name, {"config": name, **kind, "status": "skipped"})
            continue
        old = records.get(name)
        if not rerun and old and old.get("status") == "ok" and old.get("settings") == settings:
            logger.info("[%d/%d] %s: done before (%s), skipped", number, len(files), name,
                        json_path)
            continue
        run_dir = os.path.join(work_dir, os.path.splitext(os.path.basename(config_file))[0])
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing cached from an earlier run
        os.makedirs(run_dir)
        logger.info("[%d/%d] %s: %d teacher(s), %d iterations, %d image(s) per step on %s",
                    number, len(files), name, len(kind["teachers"]), iters, ims_per_batch, device)
        record = {"config": name, **kind, "settings": settings}
        try:
            run_opts = run_overrides(config_file, device, ims_per_batch, iters,
                                     max_images_per_class, os.path.abspath(run_dir), opts)
            began = time.perf_counter()
            cfg = load_config(config_file, run_opts + ["MODEL.DEVICE", "cpu"])
            backbone = save_random_backbone(
                cfg, os.path.abspath(os.path.join(run_dir, "teachers", "backbone.pkl")))
            run_opts += ["MODEL.WEIGHTS", backbone]
            if kind["kind"] == "distill":
                weights = [os.path.abspath(w) for w in save_random_teachers(
                    cfg, os.path.join(run_dir, "teachers"), model_zoo_format=True)]
                for path in weights:
                    _zero_residual_pkl(path)
                run_opts += ["DISTILL.TEACHER.WEIGHTS", repr(weights)]
            record["weights_save_seconds"] = time.perf_counter() - began
        except Exception as e:
            record.update(status="error", error="preparing the run: " + _one_line(e))
        else:
            record["opts"] = run_opts
            record.update(_run_child(config_file, run_opts, os.path.join(run_dir, "result.json"),
                                     os.path.join(run_dir, "child.log"), timeout, threads))
        record["log"] = _relpath(os.path.join(run_dir, "child.log"))
        if not keep_files:
            _delete_large_files(run_dir)
        if record["status"] == "ok":
            logger.info("[%d/%d] %s: ok, steps %s s, refresh %s s, peak RSS %.0f MB",
                        number, len(files), name,
                        " / ".join(f"{s:.1f}" for s in record["step_seconds"]),
                        " / ".join(f"{s:.1f}" for s in record["refresh_seconds"]) or "-",
                        record["peak_rss_mb"])
        else:
            logger.info("[%d/%d] %s: ERROR %s (log: %s)", number, len(files), name,
                        record["error"], record["log"])
        write(name, record)
    return results


def _fmt(values: Sequence[float], digits: int = 1) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) if values else "-"


def _write(results: Dict, json_path: str, markdown_path: str) -> None:
    from tabulate import tabulate

    atomic_write_json(json_path, results)
    settings, env = results["settings"], results["environment"]
    rows, skipped = [], []
    gpu = any("cuda_peak_reserved_mb" in r for r in results["runs"])
    for r in results["runs"]:
        name = os.path.basename(r["config"])
        if r["status"] == "skipped":
            skipped.append(f"- `{name}`: {r['reason']}")
            continue
        rows.append([
            f"`{name}`", len(r.get("teachers", [])),
            ("ok" if r["status"] == "ok" else "error: " + r["error"].replace("|", "\\|"))
            + (" (other settings: see the JSON)" if r.get("settings") != settings else ""),
            _fmt(r.get("step_seconds", [])), _fmt(r.get("refresh_seconds", [])),
            r.get("refresh_images", "-"),
            f"{r['build_seconds']:.0f}" if "build_seconds" in r else "-",
            f"{r['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in r else "-",
            f"{r['peak_rss_before_refresh_mb'] / 1024:.2f} / "
            f"{r['peak_rss_after_refresh_mb'] / 1024:.2f}"
            if "peak_rss_after_refresh_mb" in r else "-",
            f"{r['process_seconds']:.0f}" if "process_seconds" in r else "-"]
            + ([f"{r['cuda_peak_reserved_mb'] / 1024:.2f}" if "cuda_peak_reserved_mb" in r else "-"]
               if gpu else []))
    headers = ["config", "teachers", "status", "step s (each)", "prototype refresh s",
               "refresh images", "build s", "peak RSS GB", "peak RSS GB before / after refresh",
               "process s"] + (["peak GPU memory GB (reserved)"] if gpu else [])
    text = [
        "# COCO configs: two training steps each at COCO resolution",
        "",
        f"`tools/benchmark.py coco-runs`; device {settings['device']}, "
        f"{settings['ims_per_batch']} image(s) per step, {settings['iterations']} iterations, "
        f"DigitsDet ({settings['num_classes']} classes) upscaled to the configs' COCO input "
        f"sizes, random teachers in model-zoo .pkl format, prototype index "
        f"{settings['max_images_per_class']} image(s) per class; torch {env['torch']}, "
        f"detectron2 {env['detectron2']} "
        f"(compiled: {'yes' if env['detectron2_compiled'] else 'no'}), "
        f"{env['cpus']} CPUs, threads {settings['threads']}.",
        "",
        "\"step s\": `run_step` (data, forward, backward, update) of each iteration; \"build s\": "
        "set-up and trainer construction (teachers loaded); \"process s\": the whole process "
        "(start-up, final checkpoint and student export included); \"peak RSS\": the process's "
        "`ru_maxrss`; \"before / after refresh\": the process's peak RSS (`VmHWM`) just "
        "before and after the first prototype refresh, which runs before the first step.",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        ""]
    total = sum(r.get("process_seconds", 0) + r.get("weights_save_seconds", 0)
                for r in results["runs"])
    text += [f"All runs together (random weights saved, processes): {total / 60:.0f} min.", ""]
    if skipped:
        text += ["Not run:", ""] + skipped + [""]
    atomic_write_text(markdown_path, "\n".join(text))


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py coco-runs``."""
    coco = subparsers.add_parser("coco-runs", help="two steps of every COCO distillation config")
    coco.add_argument("--configs", nargs="*", default=[], help="files or folders (configs/COCO)")
    coco.add_argument("--json", required=True)
    coco.add_argument("--markdown", required=True)
    coco.add_argument("--work-dir", default="output/bench/coco_runs", help="runs' directories")
    coco.add_argument("--device", default="cpu", help="MODEL.DEVICE of every run")
    coco.add_argument("--ims-per-batch", type=int, default=2)
    coco.add_argument("--iters", type=int, default=2)
    coco.add_argument("--max-images-per-class", type=int, default=2)
    coco.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    coco.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    coco.add_argument("--include-plain", action="store_true", help="also train teachers/students")
    coco.add_argument("--rerun", action="store_true", help="repeat configs already ok in --json")
    coco.add_argument("--keep-files", action="store_true", help="keep teachers and checkpoints")
    coco.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    coco.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    run_coco_runs_benchmark(args.configs, args.json, args.markdown, args.work_dir, args.device,
                            args.ims_per_batch, args.iters, args.max_images_per_class,
                            args.threads, args.include_plain, args.rerun, args.timeout,
                            args.keep_files, args.opts)


if __name__ == "__main__":  # one measured run: CONFIG OPTS_JSON OUT_JSON
    sys.exit(_child_main(*sys.argv[1:4]))
