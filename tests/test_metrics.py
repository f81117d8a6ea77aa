"""lion_hf.experiments.metrics: accuracy and macro F1 against scikit-learn, logits, the Trainer-style function,
and the packaged `evaluate` metric loaded offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lion_hf.experiments.metrics import EVALUATE_METRIC_PATH, classification_metrics, compute_metrics_fn, to_class_ids

skm = pytest.importorskip("sklearn.metrics")


def oracle(preds, labels):
    return {"accuracy": skm.accuracy_score(labels, preds), "macro_f1": skm.f1_score(labels, preds, average="macro")}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_sklearn_on_random_data(seed, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
    got = classification_metrics(preds, labels, num_labels=k)
    want = oracle(preds, labels)
    assert got.keys() == {"accuracy", "macro_f1"}
    assert all(type(v) is float for v in got.values())
    assert got == pytest.approx(want, abs=1e-12)


def test_class_never_predicted_and_class_only_predicted():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 1, 0])  # class 2 never predicted
    assert classification_metrics(preds, labels, num_labels=3) == pytest.approx(oracle(preds, labels))
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 2, 1, 1])  # class 2 predicted but absent from the labels
    assert classification_metrics(preds, labels) == pytest.approx(oracle(preds, labels))
    # a class in neither is left out of the mean, as in scikit-learn
    assert classification_metrics([0, 1], [0, 1], num_labels=5) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_logits_are_argmaxed():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 40)
    got = classification_metrics(logits, labels, num_labels=3)
    assert got == pytest.approx(oracle(logits.argmax(-1), labels))
    assert list(to_class_ids(np.array([[0.3], [-1.0]]))) == [1, 0]  # one binary logit
    assert list(to_class_ids((logits[:2], "hidden states"))) == list(logits[:2].argmax(-1))


def test_torch_tensors_and_float_ids():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], dtype=torch.bfloat16)
    assert classification_metrics(logits, torch.tensor([0, 1, 1])) == pytest.approx(oracle([0, 1, 0], [0, 1, 1]))
    assert classification_metrics(np.array([0.0, 1.0]), np.array([[0], [1]]))["accuracy"] == 1.0


def test_trainer_style_function():
    from transformers import EvalPrediction

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(25, 2))
    labels = rng.integers(0, 2, 25)
    fn = compute_metrics_fn(num_labels=2)
    want = oracle(logits.argmax(-1), labels)
    assert fn(EvalPrediction(predictions=logits, label_ids=labels)) == pytest.approx(want)
    assert fn(EvalPrediction(predictions=(logits, np.zeros((25, 4))), label_ids=labels)) == pytest.approx(want)
    assert fn((logits, labels)) == pytest.approx(want)


@pytest.mark.parametrize(
    "preds,labels,num_labels,match",
    [
        ([0, 1, 1], [0, 1], None, "differ in length: 3 vs 2"),
        (np.zeros((3, 2)), [0, 1], None, "differ in length"),
        ([], [], None, "empty"),
        ([0, 1], [0, 2], 2, "num_labels=2"),
        ([0, -1], [0, 1], None, "negative"),
        ([0, 1], [0.5, 1], None, r"non-integer.*0\.5"),
        (np.zeros((2, 2, 2)), [0, 1], None, "shape"),
        (["a", "b"], [0, 1], None, "dtype"),
    ],
)
def test_bad_input(preds, labels, num_labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(preds, labels, num_labels=num_labels)


def test_evaluate_module_offline(tmp_path):
    """evaluate.load of the packaged script with the Hub switched off, in a fresh process."""
    assert EVALUATE_METRIC_PATH.is_file()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    code = textwrap.dedent("""
        import json
        from lion_hf.experiments.metrics import load_evaluate_metric
        m = load_evaluate_metric()
        out = {"ids": m.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]),
               "logits": m.compute(predictions=[[0.1, 0.9], [2.0, 1.0]], references=[1, 1])}
        m.add_batch(predictions=[0, 1], references=[0, 0])
        m.add_batch(predictions=[2], references=[2])
        out["batches"] = m.compute(num_labels=3)
        print(json.dumps(out))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids"] == pytest.approx(oracle([0, 1, 1, 2], [0, 1, 0, 2]))
    assert out["logits"] == pytest.approx(oracle([1, 0], [1, 1]))
    assert out["batches"] == pytest.approx(oracle([0, 1, 2], [0, 0, 2]))
