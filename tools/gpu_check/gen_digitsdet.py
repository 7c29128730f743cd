#!/usr/bin/env python
"""Generate DigitsDet for tools/gpu_check.sh before detectron2 is installed.

``python -m d2kd.data.digitsdet`` imports ``d2kd.data``, which registers the dataset in
detectron2's catalogs and so needs detectron2. The generator itself
(``d2kd/data/digitsdet/generator.py``) needs only numpy, Pillow, pycocotools, tqdm and
scikit-learn: loading that one file lets the dataset be generated while detectron2 compiles.
The files are the ones ``import d2kd`` would generate (same function, same spec).

    python tools/gpu_check/gen_digitsdet.py --out DIR [--num-train N --num-val M]
"""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    path = os.path.join(REPO, "d2kd", "data", "digitsdet", "generator.py")
    spec = importlib.util.spec_from_file_location("_digitsdet_generator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(sys.argv[1:])


if __name__ == "__main__":
    main()
