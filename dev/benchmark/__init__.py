"""The benchmark sub-commands of ``tools/benchmark.py``, one module each (its ``add_command``
adds the sub-command's parser and code): experiment tooling of the checkout, outside the
installed package ``d2kd``."""
