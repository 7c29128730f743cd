"""``certify``: matched-budget, multi-seed, paired evidence for a distillation's gain
(``python -m d2kd.apps.certify``, docs/certify.md). An application: the core never imports it."""
