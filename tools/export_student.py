#!/usr/bin/env python
"""Write the student of a d2kd checkpoint in plain detectron2 keys.

    python tools/export_student.py output/run/model_0000999.pth student.pth

The result loads as MODEL.WEIGHTS of a vanilla detectron2 config of the student.
"""
import argparse
import logging

from d2kd.engine.export import export_student


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by tools/train_net.py")
    parser.add_argument("output", help="where to write the student-only weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_student(args.checkpoint, args.output)


if __name__ == "__main__":
    main()
