"""Metrics with AD as the positive class, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from masan.metrics import MetricsError, classification_metrics, flat_scalars, undefined_note

CLASSES = ["NC", "MCI", "AD"]
#                 NC NC NC MCI MCI MCI AD AD AD AD
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
PREDS = np.array([0, 0, 2, 1, 0, 2, 2, 2, 2, 1])


def test_positive_class_metrics_by_hand():
    m = classification_metrics(LABELS, PREDS, CLASSES, "AD")
    # AD predicted for 5 subjects, 3 of them AD; 4 AD subjects, 3 found.
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # AD-vs-rest decision: correct for 3 AD + 4 of the 6 non-AD subjects
    assert m["binary_accuracy"] == pytest.approx(7 / 10)
    assert m["accuracy"] == pytest.approx(6 / 10)  # multi-class
    assert m["confusion_matrix"] == [[2, 0, 1], [1, 1, 1], [0, 1, 3]]
    assert m["per_class"]["NC"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                    "f1": pytest.approx(2 / 3), "support": 3}
    assert m["per_class"]["AD"]["precision"] == pytest.approx(m["precision"])
    assert m["n"] == 10 and m["class_names"] == CLASSES and m["positive_class"] == "AD"
    assert m["auc"] is None and m["nll"] is None


def test_probabilities_give_auc_and_nll():
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), PREDS] = 0.8
    m = classification_metrics(LABELS, PREDS, CLASSES, "AD", probs)
    assert m["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(10), LABELS])))
    assert 0.0 <= m["auc"] <= 1.0


def test_auc_ranks_by_the_positive_class_column_by_hand():
    """AD is neither the first nor the last class, and the NC column ranks the other way round:
    AUC = the share of (AD, other) pairs in which the AD subject has the higher P(AD)."""
    classes = ["NC", "AD", "MCI"]
    labels = np.array([0, 1, 2, 1, 0, 1])
    #                    NC    AD    MCI   AD    NC    AD
    p_ad = np.array([0.30, 0.60, 0.10, 0.20, 0.50, 0.90])
    probs = np.stack([0.9 - p_ad, p_ad, np.full(6, 0.1)], axis=1)
    # AD 0.60 beats 0.30, 0.10, 0.50; AD 0.20 beats 0.10 only; AD 0.90 beats all three: 7 of 9 pairs
    m = classification_metrics(labels, probs.argmax(1), classes, "AD", probs)
    assert m["auc"] == pytest.approx(7 / 9)
    # scores given: they rank, the probabilities do not (reversed here: 2 of 9 pairs)
    m = classification_metrics(labels, probs.argmax(1), classes, "AD", probs, scores=1 - probs)
    assert m["auc"] == pytest.approx(2 / 9) and m["nll"] == pytest.approx(-np.mean(np.log(probs[range(6), labels])))


def test_no_positive_prediction_gives_zero_precision():
    m = classification_metrics([0, 2], [0, 0], CLASSES, "AD")
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["binary_accuracy"] == 0.5


def test_flat_scalars_are_tensorboard_ready():
    flat = flat_scalars(classification_metrics(LABELS, PREDS, CLASSES, "AD"))
    assert {"accuracy", "binary_accuracy", "precision", "recall", "f1", "recall/MCI", "f1/AD"} <= set(flat)
    assert "auc" not in flat
    assert all(isinstance(v, float) for v in flat.values())


def test_errors_name_the_problem():
    with pytest.raises(MetricsError, match="data.positive_class"):
        classification_metrics(LABELS, PREDS, ["NC", "MCI", "LMCI"], "AD")
    with pytest.raises(MetricsError, match="pair up"):
        classification_metrics(LABELS, PREDS[:3], CLASSES, "AD")
    with pytest.raises(MetricsError, match="outside"):
        classification_metrics([0, 5], [0, 1], CLASSES, "AD")
    with pytest.raises(MetricsError, match="shape"):
        classification_metrics(LABELS, PREDS, CLASSES, "AD", np.zeros((10, 2)))


def test_without_a_true_positive_recall_and_f1_are_undefined_not_zero():
    called = classification_metrics([0, 1, 1], [0, 2, 1], CLASSES, "AD")  # no AD subject, one called AD
    assert called["recall"] is None and called["f1"] is None and called["precision"] == 0.0
    assert called["binary_accuracy"] == pytest.approx(2 / 3)
    perfect = classification_metrics([0, 1, 1], [0, 1, 1], CLASSES, "AD")  # a perfect result is no zero
    assert perfect["precision"] is None and perfect["recall"] is None and perfect["f1"] is None
    assert perfect["per_class"]["AD"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert perfect["per_class"]["NC"]["recall"] == 1.0
    flat = flat_scalars(perfect)
    assert "recall" not in flat and "recall/AD" not in flat and flat["recall/NC"] == 1.0
    assert undefined_note(perfect) == ("no AD subject among the 3 with a diagnosis, so precision, recall, f1 of AD "
                                       "vs the rest are undefined: null in metrics.json, not 0")
    assert "precision stays defined" in undefined_note(called)
    # AD subjects that are never called AD: precision 0 (Table 2 punishes a model that never calls AD)
    never = classification_metrics([0, 2], [0, 0], CLASSES, "AD")
    assert never["precision"] == 0.0 and never["recall"] == 0.0 and undefined_note(never) is None


def test_auc_is_undefined_not_a_crash_when_every_test_subject_is_positive():
    """A test part of AD subjects only (a tiny or binary cohort): the AUC is None, the other
    metrics are still computed (scikit-learn's roc_auc_score would raise)."""
    y = np.array([2, 2, 2])
    probs = np.array([[0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
    m = classification_metrics(y, probs.argmax(1), CLASSES, "AD", probs)
    assert m["auc"] is None
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == 1.0


def test_a_class_index_equal_to_the_class_count_is_refused():
    """Index C of C classes (an off-by-one in a label map) must not be scored silently."""
    with pytest.raises(MetricsError, match=r"class indices \[3\]"):
        classification_metrics([0, 1, 3], [0, 1, 2], CLASSES, "AD")
    with pytest.raises(MetricsError, match=r"class indices \[3\]"):
        classification_metrics([0, 1, 2], [0, 3, 2], CLASSES, "AD")
