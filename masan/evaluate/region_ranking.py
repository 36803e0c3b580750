"""Region ranking for evaluation: region weights -> named, ranked regions (numbers, no plots).

Reads a run's ``region_weights`` after the fact; the model's own patch grid (patches, pooling
onto regions) is :mod:`masan.model.regions`, the figures are :mod:`masan.evaluate.plots`.

MASAN cuts the T1 volume into ``patch_grid = (gx, gy, gz)`` non-overlapping regions (the
paper: 4x4x4 = 64) and outputs one weight per region, ``region_weights`` (N, R) with
R = gx*gy*gz. Region ``r`` is grid cell ``np.unravel_index(r, patch_grid)`` (C order: x
slowest, z fastest), i.e. the order ``tensor.reshape(gx, gy, gz)`` flattens. Cell (i, j, k)
holds the voxels v with ``floor(v * g / size) = i`` along each axis (the model's
``masan.model.regions``: exactly its patches when ``size`` divides by ``g``).

Regions are named by grid coordinates (``"x1-y2-z0"``) or, with an atlas label volume, by
the majority atlas label inside each cell (see :func:`atlas_region_names`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from masan.model.regions import num_regions, regions_to_voxels

RankMethod = Literal["mean", "difference"]


class RegionError(ValueError):
    """Region weights, grid or atlas do not fit together; the message says what to change."""


def grid_names(patch_grid: Sequence[int]) -> list[str]:
    """``"x{i}-y{j}-z{k}"`` for each region, in region order."""
    return [f"x{i}-y{j}-z{k}" for i, j, k in np.ndindex(*patch_grid)]


def _cell_of_voxel(shape: Sequence[int], patch_grid: Sequence[int]) -> list[np.ndarray]:
    """Per axis, the (size,) grid coordinate of each voxel (the rule of ``regions_to_voxels``)."""
    if len(shape) != 3 or len(patch_grid) != 3:
        raise RegionError(f"need a 3-D shape and a 3-D patch grid, got {tuple(shape)} and {tuple(patch_grid)}")
    return [(np.arange(n) * g) // n for n, g in zip(shape, patch_grid)]


def paint_regions(weights: np.ndarray, patch_grid: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Paint one value per region back onto the voxel grid.

    Args:
        weights: (R,) values in region order.
        patch_grid: (gx, gy, gz) with gx*gy*gz = R.
        shape: (X, Y, Z) voxel grid the regions tile.

    Returns:
        (X, Y, Z) float32 volume, each voxel holding its region's value.
    """
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    if w.size != num_regions(patch_grid):
        raise RegionError(
            f"{w.size} region weights do not fit patch_grid {list(patch_grid)} ({num_regions(patch_grid)} regions); "
            f"use the run's model.patch_grid"
        )
    return regions_to_voxels(w, patch_grid, shape)


def region_centre(region: int, patch_grid: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel index (x, y, z) of the centre of region ``region``."""
    cell = np.unravel_index(region, tuple(patch_grid))
    return tuple(int(np.flatnonzero(ax == c).mean()) for ax, c in zip(_cell_of_voxel(shape, patch_grid), cell))


def region_scores(
    region_weights: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    positive_index: int | None = None,
    method: RankMethod = "mean",
) -> np.ndarray:
    """(R,) importance score of each region over subjects.

    Args:
        region_weights: (N, R) non-negative region weights of N subjects.
        labels: (N,) int class index of each subject.
        positive_index: the positive class (e.g. AD) or None.
        method: ``"mean"``: mean weight over the positive subjects (over all subjects when
            ``positive_index`` is None), i.e. where the model looks for that class;
            ``"difference"``: mean over positive subjects minus mean over the rest, i.e.
            where it looks more for that class than for the others (needs ``positive_index``).
    """
    w = np.asarray(region_weights, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if w.ndim != 2 or w.shape[0] != y.size:
        raise RegionError(f"region weights of shape {w.shape} do not pair with {y.size} labels; expected (N, R)")
    if method not in ("mean", "difference"):
        raise RegionError(f"ranking method {method!r} is not one of 'mean', 'difference'")
    if positive_index is None:
        if method == "difference":
            raise RegionError("ranking by 'difference' needs the positive class (positive_index)")
        return w.mean(axis=0)
    pos = y == positive_index
    if not pos.any():
        raise RegionError(f"no subject of the positive class (index {positive_index}) to rank regions by")
    if method == "mean":
        return w[pos].mean(axis=0)
    if pos.all():
        raise RegionError("ranking by 'difference' needs subjects outside the positive class too")
    return w[pos].mean(axis=0) - w[~pos].mean(axis=0)


def rank_regions(
    region_weights: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    positive_index: int | None = None,
    method: RankMethod = "mean",
) -> list[tuple[int, float]]:
    """Regions sorted by :func:`region_scores`, highest first (ties: lower index first).

    Returns:
        list of (region_index, score), length R.
    """
    s = region_scores(region_weights, labels, positive_index, method)
    order = np.argsort(-s, kind="stable")
    return [(int(r), float(s[r])) for r in order]


# --------------------------------------------------------------------------- atlas


def load_atlas_labels(path: str | os.PathLike) -> dict[int, str]:
    """Read an atlas label table: rows ``index<sep>name`` with a tab, comma or blanks as
    separator (further columns, e.g. FreeSurfer LUT colours, ignored). A first row whose
    index is not an integer is a header and skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise RegionError(f"atlas label table {p} does not exist{'' if not p.exists() else ' as a file'}; "
                          f"pass a TSV/CSV of 'index name' rows, or none to name regions 'label <index>'")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RegionError(f"cannot read atlas label table {p} as text ({e}); pass a TSV/CSV of "
                          f"'index name' rows") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    sep = "\t" if lines and "\t" in lines[0] else "," if lines and "," in lines[0] else None
    names: dict[int, str] = {}
    for n, line in enumerate(lines):
        row = [c.strip() for c in line.split(sep)]
        try:
            idx = int(float(row[0]))
        except ValueError:
            if n == 0:
                continue
            raise RegionError(f"{p}: row {line!r} does not start with an integer label index") from None
        if len(row) < 2 or not row[1]:
            raise RegionError(f"{p}: row {line!r} has no name after the index")
        names[idx] = row[1]
    if not names:
        raise RegionError(f"atlas label table {p} holds no 'index, name' rows")
    return names


ATLAS_MIN_SHARED = 0.4
"""Fewest neighbouring voxel pairs (both non-zero) that share a label in an atlas: its regions
are blobs, so most pairs do (about 0.7 and more even for thousands of regions on a 2 mm grid);
in an intensity image (a T1) a few percent do."""


def open_atlas(path: str | os.PathLike) -> nib.spatialimages.SpatialImage:
    """The atlas image, checked to be a label volume (:func:`_atlas_volume`); raises
    :class:`RegionError` naming the fix otherwise. Callers check the atlas with it before
    writing anything."""
    return _atlas_volume(path)[0]


def _atlas_volume(path: str | os.PathLike) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """(the atlas image, its (X, Y, Z) voxels): a 3-D volume (or 4-D with one volume) of
    integer labels whose regions are blobs; :class:`RegionError` naming the fix otherwise.
    The voxels are read: an intensity image (a T1 passed by mistake) passes every header check,
    and would name regions by its intensities ("label 7")."""
    p = Path(path)
    try:
        img = nib.load(p)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for unreadable files
        raise RegionError(f"cannot read atlas {p} as NIfTI: {e}; pass a NIfTI label volume "
                          f"(.nii or .nii.gz), or no atlas to name regions by grid cell") from None
    if not (len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1)):
        raise RegionError(f"atlas {p} has shape {img.shape}; expected a 3-D label volume (X, Y, Z)")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel/gzip raise several types for a truncated file
        raise RegionError(f"cannot read the label volume of atlas {p}: {e}") from None
    data = data.reshape(img.shape[:3])
    fix = "pass an atlas label volume (integer labels, 0 = background), or no --atlas to name regions by grid cell"
    if data.dtype.kind == "f":
        fractional = data[~(np.isfinite(data) & (data == np.rint(data)))]
        if fractional.size:
            raise RegionError(f"atlas {p} holds non-integer values (e.g. {fractional.flat[0]:g}), so it is no label "
                              f"volume (a T1 or a probability map?); {fix}")
    shared = _shared_neighbours(data)
    if shared < ATLAS_MIN_SHARED:
        count = len(np.unique(data[data != 0]))
        raise RegionError(f"atlas {p} has {count} distinct non-zero values, and only {shared:.0%} of neighbouring "
                          f"voxels share one (an atlas's regions are blobs: most do), so it is an intensity image "
                          f"(a T1?), not a label volume; {fix}")
    return img, data


def _shared_neighbours(volume: np.ndarray) -> float:
    """The fraction of face-neighbouring voxel pairs, both non-zero, that hold the same value
    (1 when there are none)."""
    same = pairs = 0
    for axis in range(volume.ndim):
        a = volume[(slice(None),) * axis + (slice(None, -1),)]
        b = volume[(slice(None),) * axis + (slice(1, None),)]
        both = (a != 0) & (b != 0)
        same += int(np.count_nonzero(both & (a == b)))
        pairs += int(np.count_nonzero(both))
    return same / pairs if pairs else 1.0


def resample_atlas(
    atlas_path: str | os.PathLike, target_shape: Sequence[int], target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resample an atlas label volume onto a T1 voxel grid.

    Assumes the atlas and the T1 are in the same world space (their affines map to the same
    millimetre coordinates, e.g. both registered to MNI152); for T1s left in scanner space
    the names are only a rough guide. Voxels outside the atlas get label 0 (background).

    Args:
        atlas_path: NIfTI label volume (integer labels, 0 = background).
        target_shape: (X, Y, Z) T1 grid.
        target_affine: (4, 4) voxel -> world affine of the T1 grid.

    Returns:
        (X, Y, Z) int64 labels.
    """
    return atlas_on_grid(atlas_path, target_shape, target_affine)[0]


def atlas_on_grid(
    atlas_path: str | os.PathLike, target_shape: Sequence[int], target_affine: np.ndarray
) -> tuple[np.ndarray, float]:
    """:func:`resample_atlas`, and the fraction (0..1) of the T1 grid's voxels that fall inside
    the atlas volume (a small one: atlas and T1 are probably not in one world space)."""
    img, data = _atlas_volume(atlas_path)
    vox_map = np.linalg.inv(img.affine) @ np.asarray(target_affine, dtype=np.float64)  # T1 voxel -> atlas voxel
    # grid-constant: a T1 voxel whose nearest atlas voxel exists keeps it, even within half a
    # voxel of the edge ("constant" would zero those)
    def onto_t1(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(volume, vox_map, output_shape=tuple(target_shape), order=0,
                                        mode="grid-constant", cval=0)

    inside = onto_t1(np.ones(data.shape, np.uint8))
    return onto_t1(np.rint(data).astype(np.int64)), float(inside.mean())


MIN_ATLAS_COVER = 0.5
"""Below this fraction of the T1 grid inside the atlas, or of regions given a label, the atlas
and the T1 are probably in different world spaces: warned about."""


def atlas_overlap(labels: np.ndarray, inside: float, patch_grid: Sequence[int], atlas_path: str | os.PathLike,
                  t1: str, background: int = 0) -> str | None:
    """A warning when the atlas (resampled: :func:`atlas_on_grid`) hardly overlaps the T1
    ``t1`` (a description: subject and store), None when it fits; raises :class:`RegionError`
    when it gives no region any label (every region would read "background")."""
    names = atlas_region_names(labels, patch_grid, background=background)
    blank = sum(n.startswith("background (") for n in names)
    space = ("the atlas and the stored T1s must be in one world space (e.g. both MNI152): pass an atlas in the "
             "space of the store's T1s, or a store registered to the atlas's template (data_tools/to_zarr.py "
             "--register), or no --atlas (regions named by grid cell)")
    if blank == len(names):
        raise RegionError(f"atlas {atlas_path} gives no region of the T1 of {t1} a label (it covers "
                          f"{inside:.0%} of that T1's grid): {space}")
    if inside < MIN_ATLAS_COVER or blank > len(names) * (1 - MIN_ATLAS_COVER):
        return (f"atlas {atlas_path} covers {inside:.0%} of the T1 grid of {t1} and leaves {blank} of its "
                f"{len(names)} regions without a label ('background'): {space}")
    return None


def atlas_region_names(
    atlas: np.ndarray,
    patch_grid: Sequence[int],
    label_names: Mapping[int, str] | None = None,
    background: int = 0,
) -> list[str]:
    """Name each region by the atlas label covering most of its non-background voxels.

    Args:
        atlas: (X, Y, Z) int labels on the same grid as the regions (see :func:`resample_atlas`).
        patch_grid: (gx, gy, gz).
        label_names: label index -> name; unnamed labels read ``"label <index>"``.
        background: label index that names nothing.

    Returns:
        R names ``"<label> (x1-y2-z0)"``; a region holding only background reads
        ``"background (x1-y2-z0)"``.
    """
    names = dict(label_names or {})
    cell = np.ravel_multi_index(np.ix_(*_cell_of_voxel(atlas.shape, patch_grid)), tuple(patch_grid))
    cell = np.broadcast_to(cell, atlas.shape).reshape(-1)
    lab = np.asarray(atlas).reshape(-1)
    keep = lab != background
    labs, inv = np.unique(lab[keep], return_inverse=True)
    r_count = num_regions(patch_grid)
    # voxel count of every (region, label) pair in one pass
    counts = np.bincount(cell[keep] * labs.size + inv, minlength=r_count * labs.size).reshape(r_count, labs.size)
    out = []
    for r, g in enumerate(grid_names(patch_grid)):
        if labs.size == 0 or counts[r].sum() == 0:
            out.append(f"background ({g})")
            continue
        top = int(labs[np.argmax(counts[r])])
        out.append(f"{names.get(top, f'label {top}')} ({g})")
    return out
