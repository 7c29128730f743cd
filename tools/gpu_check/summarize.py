#!/usr/bin/env python
"""Step records and the JSON + markdown summary of tools/gpu_check.sh (standard library only).

    summarize.py record LOGS NAME RC START END LIMIT LOG -- CMD...   append one step record
    summarize.py skip LOGS NAME REASON -- CMD...                      record a skipped step
    summarize.py write LOGS OUT                                       OUT/gpu_check.{json,md}

A step record (LOGS/steps.jsonl): name, command, status (ok / failed / timeout / skipped),
exit code, seconds, start and end (epoch seconds), time limit, log file. ``write`` adds each
step's key numbers from the files the steps left in LOGS (machine.json, install.json,
detectron2.json, pytest_*.xml, runs/<run>/, overhead_*.json, coco*.json, gpu_samples.csv) and
is safe to call after every step: both files are replaced atomically.
"""
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET


def _load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tail(path, lines=12, chars=1500):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def record(logs, name, rc, start, end, limit, log, cmd, status=None):
    rc = int(rc)
    if status is None:
        status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    entry = {"name": name, "command": cmd, "status": status, "rc": rc,
             "seconds": round(float(end) - float(start), 1), "start": float(start),
             "end": float(end), "limit_s": int(float(limit)), "log": os.path.basename(log)}
    if status != "ok":
        entry["log_tail"] = _tail(log)
    with open(os.path.join(logs, "steps.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def steps(logs):
    out = []
    try:
        with open(os.path.join(logs, "steps.jsonl")) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


# ---- key numbers per step ------------------------------------------------------------------
def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_tests"] = failed[:20]
    return counts


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def distill_run(run_dir):
    """Key numbers of one tools/train_net.py run (its files copied to LOGS/runs/<run>)."""
    info = {"run": os.path.basename(run_dir)}
    lines = []
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        pass
    train = [l for l in lines if "total_loss" in l]
    if train:
        last = train[-1]
        info["last_iteration"] = last.get("iteration")
        info["total_loss_first"] = round(train[0]["total_loss"], 4)
        info["total_loss_last"] = round(last["total_loss"], 4)
        info["losses_finite"] = all(_finite(v) for l in train for k, v in l.items()
                                    if "loss" in k)
        info["kd_losses"] = {k: round(v, 5) for k, v in last.items()
                             if k.startswith("loss_kd") or k.startswith("kd_")
                             or (k.startswith("loss") and "kd" in k)}
        times = [l["time"] for l in train if _finite(l.get("time"))]
        if times:
            info["s_per_iter_median"] = round(statistics.median(times), 4)
        data = [l["data_time"] for l in train if _finite(l.get("data_time"))]
        if data:
            info["data_s_per_iter_median"] = round(statistics.median(data), 4)
    protos = [l["prototypes/total_seconds"] for l in lines if "prototypes/total_seconds" in l]
    if protos:
        info["prototype_refresh_s"] = round(protos[-1], 2)
    stages = _load(os.path.join(run_dir, "stages.json"))
    if isinstance(stages, dict) and isinstance(stages.get("stages"), list):
        info["stage_box_AP"] = [round((st.get("ap") or {}).get("bbox", float("nan")), 2)
                                for st in stages["stages"]]
    results = _load(os.path.join(run_dir, "results.json"))
    if isinstance(results, dict) and "bbox" in results:
        info["box_AP"] = round(results["bbox"].get("AP", float("nan")), 2)
    info["student_exported"] = os.path.exists(os.path.join(run_dir, "student_exported"))
    amp = _load(os.path.join(run_dir, "amp.json"))
    if amp is not None:
        info.update(amp)
    return info


def overhead(path):
    r = _load(path)
    if not r:
        return None
    keys = ("t_student", "t_teacher_forward", "t_heads", "t_distill", "ratio",
            "ratio_without_heads", "peak_rss_student_mb", "peak_rss_distill_mb", "threads")
    out = {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in keys}
    out["config"] = r.get("config")
    out["ratio_ci95"] = [round(x, 3) for x in r.get("ratio_ci95", [])]
    for k, v in r.items():  # CUDA memory, if overhead.py records it
        if "cuda" in k and not isinstance(v, (list, dict)):
            out[k] = v
    return out


def gpu_samples(logs):
    rows = []
    try:
        with open(os.path.join(logs, "gpu_samples.csv")) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                try:
                    rows.append((float(parts[0]), float(parts[1]), float(parts[2])))
                except (IndexError, ValueError):
                    continue
    except OSError:
        pass
    return rows


def step_numbers(step, logs, samples):
    name = step["name"]
    nums = {}
    if name == "install":
        r = _load(os.path.join(logs, "install.json"))
        if r:
            nums = {"torch_kept": r.get("ok"), "torch": r.get("torch_after"),
                    "torchvision": r.get("torchvision_after"),
                    "installed_from_wheels": [f"{i['name']}=={i['version']}"
                                              for i in r.get("pip_would_install", [])]}
    elif name.startswith("detectron2") or name == "collect_env":
        r = _load(os.path.join(logs, "detectron2.json"))
        if r and name == "collect_env":
            nums = {k: r.get(k) for k in ("detectron2", "compiled", "get_cuda_version",
                                            "has_cuda", "nms_rotated_cuda") if k in r}
    elif name.startswith("pytest"):
        nums = junit(os.path.join(logs, f"{name}.xml")) or {}
    elif name.startswith("run_"):
        nums = distill_run(os.path.join(logs, "runs", name[len("run_"):]))
    elif name.startswith("overhead_") and name != "overhead_summary":
        nums = overhead(os.path.join(logs, f"{name}.json")) or {}
    elif name.startswith("coco"):
        r = _load(os.path.join(logs, f"{name}.json"))
        if isinstance(r, dict):
            runs = [x for x in (r.get("runs") or []) if isinstance(x, dict)]
            for status in ("ok", "error", "skipped"):
                nums[status] = sum(1 for x in runs if x.get("status") == status)
            steps_s = [x["step_seconds"][-1] for x in runs
                       if x.get("status") == "ok" and x.get("step_seconds")]
            if steps_s:
                nums["last_step_s_median"] = round(statistics.median(steps_s), 3)
            nums["errors"] = [f"{os.path.basename(x['config'])}: {x.get('error', '')}"[:200]
                              for x in runs if x.get("status") == "error"]
    window = [s for s in samples if step["start"] <= s[0] <= step["end"]]
    if window:
        nums["gpu_mem_used_peak_mib"] = max(s[1] for s in window)
        nums["gpu_util_peak_pct"] = max(s[2] for s in window)
    return nums


# ---- the summary ---------------------------------------------------------------------------
def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v)
        return s if len(s) <= 160 else s[:157] + "..."
    return str(v)


def write(logs, out):
    meta = _load(os.path.join(logs, "meta.json"), {})
    machine = _load(os.path.join(logs, "machine.json"), {})
    samples = gpu_samples(logs)
    all_steps = steps(logs)
    for s in all_steps:
        s["numbers"] = step_numbers(s, logs, samples) if s["status"] != "skipped" else {}
    counts = {}
    for s in all_steps:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    started = meta.get("started", time.time())
    summary = {"meta": meta, "machine": machine, "status_counts": counts,
               "wall_seconds": round(max([s["end"] for s in all_steps] or [started]) - started, 1),
               "finished": os.path.exists(os.path.join(logs, "FINISHED")),
               "steps": all_steps}
    _atomic(os.path.join(out, "gpu_check.json"), json.dumps(summary, indent=1) + "\n")

    md = [f"# d2kd GPU check ({meta.get('device', '?')})", ""]
    wheels = meta.get("wheels") or {}
    md.append(f"- started: {meta.get('started_iso', '?')}, commit `{meta.get('commit', '?')}`"
              f"{' (+ uncommitted changes)' if meta.get('dirty') else ''} (wheels prepared "
              f"{wheels.get('created', '-')} at `{wheels.get('repo_commit', '-')}` for Python "
              f"{wheels.get('python_version', '-')}), mode "
              f"`{meta.get('device', '?')}`, budget {meta.get('budget_s', '?')} s, "
              f"{meta.get('iters', '?')} iterations per run")
    if machine:
        md.append(f"- machine: {machine.get('gpu', 'no GPU')} "
                  f"(capability {machine.get('gpu_capability', '-')}, "
                  f"{machine.get('gpu_memory_gib', '-')} GiB), {machine.get('cpus')} CPUs, "
                  f"Python {machine.get('python')}, torch {machine.get('torch')} "
                  f"(CUDA {machine.get('torch_cuda')}), torchvision {machine.get('torchvision')}, "
                  f"numpy {machine.get('numpy')}")
    md.append(f"- wall time {summary['wall_seconds']} s; steps: "
              + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + ("" if summary["finished"] else " — **the script did not finish** (killed?)"))
    md += ["", "| step | status | seconds | key numbers |", "|---|---|---|---|"]
    for s in all_steps:
        nums = "; ".join(f"{k}: {_fmt(v)}" for k, v in s["numbers"].items()
                         if k not in ("installed_from_wheels", "failed_tests", "errors") or v)
        md.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {nums.replace('|', '/')} |")
    runs = [s for s in all_steps if s["name"].startswith("run_")]
    if runs:
        md += ["", "## Distillation runs", "",
               "| run | AMP | status | iterations | total loss first → last | finite | "
               "s/iter (median) | box AP | student exported | GPU MiB peak |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for s in runs:
            n = s["numbers"]
            md.append(f"| {s['name'][len('run_'):]} | {n.get('amp', '-')} | {s['status']} | "
                      f"{_fmt(n.get('last_iteration', '-'))} | {n.get('total_loss_first', '-')}"
                      f" → {n.get('total_loss_last', '-')} | {n.get('losses_finite', '-')} | "
                      f"{n.get('s_per_iter_median', '-')} | {n.get('box_AP', '-')} | "
                      f"{n.get('student_exported', '-')} | {n.get('gpu_mem_used_peak_mib', '-')} |")
    ovh = [s for s in all_steps if s["name"].startswith("overhead_") and s["numbers"]]
    if ovh:
        md += ["", "## Overhead benchmark", "",
               "| config | t_student s | t_teacher_fwd s | t_heads s | t_distill s | ratio | "
               "ratio 95 % | peak RSS student / distill MB | GPU MiB peak (nvidia-smi) |",
               "|---|---|---|---|---|---|---|---|---|"]
        for s in ovh:
            n = s["numbers"]
            md.append(f"| {os.path.basename(str(n.get('config')))} | {n.get('t_student')} | "
                      f"{n.get('t_teacher_forward')} | {n.get('t_heads')} | {n.get('t_distill')}"
                      f" | {n.get('ratio')} | {n.get('ratio_ci95')} | "
                      f"{n.get('peak_rss_student_mb')} / {n.get('peak_rss_distill_mb')} | "
                      f"{n.get('gpu_mem_used_peak_mib', '-')} |")
        if meta.get("overhead_synchronizes") is False:
            md += ["", "Note: dev/benchmark/overhead.py times steps with `time.perf_counter()` "
                   "and no `torch.cuda.synchronize()`: on a GPU its times are those of the host "
                   "side (kernels queued asynchronously), so the ratios are indicative only."]
    bad = [s for s in all_steps if s["status"] not in ("ok", "skipped")]
    if bad:
        md += ["", "## Failures (log tails; full logs in gpu_check_logs.tar.gz)", ""]
        for s in bad:
            md += [f"### {s['name']} ({s['status']}, rc {s['rc']})", "", "```",
                   f"$ {s['command'][:400]}", s.get("log_tail", ""), "```", ""]
    skipped = [s for s in all_steps if s["status"] == "skipped"]
    if skipped:
        md += ["", "Skipped: " + "; ".join(f"{s['name']} ({s.get('reason', '')})"
                                           for s in skipped)]
    _atomic(os.path.join(out, "gpu_check.md"), "\n".join(md) + "\n")


def main(argv):
    mode = argv[0]
    if mode == "record":
        logs, name, rc, start, end, limit, log = argv[1:8]
        cmd = " ".join(argv[9:]) if len(argv) > 8 and argv[8] == "--" else ""
        record(logs, name, rc, start, end, limit, log, cmd)
    elif mode == "skip":
        logs, name, reason = argv[1:4]
        cmd = " ".join(argv[5:]) if len(argv) > 4 and argv[4] == "--" else ""
        now = time.time()
        entry = {"name": name, "command": cmd, "status": "skipped", "rc": -1, "seconds": 0.0,
                 "start": now, "end": now, "limit_s": 0, "log": "", "reason": reason}
        with open(os.path.join(logs, "steps.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
    elif mode == "write":
        write(argv[1], argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
