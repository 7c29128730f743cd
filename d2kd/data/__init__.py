"""d2kd datasets. Importing this package registers ``digitsdet_{train,val,test}`` and the
harder variant ``digitsdet_hard_{train,val,test}`` (d2kd/data/builtin.py)."""
from .builtin import (
    HARD_SPEC,
    digitsdet_root,
    ensure_digitsdet,
    register_builtin_datasets,
    register_digitsdet,
)

register_builtin_datasets()

__all__ = ["HARD_SPEC", "digitsdet_root", "ensure_digitsdet", "register_builtin_datasets",
           "register_digitsdet"]
