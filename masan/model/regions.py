"""The model's own patch grid (region pooling inside MASAN and H-FCN): volumes <-> patches,
feature maps -> regions, region values -> voxels. Ranking and naming regions for reports is
:mod:`masan.evaluate.region_ranking`.

Region ``i`` is patch ``i`` of the non-overlapping ``grid = (Gx, Gy, Gz)`` split of a volume,
numbered in C order: ``i = (gx * Gy + gy) * Gz + gz``. The same numbering is used for T1,
for fMRI (whose frame covers the same field of view) and in ``out["region_weights"]``,
so region ``i`` is the same part of the brain in both modalities and in figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from masan.model.blocks import channels_first, is_channels_last, separable, voxels_last
from masan.model.fastpaths import FastPaths, resolve

POOL_MODES = ("avg", "max")


def num_regions(grid: Sequence[int]) -> int:
    """R = Gx * Gy * Gz."""
    return math.prod(grid)


def patch_shape(volume_shape: Sequence[int], grid: Sequence[int], what: str = "volume") -> tuple[int, ...]:
    """Voxels of one patch per axis; raises if the volume does not divide into the grid."""
    if len(volume_shape) != len(grid) or any(s % g for s, g in zip(volume_shape, grid)):
        raise ValueError(
            f"{what} of spatial shape {tuple(volume_shape)} cannot be cut into the patch grid "
            f"{tuple(grid)}: every axis must be a multiple of model.patch_grid "
            f"(crop or pad the data, or change model.patch_grid)"
        )
    return tuple(s // g for s, g in zip(volume_shape, grid))


def split_patches(x: torch.Tensor, grid: Sequence[int], what: str = "volume") -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B*R, C, X/Gx, Y/Gy, Z/Gz)``, subject-major, regions in C order."""
    b, c = x.shape[:2]
    (gx, gy, gz), (px, py, pz) = grid, patch_shape(x.shape[2:], grid, what)
    x = x.reshape(b, c, gx, px, gy, py, gz, pz).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b * gx * gy * gz, c, px, py, pz)


def merge_patches(p: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`split_patches`: ``(B*R, C, px, py, pz)`` -> ``(B, C, Gx*px, Gy*py, Gz*pz)``."""
    gx, gy, gz = grid
    n, c, px, py, pz = p.shape
    b = n // (gx * gy * gz)
    p = p.reshape(b, gx, gy, gz, c, px, py, pz).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return p.reshape(b, c, gx * px, gy * py, gz * pz)


def _check_modes(modes: Sequence[str]) -> None:
    if not modes or any(m not in POOL_MODES for m in modes):
        raise ValueError(f"model.region_pool={list(modes)!r}: use a non-empty list of {list(POOL_MODES)}")


def _adaptive_pool(x: torch.Tensor, size: tuple[int, ...], modes: Sequence[str],
                   paths: FastPaths | None = None) -> torch.Tensor:
    _check_modes(modes)
    return torch.cat([_pool(x, size, m, paths) for m in modes], dim=1)


def _split_axes(dims: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """Spatial axes ``(D, H, W)`` cut into ``size`` equal blocks: ``(s0, D/s0, s1, H/s1, s2, W/s2)``."""
    return tuple(v for d, s in zip(dims, size) for v in (s, d // s))


def block_view(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, C, D, H, W)`` cut into ``size`` equal blocks per axis, as a view
    ``(N, C, s0, D/s0, s1, H/s1, s2, W/s2)``: block ``(i, j, k)`` is ``[:, :, i, :, j, :, k, :]``."""
    n, c = x.shape[:2]
    return x.reshape(n, c, *_split_axes(x.shape[2:], size))


class _BlockMax(torch.autograd.Function):
    """``(N, C, D, H, W)`` -> ``(N, C, *size)``: the max of each equal block, as max pooling gives
    it (one arg-max voxel per block takes the gradient). The backward writes the gradient to
    those voxels by index; differentiating ``amax`` instead splits it over ties with
    full-resolution mask passes, extra sweeps over the largest maps of the step
    (docs/performance.md, "On the target card"). The gradient has ``x``'s
    layout (NCDHW or channels-last): the index is a memory offset by ``x``'s strides."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        if not (x.is_contiguous() or is_channels_last(x)):
            x = x.contiguous()
        n, c, *dims = x.shape
        b = [d // s for d, s in zip(dims, size)]
        blocks = block_view(x, size).permute(0, 1, 2, 4, 6, 3, 5, 7)
        values, idx = blocks.reshape(n, c, *size, -1).max(dim=-1)
        # the arg-max voxel: block origin + offset inside the block, per spatial axis
        axes = [torch.arange(s, device=x.device).view(*(-1 if i == a else 1 for i in range(3))) * bb
                for a, (s, bb) in enumerate(zip(size, b))]
        offset = [idx // (b[1] * b[2]), (idx // b[2]) % b[1], idx % b[2]]
        sn, sc, *sv = x.stride()
        plane = (torch.arange(n, device=x.device).view(n, 1, 1, 1, 1) * sn
                 + torch.arange(c, device=x.device).view(1, c, 1, 1, 1) * sc)
        ctx.save_for_backward(plane + sum((axes[a] + offset[a]) * sv[a] for a in range(3)))
        ctx.shape, ctx.strides = x.shape, x.stride()
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape.numel())
        out[flat.flatten()] = grad.flatten()
        return out.as_strided(ctx.shape, ctx.strides), None


def _block_mean(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The mean of each equal block, ``(N, C, D, H, W)`` -> ``(N, C, *size)``; on a channels-last
    ``x`` computed on its NDHWC view, so that the gradient keeps that layout."""
    if not is_channels_last(x):
        return block_view(x, size).mean(dim=(3, 5, 7))
    n, c = x.shape[:2]
    cells = voxels_last(x).reshape(n, *_split_axes(x.shape[2:], size), c)
    return channels_first(cells.mean(dim=(2, 4, 6)))


def _pool(x: torch.Tensor, size: tuple[int, ...], mode: str, paths: FastPaths | None = None) -> torch.Tensor:
    """One pooling mode onto ``size`` bins, by ``paths`` (None: the default for ``x``'s device).

    ``paths.reshaped_pool``: where the bins are equal blocks, a mean/max over a reshaped view
    (the same bins as adaptive pooling). Adaptive max pooling loops over a whole block per
    thread, and onto 2x2x2 cells that is few threads for a full-resolution map; the reshaped
    max (:class:`_BlockMax`, or ``amax`` without ``paths.block_max``) and mean are plain
    reductions and run faster there. On the CPU the adaptive kernels are the faster (figures:
    docs/performance.md, "Where the step went" and "On the target card").
    ``paths.separable_mean``: a mean onto unequal bins as separable matrix products
    (:func:`~masan.model.blocks.separable`): adaptive average pooling's backward scatters with
    atomic adds, while the matrix products' backward is more matrix products
    (docs/performance.md, "Without a GPU")."""
    paths = resolve(paths, x)
    if paths.reshaped_pool and all(d % s == 0 for d, s in zip(x.shape[2:], size)):
        if mode == "avg":
            return _block_mean(x, size)
        return _BlockMax.apply(x, tuple(size)) if paths.block_max else block_view(x, size).amax(dim=(3, 5, 7))
    if paths.separable_mean and mode == "avg":
        return separable(x, "mean", tuple(size))
    return F.adaptive_avg_pool3d(x, size) if mode == "avg" else F.adaptive_max_pool3d(x, size)


def pool_cells(p: torch.Tensor, cells: int, modes: Sequence[str], paths: FastPaths | None = None) -> torch.Tensor:
    """Pool each patch's feature map to ``cells^3`` cells: ``(N, C, d, h, w)`` -> ``(N, M*C, k, k, k)``
    with ``M = len(modes)``, ``k = cells``; channels are ``[mode0 channels..., mode1 channels...]``;
    ``paths`` as :func:`_pool` takes them."""
    if cells == 1:  # plain reductions: GPU adaptive pooling to 1x1x1 loops over a whole patch per thread
        _check_modes(modes)
        reduce = {"avg": torch.mean, "max": torch.amax}
        return torch.cat([reduce[m](p, dim=(2, 3, 4), keepdim=True) for m in modes], dim=1)
    return _adaptive_pool(p, (cells,) * 3, modes, paths)


def pool_volume(v: torch.Tensor, grid: Sequence[int], cells: int, modes: Sequence[str],
                paths: FastPaths | None = None) -> torch.Tensor:
    """Pool a whole-volume feature map onto the grid's cells: ``(B, C, D, H, W)`` ->
    ``(B, M*C, Gx*k, Gy*k, Gz*k)``.

    Adaptive pooling bins cover ``[floor(i*D/n), ceil((i+1)*D/n))``: exactly the region's
    voxels when ``D`` divides, otherwise one boundary voxel shared with the neighbour
    (e.g. 30 voxels onto 4 regions at fMRI level 1). A map coarser than the cells (a 2x2x2
    bottleneck onto 4x4x4 regions) gives each of its voxels to every cell it overlaps.
    """
    return _adaptive_pool(v, tuple(g * cells for g in grid), modes, paths)


def region_features(region_map: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Region map ``(B, C, Gx*k, Gy*k, Gz*k)`` -> one feature vector per region ``(B, R, C*k^3)``."""
    b = region_map.shape[0]
    return split_patches(region_map, grid, "region map").reshape(b, num_regions(grid), -1)


def region_slices(volume_shape: Sequence[int], grid: Sequence[int], index: int) -> tuple[slice, ...]:
    """The voxels of region ``index`` in a volume of ``volume_shape`` (X, Y, Z)."""
    ps = patch_shape(volume_shape, grid)
    pos = np.unravel_index(index, tuple(grid))
    return tuple(slice(int(i) * p, (int(i) + 1) * p) for i, p in zip(pos, ps))


def regions_to_voxels(weights: np.ndarray, grid: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Paint region values onto voxels for figures (nearest region, like the paper's Fig. 4).

    ``weights (..., R)`` -> ``(..., X, Y, Z)``; voxel ``v`` of an axis of size ``S`` belongs to
    region ``floor(v * G / S)``, which is exactly :func:`split_patches` when ``S`` divides.
    """
    weights = np.asarray(weights)
    if weights.shape[-1] != num_regions(grid):
        raise ValueError(
            f"region weights have {weights.shape[-1]} regions, patch grid {tuple(grid)} has {num_regions(grid)}"
        )
    cube = weights.reshape(*weights.shape[:-1], *grid)
    for axis, (g, s) in enumerate(zip(grid, shape)):
        idx = (np.arange(s) * g) // s
        cube = np.take(cube, idx, axis=weights.ndim - 1 + axis)
    return cube
