"""Functional connectivity between the fMRI's cells: what fPM's convolutions cannot see.

fPM takes the frames as input channels, so each of its features mixes the time courses of one
neighbourhood: it sees how much and how a place fluctuates, but two structures tens of mm
apart (the hippocampus and the posterior cingulate) meet only in its coarsest level, averaged
with everything between them. Whether two distant structures fluctuate *together* (their
coupling, which weakens in AD: the hippocampus decouples from the default-mode hub) is a
correlation of their time courses, which no local filter computes.

:class:`PairConnectivity` computes it directly, without parameters: the run's mean time course
in each cell of the region grid (``G`` regions per axis, ``k`` cells per region and axis; at
``k`` = fMRI voxels per region a cell is a voxel), the Pearson correlation of every cell with
every other (Fisher z), one feature per pair. A coupling change between two small structures
is visible only where a cell is about a structure's size: larger cells average it with their
neighbours' network fluctuations (docs/validation-cohort.md measures it). Among the ~10^6 pairs
of such a grid a cohort of tens of subjects cannot fit a classifier, so the pairs have their own
cohort standardisation and ANOVA screening (``model.connectivity_keep`` pairs, fitted with the
region features' statistics, on the training subjects), and the kept pairs join the classifier's
input beside the attended regions: screened together with the region features they would crowd
them out (docs/paper-mapping.md: not in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from masan.model.regions import num_regions, pool_volume, split_patches
from masan.model.standardize import FittedStandardize

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


class PairConnectivity(nn.Module):
    """fMRI ``(B, T, X, Y, Z)`` -> the ``keep`` screened cell-pair correlations ``(B, keep)``, fp32.

    Features: the Fisher-z correlation of every pair of cells (upper triangle of the cell x cell
    matrix, cells ordered as :func:`cell_time_courses`), standardised by the training cohort and
    screened (:class:`~masan.model.standardize.FittedStandardize` with ``keep``); the kept pairs in
    index order. Before the first fit the first ``keep`` pairs pass. Any intensity scaling per voxel
    or subject leaves them unchanged (correlations); ``T >= 2`` frames.

    Args:
        grid: regions per axis (``model.patch_grid``).
        cells: cells per region and axis (``model.connectivity_cells``).
        keep: pairs kept by the screening (``model.connectivity_keep``).
        num_classes: classes of the screening's labels.
        std_floor: as the region features' (``model.region_std_floor``).
    """

    def __init__(self, grid: Sequence[int], cells: int, keep: int, num_classes: int, std_floor: float = 0.1):
        super().__init__()
        if cells < 1:
            raise ValueError(f"model.connectivity_cells={cells}: use 0 (off) or a positive number of cells")
        self.grid, self.cells = tuple(grid), int(cells)
        n = self.num_cells
        if not 1 <= keep <= n * (n - 1) // 2:
            raise ValueError(f"model.connectivity_keep={keep}: keep between 1 and the {n * (n - 1) // 2} cell pairs "
                             f"of model.connectivity_cells={cells}")
        self.keep = int(keep)
        self.norm = FittedStandardize((n * (n - 1) // 2,), std_floor, keep=keep, num_classes=num_classes)
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)

    @property
    def num_cells(self) -> int:
        return num_regions(self.grid) * self.cells**3

    def pair_cells(self, pair: int) -> tuple[int, int]:
        """The two cells (indices of :func:`cell_time_courses`) of feature ``pair``."""
        return int(self.pairs[0, pair]), int(self.pairs[1, pair])

    def kept(self) -> torch.Tensor:
        """Indices ``(keep,)`` of the pairs that pass the screening, ascending."""
        return self.norm.keep_mask.nonzero().flatten()[: self.keep]

    def forward(self, fmri: torch.Tensor) -> torch.Tensor:
        if fmri.shape[1] < 2:
            raise ValueError(f"connectivity needs at least 2 fMRI frames; got {fmri.shape[1]} "
                             "(model.fmri_frames, or set model.connectivity_cells=0)")
        series = cell_time_courses(fmri.float(), self.grid, self.cells)
        r = correlations(series)[:, self.pairs[0], self.pairs[1]]
        z = torch.atanh(r.clamp(-MAX_CORRELATION, MAX_CORRELATION))
        return self.norm(z)[:, self.kept()]
