"""A linear cumulative-link classifier: the linear analogue of MASAN's ordinal head
(masan.model.heads.OrdinalClassifier), so a fitted row can be scored with the same kind of head
and the network's margin is not the head's.

The classes are ordered stages 0..K-1; one score ``s = x . w`` places a subject on the disease
axis and ``K - 1`` cut-points split it: ``P(y > k) = sigmoid(s - b_k)`` (proportional odds).
It is fitted by scikit-learn's L2 logistic regression on the data replicated once per cut-point
(Cardoso & da Costa, JMLR 2007): copy ``k`` of a subject carries the target ``y > k`` and a
one-hot column for its cut-point, so one weight vector ``w`` is shared by every cut and the
cut-points are the intercept plus the one-hot columns' weights.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

CUT_SCALE = 10.0
"""Value of a copy's one-hot cut-point column: the L2 penalty on its weight shrinks by its
square, so the cut-points are all but unpenalised (the intercept, the first cut, is not
penalised at all) while ``w`` keeps the penalty of ``C``."""


class OrdinalLogistic(ClassifierMixin, BaseEstimator):
    """Proportional-odds logistic regression on features ``X`` (N, F), labels ``y`` (N,) ordered
    stages. ``C``: inverse L2 strength per subject (as in :class:`LogisticRegression`: the
    replicated data's loss is divided by the ``K - 1`` copies). After :meth:`fit`: ``classes_``
    (K,), ``coef_`` (1, F) the shared ``w``, ``cuts_`` (K - 1,) the cut-points ``b_k``."""

    def __init__(self, C: float = 1.0, max_iter: int = 5000):
        self.C, self.max_iter = C, max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> OrdinalLogistic:
        X = np.asarray(X, dtype=np.float64)
        self.classes_ = np.unique(y)
        stage = np.searchsorted(self.classes_, y)
        cuts = len(self.classes_) - 1
        if cuts < 1:
            raise ValueError("an ordinal model needs at least two classes in the training part")
        onehot = np.kron(np.eye(cuts), np.ones((len(X), 1))) * CUT_SCALE  # copy k: CUT_SCALE in column k
        replicated = np.hstack([np.tile(X, (cuts, 1)), onehot[:, 1:]])  # the first cut is the intercept
        target = np.concatenate([stage > k for k in range(cuts)])
        lr = LogisticRegression(C=self.C / cuts, max_iter=self.max_iter).fit(replicated, target)
        self.coef_ = lr.coef_[:, :X.shape[1]]
        offsets = np.concatenate([[0.0], lr.coef_[0, X.shape[1]:] * CUT_SCALE])
        self.cuts_ = -(lr.intercept_[0] + offsets)  # P(y > k) = sigmoid(x . w - b_k)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N,) the score ``s = x . w`` on the disease axis."""
        return np.asarray(X, dtype=np.float64) @ self.coef_[0]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) class probabilities: differences of the cumulative ``P(y > k)``, made
        non-increasing in ``k`` where unordered cut-points would cross."""
        above = expit(self.decision_function(X)[:, None] - self.cuts_[None])
        above = np.minimum.accumulate(above, axis=1)
        bounds = np.hstack([np.ones((len(above), 1)), above, np.zeros((len(above), 1))])
        return bounds[:, :-1] - bounds[:, 1:]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
