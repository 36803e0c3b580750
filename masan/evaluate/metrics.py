"""Classification metrics with the paper's protocol: AD is the positive class (AD vs the rest).

The paper (Table 2) reports accuracy, precision and recall "calculated by treating AD as the
positive class (AD vs. NC and MCI)". A subject is predicted positive when the arg-max class
is the positive class, so precision and recall equal the one-vs-rest precision and recall of
that class. ``binary_accuracy`` is the accuracy of that positive-vs-rest decision (the
paper's accuracy); ``accuracy`` is the plain multi-class accuracy (the same for two classes).
Precision is 0 when nothing is predicted positive (scikit-learn ``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

TABLE_METRICS = ("binary_accuracy", "precision", "recall")
"""The three metrics of the paper's Table 2, in its column order."""


NLL_EPS = 1e-12
"""Probabilities are clipped to at least this before the log (a confident miss stays finite)."""


class MetricsError(ValueError):
    """Inputs to the metrics do not fit together; the message says what to change."""


def positive_index(class_names: Sequence[str], positive_class: str) -> int:
    """Index of ``positive_class`` in ``class_names`` (raises a MetricsError naming both)."""
    names = list(class_names)
    if positive_class not in names:
        raise MetricsError(
            f"positive class {positive_class!r} is not one of the model's classes {names}; "
            f"set data.positive_class to one of them"
        )
    return names.index(positive_class)


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    preds: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    positive_class: str,
    probs: np.ndarray | None = None,
) -> dict:
    """All metrics of one set of predictions, as JSON-ready plain Python values.

    Args:
        labels: (N,) int true class indices into ``class_names``.
        preds: (N,) int predicted class indices.
        class_names: the C class names in model output order.
        positive_class: the class treated as positive (the paper: ``"AD"``).
        probs: optional (N, C) float class probabilities, for ``auc`` and ``nll``.

    Returns:
        dict with ``n``, ``class_names``, ``positive_class``, ``accuracy`` (multi-class),
        ``binary_accuracy``/``precision``/``recall``/``f1`` (positive vs rest, fractions in
        [0, 1]), ``auc`` (positive-class ROC AUC, None when the test part has one side only or
        no probs), ``nll`` (mean negative log-likelihood, None without probs), ``per_class``
        {name: {precision, recall, f1, support}} and ``confusion_matrix`` (C x C list, rows
        true class, columns predicted class).
    """
    names = list(class_names)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    if y.shape != p.shape:
        raise MetricsError(f"{y.size} labels but {p.size} predictions; they must pair up")
    if y.size == 0:
        raise MetricsError("no predictions to score (empty test part?)")
    bad = sorted({int(v) for v in np.concatenate([y, p]) if not 0 <= v < len(names)})
    if bad:
        raise MetricsError(f"class indices {bad} are outside the {len(names)} classes {names}")
    pos = positive_index(names, positive_class)
    ind = list(range(len(names)))

    y_pos, p_pos = y == pos, p == pos
    prec, rec, f1, _ = precision_recall_fscore_support(
        y_pos, p_pos, average="binary", pos_label=True, zero_division=0
    )
    cls_p, cls_r, cls_f, cls_n = precision_recall_fscore_support(y, p, labels=ind, zero_division=0)
    out = {
        "n": int(y.size),
        "class_names": names,
        "positive_class": positive_class,
        "accuracy": float(accuracy_score(y, p)),
        "binary_accuracy": float(accuracy_score(y_pos, p_pos)),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "auc": None,
        "nll": None,
        "per_class": {
            n: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
            for n, a, b, c, d in zip(names, cls_p, cls_r, cls_f, cls_n)
        },
        "confusion_matrix": confusion_matrix(y, p, labels=ind).tolist(),
    }
    if probs is not None:
        pr = np.asarray(probs, dtype=np.float64)
        if pr.shape != (y.size, len(names)):
            raise MetricsError(f"probs have shape {pr.shape}; expected ({y.size}, {len(names)})")
        # by hand: sklearn's log_loss warns on float32 softmax rows that sum to 1 +- 1e-7
        out["nll"] = float(-np.mean(np.log(np.clip(pr[np.arange(y.size), y], NLL_EPS, None))))
        if 0 < y_pos.sum() < y.size:
            out["auc"] = float(roc_auc_score(y_pos, pr[:, pos]))
    return out


def flat_scalars(metrics: dict) -> dict[str, float]:
    """The scalar metrics of :func:`classification_metrics` as a flat ``name -> float`` dict,
    per-class ones as ``precision/<class>``, ``recall/<class>``, ``f1/<class>`` (TensorBoard tags,
    CSV columns). None values (no AUC) are left out."""
    keys = ("accuracy", "binary_accuracy", "precision", "recall", "f1", "auc", "nll")
    out = {k: float(metrics[k]) for k in keys if metrics.get(k) is not None}
    for name, m in metrics["per_class"].items():
        for k in ("precision", "recall", "f1"):
            out[f"{k}/{name}"] = float(m[k])
    return out
