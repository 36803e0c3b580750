"""T1-guided fusion of structural and functional region maps (eq. 6, Fig. 2) and its ablation.

Both modalities arrive as region maps of one encoder level, ``(B, C, Gx*k, Gy*k, Gz*k)``
(:func:`masan.model.regions.pool_cells` per patch / :func:`~masan.model.regions.pool_volume`), so
cell ``j`` is the same part of the brain in T1 and fMRI. Following eq. 6, both attentions are
computed from the T1 features only ("T1-guided") and re-weight the fMRI features, which are
then added to the T1 features::

    fused = f_T1 + f_fMRI * Attention_c(f_T1) * Attention_s(f_T1)

``Attention_c`` (what) is CBAM's channel attention: global max and average pooling over the
cells (Pmax, Pavg), a shared MLP, sum, sigmoid -> ``(B, C, 1, 1, 1)``. ``Attention_s`` (where)
is CBAM's spatial attention: max and mean over channels (Qmax, Qavg), a conv, sigmoid ->
``(B, 1, Gx*k, Gy*k, Gz*k)``.
"""

from __future__ import annotations

import torch
from torch import nn

from masan.model.blocks import Conv3d


class ChannelAttention(nn.Module):
    """``(B, C, D, H, W)`` -> channel weights in (0, 1), ``(B, C, 1, 1, 1)``."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.ReLU(), nn.Conv3d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pmax = x.amax(dim=(2, 3, 4), keepdim=True)
        pavg = x.mean(dim=(2, 3, 4), keepdim=True)
        return torch.sigmoid(self.mlp(pmax) + self.mlp(pavg))


class SpatialAttention(nn.Module):
    """``(B, C, D, H, W)`` -> spatial weights in (0, 1), ``(B, 1, D, H, W)``."""

    def __init__(self, kernel: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"model.spatial_kernel={kernel} must be odd so the region map keeps its size")
        self.conv = Conv3d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmax = x.amax(dim=1, keepdim=True)
        qavg = x.mean(dim=1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([qmax, qavg], dim=1)))


def _fmri_projection(fmri_channels: int, t1_channels: int) -> nn.Module:
    """1x1 conv bringing fMRI widths to T1 widths when model.fmri_channels differs."""
    return nn.Identity() if fmri_channels == t1_channels else nn.Conv3d(fmri_channels, t1_channels, 1)


class T1GuidedFusion(nn.Module):
    """Eq. 6: ``t1 + project(fmri) * Attention_c(t1) * Attention_s(t1)``.

    Inputs ``t1 (B, C_t1, D, H, W)``, ``fmri (B, C_f, D, H, W)`` -> ``(B, C_t1, D, H, W)``.
    """

    def __init__(self, t1_channels: int, fmri_channels: int, reduction: int, spatial_kernel: int):
        super().__init__()
        self.project = _fmri_projection(fmri_channels, t1_channels)
        self.channel = ChannelAttention(t1_channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, t1: torch.Tensor, fmri: torch.Tensor) -> torch.Tensor:
        return t1 + self.project(fmri) * self.channel(t1) * self.spatial(t1)


class AddFusion(nn.Module):
    """The paper's ablation (Fig. 3): element-wise sum ``t1 + project(fmri)``."""

    def __init__(self, t1_channels: int, fmri_channels: int):
        super().__init__()
        self.project = _fmri_projection(fmri_channels, t1_channels)

    def forward(self, t1: torch.Tensor, fmri: torch.Tensor) -> torch.Tensor:
        return t1 + self.project(fmri)


def build_fusion(kind: str, t1_channels: int, fmri_channels: int, reduction: int, spatial_kernel: int) -> nn.Module:
    """``kind``: ``attention`` (:class:`T1GuidedFusion`) or ``add`` (:class:`AddFusion`)."""
    if kind == "attention":
        return T1GuidedFusion(t1_channels, fmri_channels, reduction, spatial_kernel)
    if kind == "add":
        return AddFusion(t1_channels, fmri_channels)
    raise ValueError(f"model.fusion={kind!r}: use 'attention' or 'add'")
