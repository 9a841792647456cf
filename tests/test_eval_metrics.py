"""Classification metrics equal scikit-learn's."""

import warnings

import numpy as np
import pytest
import torch

from polyclip.eval.errors import EvalError
from polyclip.eval.metrics import classification_metrics, confusion_matrix, top_k_accuracy

sk_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    y_true = rng.integers(0, num_classes - 1, size=200)  # class 6 never true
    y_pred = np.where(
        rng.random(200) < 0.6, y_true, rng.integers(0, num_classes - 2, size=200)
    )  # 5, 6 rarely
    y_pred[:3] = 6  # predicted but never true
    metrics = classification_metrics(y_true, y_pred, num_classes)
    assert metrics.accuracy == pytest.approx(sk_metrics.accuracy_score(y_true, y_pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that class 6 is predicted but never true
        balanced = sk_metrics.balanced_accuracy_score(y_true, y_pred)
        macro = sk_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
        weighted = sk_metrics.f1_score(y_true, y_pred, average="weighted", zero_division=0)
    assert metrics.balanced_accuracy == pytest.approx(balanced)
    assert metrics.macro_f1 == pytest.approx(macro)
    assert metrics.weighted_f1 == pytest.approx(weighted)
    labels = list(range(num_classes))
    np.testing.assert_array_equal(
        metrics.confusion, sk_metrics.confusion_matrix(y_true, y_pred, labels=labels)
    )
    precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    np.testing.assert_allclose(metrics.precision, precision)
    np.testing.assert_allclose(metrics.recall, recall)
    np.testing.assert_allclose(metrics.f1, f1)
    np.testing.assert_array_equal(metrics.support, support)


def test_macro_f1_ignores_classes_absent_from_truth_and_predictions_like_sklearn():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    metrics = classification_metrics(y_true, y_pred, num_classes=5)  # classes 2-4 appear nowhere
    assert metrics.macro_f1 == pytest.approx(sk_metrics.f1_score(y_true, y_pred, average="macro"))
    assert metrics.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_top_k_equals_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 10))
    y_true = rng.integers(0, 10, size=300)
    ranked = torch.from_numpy(scores).topk(5, dim=1).indices
    for k in (1, 3, 5):
        expected = sk_metrics.top_k_accuracy_score(y_true, scores, k=k, labels=np.arange(10))
        assert top_k_accuracy(ranked, y_true, k) == pytest.approx(expected)
    metrics = classification_metrics(y_true, ranked[:, 0], 10, ranked_classes=ranked, top_ks=(1, 5))
    assert metrics.summary()["top5_accuracy"] == pytest.approx(
        sk_metrics.top_k_accuracy_score(y_true, scores, k=5)
    )
    assert metrics.accuracy == pytest.approx(sk_metrics.top_k_accuracy_score(y_true, scores, k=1))


def test_known_answer_confusion_matrix():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        ([0, 1], [0], "differ in length"),
        ([0, 3], [0, 1], "outside"),
        ([0.5, 1.0], [0, 1], "integer"),
        ([], [], "zero samples"),
    ],
)
def test_bad_inputs_raise_readable_errors(y_true, y_pred, message):
    with pytest.raises(EvalError, match=message):
        classification_metrics(np.array(y_true), np.array(y_pred, dtype=np.int64), 3)
