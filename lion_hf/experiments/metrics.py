"""Classification metrics for the sentiment recipes: accuracy and macro F1, in numpy.

* :func:`classification_metrics` scores predictions (class ids, or logits of shape ``(n, K)``)
  against integer labels.
* :func:`compute_metrics_fn` wraps it for ``transformers.Trainer(compute_metrics=...)``.
* :func:`load_evaluate_metric` returns the same metric as a Hugging Face ``evaluate`` module.
  ``evaluate.load("accuracy")`` fetches its script from the Hub; this one is a script shipped
  inside the package (``lion_hf/experiments/evaluate_metrics/sentiment_classification.py``) and loads from
  its local path, so it works with ``HF_HUB_OFFLINE=1`` and no network.

Macro F1 follows scikit-learn's ``f1_score(average="macro")`` default: the mean over the
classes that occur in the labels or in the predictions, with per-class
``F1 = 2 TP / (2 TP + FP + FN)`` (0 for a class that occurs but is never predicted right).
A class absent from both is left out rather than counted as 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "evaluate_metrics" / "sentiment_classification.py"

__all__ = [
    "EVALUATE_METRIC_PATH",
    "classification_metrics",
    "compute_metrics_fn",
    "load_evaluate_metric",
    "to_class_ids",
]


def to_class_ids(predictions: Any) -> np.ndarray:
    """Class ids from logits ``(n, K)`` (argmax; ``(n, 1)`` = one binary logit, ``> 0`` is class 1)
    or from class ids ``(n,)``. A tuple (a model's logits plus extra outputs) uses its first item."""
    if isinstance(predictions, tuple):
        if not predictions:
            raise ValueError("predictions is an empty tuple")
        predictions = predictions[0]
    if hasattr(predictions, "detach"):  # a torch tensor
        predictions = predictions.detach().float().cpu().numpy()
    arr = np.asarray(predictions)
    if arr.ndim == 2:
        if arr.shape[1] == 1:
            return (arr[:, 0] > 0).astype(np.int64)
        if arr.shape[1] == 0:
            raise ValueError("predictions has shape (n, 0): no classes")
        return arr.argmax(axis=-1).astype(np.int64)
    if arr.ndim == 1:
        return _as_int_ids(arr, "predictions")
    raise ValueError(
        f"predictions must be class ids of shape (n,) or logits of shape (n, num_labels); got shape {arr.shape}"
    )


def _as_int_ids(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
        if bad.size:
            raise ValueError(f"{what} must be integer class ids; found non-integer values such as {bad[:3].tolist()}")
        return arr.astype(np.int64)
    raise ValueError(f"{what} must be integer class ids; found dtype {arr.dtype}")


def classification_metrics(predictions: Any, labels: Any, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro F1 of ``predictions`` (class ids or logits) against ``labels``.

    Args:
        predictions: class ids ``(n,)``, logits ``(n, K)`` or a tuple whose first item is either.
        labels: class ids ``(n,)`` (a ``(n, 1)`` array is flattened).
        num_labels: if given, every id must lie in ``0..num_labels-1`` (else ``ValueError``).

    Returns:
        ``{"accuracy": float, "macro_f1": float}``.

    Raises:
        ValueError: empty inputs, length mismatch, negative or out-of-range ids, non-integer labels.
    """
    preds = to_class_ids(predictions)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (n,); got shape {y.shape}")
    y = _as_int_ids(y, "labels")
    if preds.shape[0] != y.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {preds.shape[0]} vs {y.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("no examples to score: predictions and labels are empty")
    for name, ids in (("predictions", preds), ("labels", y)):
        if ids.min() < 0:
            raise ValueError(f"{name} contain negative class ids (min {int(ids.min())})")
        if num_labels is not None and ids.max() >= num_labels:
            raise ValueError(f"{name} contain class id {int(ids.max())} >= num_labels={num_labels}")
    k = int(max(preds.max(), y.max())) + 1
    if num_labels is not None:
        k = max(k, int(num_labels))
    # confusion[t, p] = count of examples with true class t predicted as p
    confusion = np.bincount(y * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)  # true count per class
    predicted = confusion.sum(axis=0)  # predicted count per class
    present = (support + predicted) > 0
    denom = support + predicted  # = 2 TP + FP + FN
    f1 = np.zeros(k, dtype=np.float64)
    f1[present] = 2.0 * tp[present] / denom[present]
    return {"accuracy": float(tp.sum() / y.shape[0]), "macro_f1": float(f1[present].mean())}


def compute_metrics_fn(num_labels: int | None = None) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` function for ``transformers.Trainer``: takes an ``EvalPrediction``
    (or a ``(predictions, label_ids)`` pair) and returns ``{"accuracy", "macro_f1"}``; the
    Trainer prefixes them (``eval_accuracy``, ``eval_macro_f1``)."""

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        if hasattr(eval_pred, "predictions") and hasattr(eval_pred, "label_ids"):
            predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        else:
            predictions, label_ids = eval_pred[0], eval_pred[1]
        if isinstance(label_ids, tuple):
            label_ids = label_ids[0]
        return classification_metrics(predictions, label_ids, num_labels=num_labels)

    return compute_metrics


def load_evaluate_metric(**kwargs: Any):
    """The metric as an ``evaluate.EvaluationModule``, loaded from the script inside this package
    (no Hub access, works offline). ``metric.compute(predictions=..., references=...)`` returns
    ``{"accuracy", "macro_f1"}``; pass ``num_labels=`` to ``compute`` to range-check ids.
    Extra keyword arguments go to ``evaluate.load`` (e.g. ``experiment_id``, ``cache_dir``)."""
    import evaluate

    return evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)
