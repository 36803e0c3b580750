"""Resampling onto one voxel size (``to_zarr.py --spacing``): the geometry step for cohorts
from several scanners when they are not registered to a template.

A store whose subjects have different voxel sizes puts different anatomy into each voxel and
patch-grid region; cropping or padding them to one shape does not fix that. Here every image
is resampled (trilinear, scipy's ``ndimage.affine_transform``) onto an isotropic grid whose axes
are the world's R, A, S axes (so the store is RAS whatever the acquisition's orientation) and
which covers the image's field of view; ``--t1-shape``/``--fmri-shape`` then centre it on that
field of view. The affine stays true: world coordinates of every stored voxel are exact.

Conventions: ``volume`` arrays are ``(X, Y, Z[, n])`` in the file's voxel order; affines are
``(4, 4)`` voxel -> world mm; spacings in mm.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from masan.convert.nifti import NiftiError, clear_acquisition_axes, header_base

SPACING_DECIMALS = 2
"""Voxel sizes are compared and chosen rounded to 0.01 mm (headers round differently)."""
MAX_GRID_VOXELS = 10**9
"""Most voxels a resampled grid may have (over seven times a whole-head grid of 512 voxels a
side, 0.5 mm voxels): more is a header in the wrong unit (microns read as mm: a 1000
times wider field of view) or a --spacing far too fine, refused before anything is allocated."""


def voxel_edges(affine: np.ndarray) -> list[float]:
    """Edge lengths (mm) of a voxel of ``affine`` (4, 4) along its voxel axes i, j, k: the
    column norms of its linear part."""
    return [float(z) for z in np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))]


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    """Edge lengths (mm) of a voxel of ``affine``, rounded to :data:`SPACING_DECIMALS`."""
    return tuple(round(z, SPACING_DECIMALS) for z in voxel_edges(affine))


def common_spacing(sizes: list[tuple[float, float, float]]) -> float:
    """The isotropic spacing (mm) for a cohort with voxel sizes ``sizes``: the most common
    size's smallest edge (an anisotropic acquisition keeps its finest axis; ties: the finer)."""
    if not sizes:
        raise ValueError("no images to choose a voxel size from")
    counts = Counter(sizes)
    best = max(counts.items(), key=lambda kv: (kv[1], -min(kv[0])))[0]
    return float(min(best))


def target_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: float, path: str | Path,
                out_shape: tuple[int, int, int] | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the RAS grid of ``spacing`` mm over the field of view of an image of
    ``shape`` (its first three axes) and ``affine``; with ``out_shape``, that shape centred on
    the same field of view. Raises NiftiError naming the file ``path`` when the grid would have
    more than :data:`MAX_GRID_VOXELS` voxels."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    world = (np.asarray(affine, dtype=float) @ corners.T)[:3]
    lo, hi = world.min(axis=1), world.max(axis=1)
    fitted = tuple(int(n) for n in np.floor((hi - lo) / spacing + 1e-6) + 1)
    size = tuple(int(n) for n in out_shape) if out_shape is not None else fitted
    if math.prod(size) > MAX_GRID_VOXELS:
        fov = "x".join(f"{v:.6g}" for v in hi - lo)
        edges = "x".join(f"{v:.6g}" for v in voxel_edges(affine))
        raise NiftiError(f"{path}: resampling its field of view of {fov} mm to {spacing:g} mm voxels would make a "
                         f"grid of {'x'.join(map(str, size))} voxels (more than {MAX_GRID_VOXELS:,}): its voxel sizes "
                         f"{edges} mm are probably in another unit than the header's xyzt_units says (fix its pixdim "
                         "or unit), or --spacing is too fine (give a coarser one)")
    centre = (lo + hi) / 2
    grid = np.diag([spacing, spacing, spacing, 1.0])
    grid[:3, 3] = centre - spacing * (np.asarray(size) - 1) / 2
    return size, grid


def as_stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Resampled stored values back in the file's type (integers rounded and kept in range)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def resample(volume: np.ndarray, affine: np.ndarray, out_shape: tuple[int, int, int], out_affine: np.ndarray,
             dtype: np.dtype) -> np.ndarray:
    """``volume (X, Y, Z[, n])`` with voxel -> world ``affine`` resampled trilinearly onto the grid
    ``(out_shape, out_affine)``, frame by frame; voxels outside the field of view are 0. Returns
    ``(X', Y', Z'[, n])`` in ``dtype``."""
    from scipy import ndimage  # only resampling conversions pay for importing it

    to_source = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(out_affine, dtype=float)
    frames = volume[..., None] if volume.ndim == 3 else volume
    out = np.empty(tuple(out_shape) + frames.shape[3:], dtype=dtype)
    for t in range(frames.shape[3]):
        moved = ndimage.affine_transform(frames[..., t].astype(np.float32), to_source[:3, :3], to_source[:3, 3],
                                         output_shape=tuple(out_shape), order=1, mode="constant", cval=0.0)
        out[..., t] = as_stored(moved, dtype)
    return out[..., 0] if volume.ndim == 3 else out


def grid_header(img: Any, affine: np.ndarray, shape: tuple[int, ...], code: str, tr: float | None) -> bytes:
    """Binary NIfTI header of an image resampled onto a new grid: the source's
    (:func:`masan.convert.nifti.header_base`: its byte order and type, ``shape`` (X, Y, Z[, T]),
    the scaling nibabel took out put back, a run's TR ``tr`` in seconds) with the grid's
    ``affine`` as sform and qform with ``code`` (``scanner``, ``aligned``, ``mni``); the slice,
    phase and frequency axes and slice timing are cleared, since the voxels no longer follow
    the acquisition's."""
    hdr = header_base(img, shape, tr)
    hdr.set_sform(affine, code=code)
    hdr.set_qform(affine, code=code)
    clear_acquisition_axes(hdr)
    return hdr.binaryblock
