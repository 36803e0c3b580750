"""Region self-attention (eq. 3-5).

Each region's feature vector is mapped to a query, key and value by 1x1 convolutions over
the regions (``W(q)``, ``W(k)``, ``W(v)`` of eq. 3; a 1x1 conv over the region axis is the
same linear map applied to every region), ``weight_ij = softmax_j(query_i . key_j)`` (eq. 4,
scaled by ``1/sqrt(attn_dim)`` as in the Transformer the paper builds on, which keeps the
softmax out of saturation at initialisation) and ``new_region_i = sum_j weight_ij value_j``
(eq. 5). Region features are standardised first (not in the paper): by default each feature of
each region by its mean and std over the training subjects (:class:`~masan.model.standardize.FittedStandardize`),
which removes the anatomy every subject shares and keeps what differs between subjects; ``layer``
is the Transformer's LayerNorm over each region's features, which only equalises the very
different scales of the pooled levels (on the phantom cohort the model then does not learn:
the between-subject differences stay a small fraction of a common offset, docs/architecture.md,
"Model"). The scores and the softmax run
in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from masan.model.standardize import FittedStandardize


class RegionSelfAttention(nn.Module):
    """Regions ``(B, R, D)`` -> ``(new regions (B, R, value_dim), weights (B, R, R))``.

    Each row of ``weights`` is a distribution over the regions attended to (sums to 1).
    """

    def __init__(self, in_features: int, attn_dim: int, value_dim: int, num_regions: int, norm: str,
                 std_floor: float, screen: int = 0, num_classes: int = 1):
        super().__init__()
        if norm == "cohort":
            self.norm: nn.Module = FittedStandardize((num_regions, in_features), std_floor, keep=screen,
                                                     num_classes=num_classes)
        elif screen:
            raise ValueError("model.screen_features needs model.region_norm=cohort (screening is fitted with the "
                             "cohort statistics)")
        elif norm == "layer":
            self.norm = nn.LayerNorm(in_features)
        else:
            raise ValueError(f"model.region_norm={norm!r}: use 'cohort' or 'layer'")
        self.query = nn.Conv1d(in_features, attn_dim, kernel_size=1)
        self.key = nn.Conv1d(in_features, attn_dim, kernel_size=1)
        self.value = nn.Conv1d(in_features, value_dim, kernel_size=1)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(self.norm(regions))

    def attend(self, standardized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3-5 on regions already standardised by ``self.norm`` (for occlusion: a region
        set to 0 is a region at the cohort mean)."""
        return self._mix(*self._project(standardized))

    def attend_occluded(self, standardized: torch.Tensor) -> torch.Tensor:
        """:meth:`attend` of every single-region occlusion at once: ``(B, R, D)`` ->
        new regions ``(B * R, R, value_dim)``, copy ``b * R + r`` having region ``r`` set to 0.

        The projections are 1x1 convolutions, so a zeroed region projects to the biases: they
        are computed once and region ``r``'s column replaced, instead of projecting ``R`` copies
        of all ``D`` features (the same numbers, ``R`` times cheaper).
        """
        q, k, v = self._project(standardized)
        b, r = q.shape[0], q.shape[-1]
        occluded = torch.eye(r, dtype=torch.bool, device=q.device)[None, :, None, :]  # (1, R copies, 1, R)

        def occlude(t: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
            bias = conv.bias if conv.bias is not None else t.new_zeros(t.shape[1])
            copies = torch.where(occluded, bias.to(t.dtype)[None, None, :, None], t[:, None])
            return copies.reshape(b * r, t.shape[1], r)

        new, _ = self._mix(occlude(q, self.query), occlude(k, self.key), occlude(v, self.value))
        return new

    def _project(self, standardized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = standardized.transpose(1, 2)  # (B, D, R): conv over regions
        return self.query(x), self.key(x), self.value(x)  # (B, attn|value, R)

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.einsum("bdi,bdj->bij", q.float(), k.float()) * self.scale
        weights = F.softmax(scores, dim=-1)
        new = torch.einsum("bij,bdj->bid", weights, v.float()).to(v.dtype)
        return new, weights
