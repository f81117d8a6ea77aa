"""Accuracy and macro F1 for single-label classification, as an ``evaluate`` metric script.

Shipped inside lion_hf so that ``evaluate.load(<path of this file>)`` works offline (no Hub
script download). The numbers come from :func:`lion_hf.experiments.metrics.classification_metrics`.
"""

import datasets
import evaluate

from lion_hf.experiments.metrics import classification_metrics

_DESCRIPTION = """\
Accuracy (share of exact matches) and macro F1 (mean over the classes present in references or
predictions of the per-class F1 = 2TP / (2TP + FP + FN), as scikit-learn's average="macro").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (int), or one row of logits per example (list of float).
    references: true class ids (int).
    num_labels (optional int): if given, every id must be below it.
Returns:
    accuracy (float), macro_f1 (float).
Examples:
    >>> metric = lion_hf.experiments.metrics.load_evaluate_metric()
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SentimentClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
            ],
        )

    def _compute(self, predictions, references, num_labels=None):
        return classification_metrics(predictions, references, num_labels=num_labels)
