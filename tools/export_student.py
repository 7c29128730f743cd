#!/usr/bin/env python
"""Export the student of a d2kd checkpoint: plain detectron2 weights, TorchScript or ONNX.

    # student-only weights (plain detectron2 keys); with --config-file also the student's
    # plain config next to them (student.yaml)
    python tools/export_student.py output/run/model_0000999.pth student.pth \\
        [--config-file output/run/config.yaml]
    # traced with detectron2's TracingAdapter on one image (default: the first image of
    # DATASETS.TEST[0]); CHECKPOINT is a distillation checkpoint or student-only weights
    python tools/export_student.py output/run/model_final_student.pth student.ts \\
        --format torchscript --config-file output/run/model_final_student.yaml
    python tools/export_student.py CHECKPOINT student.onnx --format onnx --config-file CFG

The weights load as MODEL.WEIGHTS of a vanilla detectron2 config of the student; inputs and
outputs of the traced formats: docs/deploy.md.
"""
import argparse
import importlib.util
import logging
import sys

from detectron2.data import DatasetCatalog

import d2kd  # noqa: F401  (registers d2kd's backbones, meta-architectures and datasets)
from d2kd.config import ConfigError, load_config
from d2kd.engine.export import build_student, export_student
from d2kd.engine.student_config import load_student_config
from d2kd.engine.tracing import export_onnx, export_torchscript, read_test_image

TRACED = {"torchscript": export_torchscript, "onnx": export_onnx}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by tools/train_net.py")
    parser.add_argument("output", help="the file to write")
    parser.add_argument("--format", choices=["weights"] + sorted(TRACED), default="weights")
    parser.add_argument("--config-file", default="",
                        help="the run's config (OUTPUT_DIR/config.yaml) or the student's plain "
                             "config; required by the traced formats")
    parser.add_argument("--sample-image", default="",
                        help="image to trace on (default: first image of DATASETS.TEST[0])")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def export_traced(args: argparse.Namespace) -> None:
    cfg = load_student_config(args.config_file, args.opts)
    if not (args.sample_image or cfg.DATASETS.TEST):
        raise ConfigError("--sample-image is needed: the config has no DATASETS.TEST.")
    sample = args.sample_image or DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
    image, _ = read_test_image(cfg, sample)
    TRACED[args.format](build_student(cfg, args.checkpoint), image, args.output)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.format == "weights":
            cfg = load_config(args.config_file, args.opts) if args.config_file else None
            export_student(args.checkpoint, args.output, cfg)
        elif not args.config_file:
            raise ConfigError(f"--format {args.format} needs --config-file (the model to build).")
        elif args.format == "onnx" and importlib.util.find_spec("onnx") is None:
            raise ConfigError("--format onnx needs the onnx package (pip install onnx).")
        else:
            export_traced(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
