"""Classification metrics with the paper's protocol: AD is the positive class (AD vs the rest).

The paper (Table 2) reports accuracy, precision and recall "calculated by treating AD as the
positive class (AD vs. NC and MCI)". A subject is predicted positive when the class called
for it is the positive class (the call follows ``data.decision``: arg-max, or the expected
stage of ordered classes, :func:`masan.predictions.decide`), so precision and recall equal the
one-vs-rest precision and recall of that class. ``binary_accuracy`` is the accuracy of that
positive-vs-rest decision (the paper's accuracy); ``accuracy`` is the plain multi-class
accuracy (the same for two classes).

Undefined values are None (``null`` in metrics.json, "n/a" in tables, left out of means), never
a number that reads as a result: recall and F1 of a class no true subject has (a cohort without
AD: every AD subject was found, and none missed), and precision when that class is also never
called. Precision is 0 when subjects of the class exist but none is called it: Table 2 must
punish a model that never calls AD. The same rule holds for ``per_class``.

:data:`METRICS` is the one registry of the scalar metrics: each entry says how the metric is
computed, its title in report tables, and whether it is a column of the paper's Table 2, of the
report's summary table and a TensorBoard hparams metric. ``classification_metrics`` (metrics.json),
``flat_scalars`` (TensorBoard tags, CSV columns), the report (``masan.evaluate.report``) and the
hparams of ``masan.train.logging`` all read it: a new metric is one :class:`Metric` entry.
Training (validation monitoring) and evaluation both use this module; it needs numpy and
scikit-learn only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

NLL_EPS = 1e-12
"""Probabilities are clipped to at least this before the log (a confident miss stays finite)."""


@dataclass(frozen=True)
class Scored:
    """What a metric is computed from: one set of predictions, checked."""

    y: np.ndarray
    """(N,) int64 true class indices."""
    p: np.ndarray
    """(N,) int64 predicted class indices."""
    pos: int
    """Index of the positive class."""
    probs: np.ndarray | None
    """(N, C) float64 class probabilities, or None."""
    ranking: np.ndarray | None = None
    """(N, C) float64 scores that rank subjects within a class for the AUC (None: ``probs``)."""

    @property
    def y_pos(self) -> np.ndarray:
        return self.y == self.pos

    @property
    def p_pos(self) -> np.ndarray:
        return self.p == self.pos

    def binary_prf(self) -> tuple[float | None, float | None, float | None]:
        """(precision, recall, F1) of the positive class vs the rest (None where undefined: see
        the module docstring)."""
        prec, rec, f1, _ = precision_recall_fscore_support(
            self.y_pos, self.p_pos, average="binary", pos_label=True, zero_division=0)
        return defined_prf(float(prec), float(rec), float(f1), int(self.y_pos.sum()), int(self.p_pos.sum()))


def defined_prf(precision: float, recall: float, f1: float, support: int, called: int
                ) -> tuple[float | None, float | None, float | None]:
    """(precision, recall, F1) of one class with None for the values that ``support`` true and
    ``called`` predicted subjects of it leave undefined (scikit-learn gives them 0)."""
    if support == 0:
        return (None if called == 0 else precision), None, None
    return precision, recall, f1


def _nll(s: Scored) -> float | None:
    if s.probs is None:
        return None
    # by hand: sklearn's log_loss warns on float32 softmax rows that sum to 1 +- 1e-7
    return float(-np.mean(np.log(np.clip(s.probs[np.arange(s.y.size), s.y], NLL_EPS, None))))


def _auc(s: Scored) -> float | None:
    if s.probs is None or not 0 < s.y_pos.sum() < s.y.size:
        return None  # no probabilities, or the positive class absent (or alone) in the labels
    return float(roc_auc_score(s.y_pos, (s.probs if s.ranking is None else s.ranking)[:, s.pos]))


@dataclass(frozen=True)
class Metric:
    """One scalar metric of a set of predictions."""

    name: str
    """Key in metrics.json, TensorBoard tag (``monitor_val/<name>``), CSV column."""
    title: str
    """Column title in the report's tables."""
    compute: Callable[[Scored], float | None]
    """The value; None where it is undefined (then left out of the scalars, "n/a" in tables)."""
    table: bool = False
    """A column of the paper's Table 2 (every run's metrics.json must have it)."""
    summary: bool = False
    """A column of the report's summary table (mean ± std over repeats)."""
    hparam: bool = False
    """A metric of the TensorBoard hparams view."""


METRICS: tuple[Metric, ...] = (
    Metric("binary_accuracy", "Accuracy", lambda s: float(accuracy_score(s.y_pos, s.p_pos)),
           table=True, summary=True, hparam=True),
    Metric("precision", "Precision", lambda s: s.binary_prf()[0], table=True, summary=True),
    Metric("recall", "Recall", lambda s: s.binary_prf()[1], table=True, summary=True),
    Metric("accuracy", "Accuracy (all classes)", lambda s: float(accuracy_score(s.y, s.p)), summary=True,
           hparam=True),
    Metric("f1", "F1", lambda s: s.binary_prf()[2], summary=True),
    Metric("auc", "AUC", _auc, summary=True),
    Metric("nll", "NLL", _nll),
)
"""Every scalar metric, in table order: the paper's three first (positive class vs the rest)."""

TABLE_METRICS = tuple(m.name for m in METRICS if m.table)
"""The three metrics of the paper's Table 2, in its column order."""
SUMMARY_METRICS = tuple(m.name for m in METRICS if m.summary)
"""Columns of the report's summary table."""
HPARAM_METRICS = tuple(m.name for m in METRICS if m.hparam)
"""Metrics shown in TensorBoard's hparams view."""
METRIC_TITLES = {m.name: m.title for m in METRICS}
PER_CLASS_METRICS = ("precision", "recall", "f1")
"""One-vs-rest metrics of every class (``per_class``; flat as ``<metric>/<class>``)."""


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
    scores: np.ndarray | None = None,
) -> dict:
    """All metrics of one set of predictions, as JSON-ready plain Python values.

    Args:
        labels: (N,) int true class indices into ``class_names``.
        preds: (N,) int predicted class indices.
        class_names: the C class names in model output order.
        positive_class: the class treated as positive (the paper: ``"AD"``).
        probs: optional (N, C) float class probabilities, for ``auc`` and ``nll``.
        scores: optional (N, C) float scores the AUC ranks by instead of ``probs`` (the head's
            own softmax where ``probs`` had label smoothing undone: :func:`masan.predictions.unsmoothed`).

    Returns:
        dict with ``n``, ``class_names``, ``positive_class``, ``accuracy`` (multi-class),
        ``binary_accuracy``/``precision``/``recall``/``f1`` (positive vs rest, fractions in
        [0, 1]; recall and F1 None without a true positive-class subject, precision None when
        there is none and none is called positive either), ``auc`` (positive-class ROC AUC,
        None when the test part has one side only or no probs), ``nll`` (mean negative
        log-likelihood, None without probs), ``per_class`` {name: {precision, recall, f1,
        support}} (None by the same rule) and ``confusion_matrix`` (C x C list, rows true
        class, columns predicted class).
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
    pr, sc = (_per_class(a, what, y.size, names) for a, what in ((probs, "probs"), (scores, "scores")))
    scored = Scored(y, p, pos, pr, sc)
    cls_p, cls_r, cls_f, cls_n = precision_recall_fscore_support(y, p, labels=ind, zero_division=0)
    called = np.bincount(p, minlength=len(names))
    return {
        "n": int(y.size),
        "class_names": names,
        "positive_class": positive_class,
        **{m.name: m.compute(scored) for m in METRICS},
        "per_class": {
            n: {**dict(zip(PER_CLASS_METRICS, defined_prf(float(a), float(b), float(c), int(d), int(k)))),
                "support": int(d)}
            for n, a, b, c, d, k in zip(names, cls_p, cls_r, cls_f, cls_n, called)
        },
        "confusion_matrix": confusion_matrix(y, p, labels=ind).tolist(),
    }


def _per_class(values: np.ndarray | None, what: str, n: int, names: Sequence[str]) -> np.ndarray | None:
    """``values`` as float64 (n, C), checked; None stays None."""
    if values is None:
        return None
    out = np.asarray(values, dtype=np.float64)
    if out.shape != (n, len(names)):
        raise MetricsError(f"{what} have shape {out.shape}; expected ({n}, {len(names)})")
    return out


def flat_scalars(metrics: dict) -> dict[str, float]:
    """The scalar metrics of :func:`classification_metrics` as a flat ``name -> float`` dict,
    per-class ones as ``precision/<class>``, ``recall/<class>``, ``f1/<class>`` (TensorBoard tags,
    CSV columns). Undefined (None) values, e.g. no AUC, are left out."""
    out = {m.name: float(metrics[m.name]) for m in METRICS if metrics.get(m.name) is not None}
    for name, m in metrics["per_class"].items():
        for k in PER_CLASS_METRICS:
            if m[k] is not None:
                out[f"{k}/{name}"] = float(m[k])
    return out


def prediction_metrics(preds, class_names: Sequence[str], positive_class: str) -> dict:
    """:func:`classification_metrics` of a :class:`masan.predictions.Predictions` (anything with
    ``labels``, ``preds``, ``probs`` and optionally ``scores``)."""
    return classification_metrics(preds.labels, preds.preds, class_names, positive_class, preds.probs,
                                  getattr(preds, "scores", None))


def undefined_note(metrics: dict) -> str | None:
    """One line naming the positive-class metrics of :func:`classification_metrics` that its
    subjects leave undefined (no true subject of that class), or None when all are defined."""
    undefined = [k for k in ("precision", "recall", "f1") if k in metrics and metrics[k] is None]
    if not undefined:
        return None
    pos = metrics["positive_class"]
    called = "" if "precision" in undefined else f" (precision stays defined: {pos} was called for some)"
    return (f"no {pos} subject among the {metrics['n']} with a diagnosis, so {', '.join(undefined)} of {pos} vs "
            f"the rest {'is' if len(undefined) == 1 else 'are'} undefined: null in metrics.json, not 0{called}")
