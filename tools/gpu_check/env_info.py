#!/usr/bin/env python
"""Facts about the environment for tools/gpu_check.sh, as JSON.

    env_info.py torch OUT.json          python, torch / torchvision (version, location), GPU
    env_info.py detectron2 OUT.json     detectron2 version, location, compiled _C, CUDA kernels
    env_info.py install REPORT.json BEFORE.json AFTER.json OUT.json
        what pip's --dry-run report would install, and whether torch / torchvision were kept
        (exit 1 if the report installs torch, torchvision or an nvidia-* library, or if their
        version or location changed)
"""
import json
import os
import platform
import re
import sys


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(json.dumps(data, indent=1))


def torch_info():
    import torch
    import torchvision

    info = {
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_file": torch.__file__,
        "torchvision": torchvision.__version__, "torchvision_file": torchvision.__file__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    }
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    return info


def detectron2_info():
    import detectron2
    import torch

    info = {"detectron2": detectron2.__version__, "file": detectron2.__file__}
    from d2kd.compat import has_compiled_extension

    info["compiled"] = bool(has_compiled_extension())
    if info["compiled"]:
        import importlib

        _C = importlib.import_module("detectron2._C")  # the compiled extension

        for name in ("get_cuda_version", "get_compiler_version", "has_cuda"):
            fn = getattr(_C, name, None)
            if fn is not None:
                try:
                    info[name] = str(fn())
                except Exception as e:  # noqa: BLE001
                    info[name] = f"error: {e}"
    if torch.cuda.is_available():  # a compiled CUDA kernel of detectron2 on the GPU
        try:
            from detectron2.layers import nms_rotated

            boxes = torch.tensor([[10.0, 10.0, 8.0, 6.0, 0.0], [10.5, 10.0, 8.0, 6.0, 5.0],
                                  [40.0, 40.0, 6.0, 6.0, 30.0]], device="cuda")
            keep = nms_rotated(boxes, torch.tensor([0.9, 0.8, 0.7], device="cuda"), 0.5)
            info["nms_rotated_cuda"] = keep.cpu().tolist()
        except Exception as e:  # noqa: BLE001
            info["nms_rotated_cuda"] = f"error: {type(e).__name__}: {e}"[:300]
    return info


def install_check(report_path, before_path, after_path):
    with open(report_path) as f:
        report = json.load(f)
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    installs = [{"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                 "from_wheels": item.get("download_info", {}).get("url", "").endswith(".whl")}
                for item in report.get("install", [])]
    forbidden = [i["name"] for i in installs
                 if re.match(r"^(torch|torchvision|nvidia[-_].*)$", i["name"].lower())]
    kept = {k: before.get(k) == after.get(k) for k in
            ("torch", "torch_file", "torchvision", "torchvision_file")}
    ok = not forbidden and all(kept.values())
    return {"ok": ok, "resolution_failed": bool(report.get("resolution_failed")),
            "pip_would_install": installs, "forbidden_in_report": forbidden,
            "kept": kept, "torch_before": before.get("torch"), "torch_after": after.get("torch"),
            "torchvision_before": before.get("torchvision"),
            "torchvision_after": after.get("torchvision")}


def main():
    mode = sys.argv[1]
    if mode == "torch":
        _write(sys.argv[2], torch_info())
    elif mode == "detectron2":
        _write(sys.argv[2], detectron2_info())
    elif mode == "install":
        result = install_check(*sys.argv[2:5])
        _write(sys.argv[5], result)
        sys.exit(0 if result["ok"] else 1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
