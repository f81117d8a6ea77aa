"""The experiments layer: what the recipes use to compare Lion with AdamW, not part of the optimizer.

* :mod:`lion_hf.experiments.data`: sentiment datasets (Hub tasks, local files read through
  ``datasets.load_dataset``, and an offline default), as ``text``/``label`` splits.
* :mod:`lion_hf.experiments.metrics`: accuracy and macro-F1, also as a local ``evaluate`` module.
* :mod:`lion_hf.experiments.records`: :class:`RunRecord`, the schema of one run's ``run.json``.
* :mod:`lion_hf.experiments.report`: Markdown/JSON/PNG reports over many run records.

The core (``lion_hf.optim``, ``lion_hf.trainer``, ``lion_hf.training_args``,
``lion_hf.param_groups``) never imports this package; ``tests/test_layout.py`` checks that.
"""
