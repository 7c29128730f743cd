"""Set-up time: detectron2 for environments that have none (``python -m d2kd.apps.provision``).

An application, not part of the core: it runs pip. See :mod:`d2kd.apps.provision.build`.
"""
