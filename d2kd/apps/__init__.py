"""Applications on top of the d2kd library: what starts, searches, certifies and sets up.

- :mod:`d2kd.apps.launch`: training launchers (``tools/train_net.py``,
  ``tools/lazy_train_net.py``), multi-process and multi-machine, and the DigitsDet backbone
  pre-training;
- :mod:`d2kd.apps.search`: the DetKDS distiller search (``tools/search_net.py``);
- :mod:`d2kd.apps.certify`: matched-budget, multi-seed paired evidence for a gain
  (``tools/certify.py``);
- :mod:`d2kd.apps.provision`: detectron2 for environments that have none (``make setup``);
- :mod:`d2kd.apps.collect_env`: the environment report.

The library (every other package of ``d2kd``) never imports an application
(tests/test_layers.py).
"""
