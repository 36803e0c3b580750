"""Functional connectivity on the region grid: what fPM's convolutions cannot see.

fPM takes the frames as input channels, so each of its features mixes the time courses of one
neighbourhood: it sees how much and how a place fluctuates, but two structures tens of mm
apart (the hippocampus and the posterior cingulate) meet only in its coarsest level, averaged
with everything between them. Whether two distant structures fluctuate *together* (their
coupling, which weakens in AD: the hippocampus decouples from the default-mode hub) is a
correlation of their time courses, which no local filter computes.

:class:`RegionConnectivity` computes it directly, without parameters: the run's mean time course
in each cell of the region grid (``G`` regions per axis, ``k`` cells per region and axis, as
``model.fusion_cells`` cuts the fused maps), the Pearson correlation of every cell with every
other (Fisher z), and for each region the rows of its ``k^3`` cells. These features join the
fused region features before the cohort standardisation and screening, so the same univariate
screening chooses among them (docs/paper-mapping.md: not in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from masan.model.regions import num_regions, pool_volume, split_patches

MAX_CORRELATION = 0.999
"""|r| is clipped here before Fisher's z: a cell correlated with itself (r = 1) stays finite."""


def cell_time_courses(fmri: torch.Tensor, grid: Sequence[int], cells: int) -> torch.Tensor:
    """Mean time course of every cell, region by region: ``(B, T, X, Y, Z)`` -> ``(B, R * k^3, T)``
    with ``R`` regions of ``grid`` and ``k = cells``; cell ``r * k^3 + c`` is cell ``c`` (C order
    over its ``k x k x k`` sub-grid) of region ``r`` (C order over the grid)."""
    b, t = fmri.shape[:2]
    cell_map = pool_volume(fmri, grid, cells, ["avg"])  # (B, T, Gx*k, Gy*k, Gz*k)
    per_region = split_patches(cell_map, grid, "fMRI cell map")  # (B*R, T, k, k, k)
    r = num_regions(grid)
    return per_region.reshape(b, r, t, cells**3).permute(0, 1, 3, 2).reshape(b, r * cells**3, t)


def correlations(series: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of ``(B, N, T)`` -> ``(B, N, N)``; a constant row
    (background) correlates 0 with everything, itself included."""
    centred = series - series.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    unit = centred / norm.clamp_min(torch.finfo(series.dtype).tiny ** 0.25)
    unit = torch.where(norm > 0, unit, torch.zeros_like(unit))
    return unit @ unit.transpose(1, 2)


class RegionConnectivity(nn.Module):
    """fMRI ``(B, T, X, Y, Z)`` -> per-region connectivity features ``(B, R, k^3 * R * k^3)``, fp32.

    Region ``r``'s features are the Fisher-z correlations of each of its ``k^3`` cells with all
    ``R * k^3`` cells of the grid. ``T >= 2`` frames; any intensity scaling per voxel or subject
    leaves them unchanged (correlations).
    """

    def __init__(self, grid: Sequence[int], cells: int):
        super().__init__()
        if cells < 1:
            raise ValueError(f"model.connectivity_cells={cells}: use 0 (off) or a positive number of cells")
        self.grid, self.cells = tuple(grid), int(cells)

    @property
    def features_per_region(self) -> int:
        return self.cells**3 * num_regions(self.grid) * self.cells**3

    def forward(self, fmri: torch.Tensor) -> torch.Tensor:
        if fmri.shape[1] < 2:
            raise ValueError(f"connectivity needs at least 2 fMRI frames; got {fmri.shape[1]} "
                             "(model.fmri_frames, or set model.connectivity_cells=0)")
        series = cell_time_courses(fmri.float(), self.grid, self.cells)
        z = torch.atanh(correlations(series).clamp(-MAX_CORRELATION, MAX_CORRELATION))
        b, r = fmri.shape[0], num_regions(self.grid)
        return z.reshape(b, r, self.features_per_region)
