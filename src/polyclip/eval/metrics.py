"""Classification metrics with the definitions used by scikit-learn.

Top-k accuracy, accuracy, balanced accuracy, per-class precision / recall / F1, macro and weighted F1
and the confusion matrix, computed with numpy from integer predictions. Definitions follow
``sklearn.metrics`` with its default arguments, so numbers match the papers that report them
(PLIP: macro F1 for linear probes and weighted F1 for zero-shot; FashionCLIP: weighted macro F1):

- macro F1 averages over the labels present in ``y_true`` or ``y_pred`` (sklearn's ``unique_labels``);
- weighted F1 weights each class by its support (its count in ``y_true``);
- balanced accuracy is the mean recall over classes present in ``y_true``;
- a precision or recall whose denominator is zero counts as 0 (sklearn's ``zero_division`` default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from polyclip.eval.errors import EvalError


def to_numpy(values) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device) or sequence."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)


def _as_labels(values, name: str) -> np.ndarray:
    array = to_numpy(values)
    if array.ndim != 1:
        raise EvalError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise EvalError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    true = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise EvalError(f"y_true and y_pred differ in length: {true.shape[0]} vs {pred.shape[0]}")
    for name, labels in (("y_true", true), ("y_pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise EvalError(f"{name} holds labels outside [0, {num_classes})")
    flat = true * num_classes + pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_k_accuracy(ranked_classes, y_true, k: int) -> float:
    """Share of samples whose true class is among the first ``k`` columns of ``ranked_classes``.

    ``ranked_classes`` is (N, K>=k) class indices, best first, as returned by ``torch.topk``.
    """
    ranked = to_numpy(ranked_classes)
    true = _as_labels(y_true, "y_true")
    if ranked.ndim != 2 or ranked.shape[0] != true.shape[0]:
        raise EvalError(f"ranked_classes must be (N, K) with N={true.shape[0]}, got {ranked.shape}")
    if ranked.shape[1] < k:
        raise EvalError(f"top-{k} accuracy needs at least {k} ranked classes, got {ranked.shape[1]}")
    if true.size == 0:
        raise EvalError("cannot compute an accuracy over zero samples")
    return float((ranked[:, :k] == true[:, None]).any(axis=1).mean())


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass
class ClassificationMetrics:
    """Metrics of one prediction run; fractions in [0, 1]."""

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    weighted_f1: float
    top_k: dict[int, float]  # k -> top-k accuracy, for the k the ranking allowed
    precision: np.ndarray  # (C,) per class
    recall: np.ndarray  # (C,)
    f1: np.ndarray  # (C,)
    support: np.ndarray  # (C,) count of each class in y_true
    confusion: np.ndarray  # (C, C) rows = true class
    class_names: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """The scalar metrics, named as in the reports."""
        scalars = {"accuracy": self.accuracy}
        for k, value in sorted(self.top_k.items()):
            if k != 1:
                scalars[f"top{k}_accuracy"] = value
        scalars.update(
            balanced_accuracy=self.balanced_accuracy, macro_f1=self.macro_f1, weighted_f1=self.weighted_f1
        )
        return scalars

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "per_class": {
                "class_names": list(self.class_names),
                "precision": self.precision.tolist(),
                "recall": self.recall.tolist(),
                "f1": self.f1.tolist(),
                "support": self.support.tolist(),
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def classification_metrics(
    y_true,
    y_pred,
    num_classes: int,
    class_names: list[str] | None = None,
    ranked_classes=None,
    top_ks: tuple[int, ...] = (1, 5),
) -> ClassificationMetrics:
    """All classification metrics from true labels and predictions.

    ``ranked_classes`` (N, K) enables top-k accuracy for every k in ``top_ks`` with k <= K and
    k < num_classes (top-k with k >= C is trivially 1 and is left out).
    """
    true = _as_labels(y_true, "y_true")
    if true.size == 0:
        raise EvalError("cannot compute metrics over zero samples")
    cm = confusion_matrix(true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # (C,) true counts
    predicted = cm.sum(axis=0)  # (C,) predicted counts
    precision = _safe_divide(tp, predicted.astype(np.float64))
    recall = _safe_divide(tp, support.astype(np.float64))
    f1 = _safe_divide(2 * tp, (support + predicted).astype(np.float64))  # 2TP / (2TP + FP + FN)
    present = (support + predicted) > 0  # sklearn's unique_labels(y_true, y_pred)
    top_k = {1: float(tp.sum() / true.size)}
    if ranked_classes is not None:
        ranked = to_numpy(ranked_classes)
        for k in top_ks:
            if 1 < k <= ranked.shape[1] and k < num_classes:
                top_k[k] = top_k_accuracy(ranked, true, k)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise EvalError(f"{len(names)} class names given for {num_classes} classes")
    return ClassificationMetrics(
        accuracy=top_k[1],
        balanced_accuracy=float(recall[support > 0].mean()),
        macro_f1=float(f1[present].mean()),
        weighted_f1=float((f1 * support).sum() / support.sum()),
        top_k=top_k,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        confusion=cm,
        class_names=names,
    )
