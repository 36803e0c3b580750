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
region features' statistics, on the training subjects: :class:`PairScreen`), and the kept pairs
join the classifier's input beside the attended regions: screened together with the region
features they would crowd them out (docs/paper-mapping.md: not in the paper). Only the fit sees
all pairs; the model then holds and computes the kept ones, so its state and step stay small
however fine the cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from masan.model.regions import num_regions, pool_volume, split_patches
from masan.model.standardize import FittedStatistics, anova_f

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


def unit_rows(series: torch.Tensor) -> torch.Tensor:
    """``(B, N, T)`` rows centred and scaled to unit length, so a dot product of two rows is
    their Pearson correlation; a constant row (background) becomes 0."""
    centred = series - series.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    unit = centred / norm.clamp_min(torch.finfo(series.dtype).tiny ** 0.25)
    return torch.where(norm > 0, unit, torch.zeros_like(unit))


def correlations(series: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of ``(B, N, T)`` -> ``(B, N, N)``; a constant row
    (background) correlates 0 with everything, itself included."""
    unit = unit_rows(series)
    return unit @ unit.transpose(1, 2)


def fisher_z(r: torch.Tensor) -> torch.Tensor:
    """Fisher's z of correlations, ``|r|`` clipped at :data:`MAX_CORRELATION`."""
    return torch.atanh(r.clamp(-MAX_CORRELATION, MAX_CORRELATION))


def pair_cells(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells ``(i, j)``, ``i < j``, of pair ``index`` (int64, any shape) in the row-major upper
    triangle of an ``n x n`` matrix (the order of ``torch.triu_indices(n, n, 1)``), in closed
    form: no ``n^2`` table."""
    k = index.to(torch.float64)
    m = n * (n - 1) / 2
    i = n - 2 - torch.floor(torch.sqrt(-8 * k + 4 * n * (n - 1) - 7) / 2 - 0.5)
    j = k + i + 1 - m + (n - i) * (n - i - 1) / 2
    return i.long(), j.long()


class PairScreen(FittedStatistics):
    """Screening of many candidate features that keeps only the chosen ones in the model.

    During a fit, forwards of ``(B, P)`` candidates accumulate per-class sums (fp32: at ~10^7
    candidates fp64 sums would double a fit's memory, and a few hundred subjects' sums of
    values of order 1 lose nothing that ranks an F statistic); :meth:`end_fit` keeps the ``keep``
    of largest ANOVA F (as :class:`~masan.model.standardize.FittedStandardize` screens) and their
    mean and std (floored at ``std_floor`` x the median std of all candidates). Outside a fit,
    :meth:`forward` standardises the ``(B, keep)`` kept ones. The model's state holds only
    ``kept`` ``(keep,)`` int64 (ascending; the first ``keep`` until the first fit), ``mean`` and
    ``std`` ``(keep,)`` fp32: its size does not grow with the candidates.
    """

    FP32_BUFFERS = ("mean", "std")

    def __init__(self, candidates: int, keep: int, num_classes: int, std_floor: float, eps: float = 1e-6):
        if num_classes < 2:
            raise ValueError("the connectivity screening (model.connectivity_keep) needs at least 2 classes")
        super().__init__(num_classes)
        self.candidates, self.keep, self.std_floor, self.eps = int(candidates), int(keep), std_floor, eps
        self.register_buffer("kept", torch.arange(keep, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(keep))
        self.register_buffer("std", torch.ones(keep))
        self.register_buffer("fitted_samples", torch.zeros((), dtype=torch.long))

    def begin_fit(self) -> None:
        """Start accumulating: ``[count (C,) fp64, sum (C, P) fp32, sum of squares (C, P) fp32]``."""
        dev, c, p = self.mean.device, self.num_classes, self.candidates
        self._sums = [torch.zeros(c, dtype=torch.float64, device=dev),
                      torch.zeros(c, p, dtype=torch.float32, device=dev),
                      torch.zeros(c, p, dtype=torch.float32, device=dev)]

    def accumulate(self, candidates: torch.Tensor) -> None:
        """Add ``(B, P)`` candidates of the samples labelled by the last :meth:`set_labels`."""
        self._accumulate_rows(candidates)

    @torch.no_grad()
    def end_fit(self, rescreen: bool = True) -> None:
        """Choose the kept candidates (unless ``rescreen=False`` after an earlier fit) and set
        their mean and std from the (all-reduced) sums; stop accumulating."""
        counts, s, sq, n, mean, std = self._finish("connectivity")
        floor = max(float(self.std_floor * std.median()), self.eps)
        if rescreen or int(self.fitted_samples) == 0:
            f_stat = anova_f(counts, s, sq, floor**2)
            self.kept.copy_(torch.topk(f_stat, self.keep).indices.sort().values)
        self.mean.copy_(mean[self.kept])
        self.std.copy_(std[self.kept].clamp_min(floor))
        self.fitted_samples.fill_(int(n))

    def forward(self, kept: torch.Tensor) -> torch.Tensor:
        return (kept.float() - self.mean) / self.std


class PairConnectivity(nn.Module):
    """fMRI ``(B, T, X, Y, Z)`` -> the ``keep`` screened cell-pair correlations ``(B, keep)``, fp32.

    Candidates: the Fisher-z correlation of every pair of cells (upper triangle of the cell x cell
    matrix, cells ordered as :func:`cell_time_courses`), screened on the training cohort by
    :class:`PairScreen`. Only a fit computes all ``N (N - 1) / 2`` of them (an ``(B, N, N)``
    matrix); training and inference correlate the ``keep`` kept pairs only, so the cost after the
    fit is ``keep`` dot products of time courses. Any intensity scaling per voxel or subject
    leaves them unchanged (correlations); ``T >= 2`` frames.

    Args:
        grid: regions per axis (``model.patch_grid``).
        cells: cells per region and axis (``model.connectivity_cells``).
        keep: pairs kept by the screening (``model.connectivity_keep``).
        num_classes: classes of the screening's labels.
        std_floor: as the region features' (``model.region_std_floor``).
    """

    def __init__(self, grid: Sequence[int], cells: int, keep: int, num_classes: int, std_floor: float):
        super().__init__()
        if cells < 1:
            raise ValueError(f"model.connectivity_cells={cells}: use 0 (off) or a positive number of cells")
        self.grid, self.cells = tuple(grid), int(cells)
        n = self.num_cells
        if not 1 <= keep <= n * (n - 1) // 2:
            raise ValueError(f"model.connectivity_keep={keep}: keep between 1 and the {n * (n - 1) // 2} cell pairs "
                             f"of model.connectivity_cells={cells}")
        self.keep = int(keep)
        self.screen = PairScreen(n * (n - 1) // 2, keep, num_classes, std_floor)

    @property
    def num_cells(self) -> int:
        return num_regions(self.grid) * self.cells**3

    def forward(self, fmri: torch.Tensor) -> torch.Tensor:
        if fmri.shape[1] < 2:
            raise ValueError(f"connectivity needs at least 2 fMRI frames; got {fmri.shape[1]} "
                             "(model.fmri_frames, or set model.connectivity_cells=0)")
        courses = cell_time_courses(fmri.float(), self.grid, self.cells)  # (B, N, T)
        if self.screen.collecting:
            n = self.num_cells
            upper = torch.ones(n, n, dtype=torch.bool, device=courses.device).triu(1)
            self.screen.accumulate(fisher_z(correlations(courses))[:, upper])
        unit = unit_rows(courses)
        i, j = pair_cells(self.screen.kept, self.num_cells)
        return self.screen(fisher_z((unit[:, i] * unit[:, j]).sum(-1)))
