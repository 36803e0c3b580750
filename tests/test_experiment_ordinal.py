"""The ordinal linear row (experiments/ordinal.py): a proportional-odds model fitted by sklearn on
replicated data recovers the axis and the cut-points it was drawn from, gives probabilities a
reader can trust, and runs inside the linear baseline's screening and cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import baselines
from experiments.ordinal import OrdinalLogistic


def _draw(n: int, seed: int = 0):
    """Labels 0..3 from a known proportional-odds model: y = #{k: x . w + logistic noise > b_k}."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    w, cuts = np.array([1.5, -1.0, 0.5, 0.0, 0.0]), np.array([-1.0, 0.5, 2.0])
    y = ((X @ w + rng.logistic(size=n))[:, None] > cuts[None]).sum(axis=1)
    return X, y, w, cuts


def test_the_axis_and_cut_points_are_recovered():
    X, y, w, cuts = _draw(4000)
    model = OrdinalLogistic(C=100.0).fit(X, y)
    assert model.coef_.shape == (1, 5) and list(model.classes_) == [0, 1, 2, 3]
    np.testing.assert_allclose(model.coef_[0], w, atol=0.15)
    np.testing.assert_allclose(model.cuts_, cuts, atol=0.2)
    assert np.all(np.diff(model.cuts_) > 0)  # ordered as drawn


def test_probabilities_are_a_distribution_that_moves_with_the_score():
    X, y, _, _ = _draw(300, seed=1)
    model = OrdinalLogistic(C=1.0).fit(X, y)
    probs = model.predict_proba(X)
    assert probs.shape == (300, 4) and probs.min() >= 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    order = np.argsort(model.decision_function(X))
    stage = probs[order] @ np.arange(4)
    assert np.all(np.diff(stage) >= -1e-12)  # a higher score never moves probability to an earlier stage
    crossed = OrdinalLogistic().fit(X, y)
    crossed.cuts_ = crossed.cuts_[::-1].copy()  # cut-points out of order: still a distribution
    assert crossed.predict_proba(X).min() >= 0
    with pytest.raises(ValueError, match="two classes"):
        OrdinalLogistic().fit(X, np.zeros(300, int))


def test_the_linear_baseline_screens_and_cross_validates_the_ordinal_head():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], 10)
    X = rng.normal(size=(40, 2500))
    X[:, 7] += 1.5 * y  # one feature along the stages among noise
    pipe, chosen = baselines.fit_linear(X, y, seed=0, ordinal=True)
    assert isinstance(pipe["classify"], OrdinalLogistic)
    assert chosen["k"]["all"] in baselines.K_CHOICES and chosen["C"] in baselines.C_CHOICES
    assert (pipe.predict(X) == y).mean() > 0.6
    weights = baselines.region_weights(pipe, {"all": np.arange(2500)}, np.arange(2500), 2500)
    assert weights.argmax() == 7
