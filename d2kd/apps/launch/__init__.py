"""Launchers: the application layer that starts trainings.

- :mod:`d2kd.apps.launch.train_net`: the training entry point
  (``python -m d2kd.apps.launch.train_net``, what ``tools/train_net.py`` runs);
- :mod:`d2kd.apps.launch.process`: a training as a child process (benchmarks, the demo,
  pre-training);
- :mod:`d2kd.apps.launch.pretrain`: pre-training the DigitsDet backbones a config names.

The core (config, modeling, heads, engine, ...) never imports this package.
"""
