#!/usr/bin/env python
"""Draw a detector's detections on images, like detectron2's demo (DefaultPredictor + Visualizer).

    python tools/predict.py --config-file output/run/model_final_student.yaml \\
        --input datasets/digitsdet/val --output output/predictions
    python tools/predict.py --config-file CFG --input a.png 'more/*.jpg' --output OUT \\
        --confidence-threshold 0.3 --opts MODEL.DEVICE cpu

Any d2kd or detectron2 config works (a distillation config predicts with its student); one
picture per input image is written to --output under the image's name.
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

import d2kd  # noqa: F401  (registers d2kd's backbones, meta-architectures and datasets)
from d2kd.config import ConfigError
from d2kd.engine.predict import (
    check_weights_exist,
    expand_inputs,
    predict_images,
    set_score_threshold,
)
from d2kd.engine.student_config import load_student_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True,
                        help="e.g. OUTPUT_DIR/model_final_student.yaml")
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of a drawn detection")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logger(name="d2kd")
    setup_logger(name="detectron2")
    try:
        cfg = load_student_config(args.config_file, args.opts)
        set_score_threshold(cfg, args.confidence_threshold)
        check_weights_exist(cfg)
        paths = expand_inputs(args.input)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    cfg.freeze()
    predict_images(cfg, paths, args.output)


if __name__ == "__main__":
    main()
