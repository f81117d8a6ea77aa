"""Hugging Face ``evaluate`` metric scripts shipped with lion_hf (loaded by path, offline).

Load them through :func:`lion_hf.experiments.metrics.load_evaluate_metric`, not by importing this package.
"""
