"""d2kd datasets. Importing this package registers ``digitsdet_train`` and ``digitsdet_val``."""
from .builtin import digitsdet_root, ensure_digitsdet, register_digitsdet

register_digitsdet()

__all__ = ["digitsdet_root", "ensure_digitsdet", "register_digitsdet"]
