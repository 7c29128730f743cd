#!/usr/bin/env python
"""Is a distillation's gain real? ``python -m d2kd.apps.certify`` (docs/certify.md):

    python tools/certify.py configs/DigitsDet/retinanet_R18_from_R50_mgd.yaml --seeds 3 \\
        --splits digitsdet_test --teacher-seeds 3
"""
from d2kd.apps.certify.__main__ import main

if __name__ == "__main__":
    main()
