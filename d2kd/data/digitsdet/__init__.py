"""DigitsDet, the embedded benchmark: ``python -m d2kd.data.digitsdet --out DIR ...``."""
from .generator import (
    AREA_MEDIUM_MAX,
    AREA_SMALL_MAX,
    SPLIT_POOL,
    SPLITS,
    THING_CLASSES,
    DigitsDetSpec,
    add_split,
    digit_pool_indices,
    generate_digitsdet,
    generate_image,
    main,
)

__all__ = [
    "AREA_MEDIUM_MAX",
    "AREA_SMALL_MAX",
    "SPLIT_POOL",
    "SPLITS",
    "THING_CLASSES",
    "DigitsDetSpec",
    "add_split",
    "digit_pool_indices",
    "generate_digitsdet",
    "generate_image",
    "main",
]
