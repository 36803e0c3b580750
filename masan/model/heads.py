"""The subject-level classifier heads: region features ``(B, F)`` -> class logits ``(B, C)``.

- :class:`MLPClassifier` (``model.head=softmax``, the paper's Sec. 2.3): ``Linear -> ReLU ->
  Dropout -> Linear C``, one free logit per class, trained by the cross-entropy of its softmax.
- :class:`OrdinalClassifier` (``model.head=ordinal``): the classes are ordered stages
  (NC < EMCI < LMCI < AD), and the subject is placed on one disease axis: the same MLP gives one
  score ``s`` and ``C - 1`` increasing cut-points ``b_k`` split the axis (a cumulative-link model,
  ``P(y > k) = sigmoid(s - b_k)``). Every stage then teaches the one direction that separates AD
  from the rest, and a higher score moves probability to later stages only. It returns
  ``log P(y = k)`` as its logits, so the softmax, the (class-weighted) cross-entropy and every
  reader of logits work unchanged: ``softmax(log p) = p`` and the cross-entropy of ``log p`` is
  the ordinal model's negative log-likelihood.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PROB_FLOOR = 1e-12
"""Smallest class probability of the ordinal head before the log (a confident miss stays finite)."""


def mlp(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout -> Linear``: ``(B, in_features)`` -> ``(B, out_features)``;
    ``hidden`` 0: ``Dropout -> Linear``, one fully connected layer (the paper's Sec. 3.2 wording)."""
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


class MLPClassifier(nn.Module):
    """``Linear -> ReLU -> Dropout -> Linear`` (or one layer, :func:`mlp`): features ``(B, F)`` ->
    logits ``(B, C)``."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.net = mlp(in_features, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OrdinalClassifier(nn.Module):
    """Cumulative-link head over ``num_classes`` ordered classes: features ``(B, F)`` -> fp32
    ``(B, C)`` log-probabilities (see the module docstring). The cut-points start evenly spaced,
    one unit apart, centred on 0, and stay increasing (the first plus softplus gaps)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an ordinal head needs at least 2 classes, got {num_classes}")
        self.net = mlp(in_features, hidden, 1, dropout)
        self.first_cut = nn.Parameter(torch.full((1,), -(num_classes - 2) / 2))  # (1,): engines broadcast no 0-d
        # softplus(log(e - 1)) = 1: unit gaps at the start
        self.cut_gaps = nn.Parameter(torch.full((num_classes - 2,), math.log(math.expm1(1.0))))

    def cut_points(self) -> torch.Tensor:
        """fp32 ``(C - 1,)`` increasing cut-points ``b_k`` of the disease axis."""
        gaps = F.softplus(self.cut_gaps.float())
        return self.first_cut.float() + torch.cat([gaps.new_zeros(1), gaps.cumsum(0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.net(x).float()  # (B, 1): where the subject sits on the axis
        above = torch.sigmoid(score - self.cut_points())  # (B, C - 1): P(y > k)
        ones, zeros = above.new_ones(above.shape[0], 1), above.new_zeros(above.shape[0], 1)
        probs = torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)  # P(y = k)
        return probs.clamp_min(PROB_FLOOR).log()


HEADS = {"softmax": MLPClassifier, "ordinal": OrdinalClassifier}
"""``model.head`` -> its class."""


def build_classifier(kind: str, in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Module:
    """The head ``kind`` (``model.head``): ``(B, in_features)`` -> ``(B, num_classes)`` logits."""
    if kind not in HEADS:
        raise ValueError(f"model.head={kind!r}: use one of {sorted(HEADS)}")
    return HEADS[kind](in_features, hidden, num_classes, dropout)
