"""Plots (evaluation's only matplotlib module): confusion matrix, region-weight map over a T1
slice (the paper's Fig. 4), and a ranking of the patch-grid regions. Evaluation imports it, and
TensorBoard image logging does, lazily, when it logs images.

Figures are built as ``matplotlib.figure.Figure`` objects without pyplot, so they work in
training processes (TensorBoard ``add_figure``) and headless report runs alike; write PNGs
with :func:`save_figure`.

Slices follow the neurological convention: each volume is reoriented to
RAS+ with its affine (nibabel), then axial and coronal views show the subject's right on the
image right, anterior/superior up; the sagittal view shows anterior on the right.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from masan.evaluate.region_ranking import RankMethod, paint_regions, region_centre, region_scores
from masan.files import atomic_writer

VIEWS = ("axial", "coronal", "sagittal")
TOP_K = 15
"""Regions in the ranking chart unless ``--top-k`` says otherwise."""
_VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
"""RAS voxel axis held fixed by each view."""
_VIEW_EDGES = {"axial": ("R", "A"), "coronal": ("R", "S"), "sagittal": ("A", "S")}
"""(right-edge, top-edge) direction letters of each view."""
_OPPOSITE = {"R": "L", "A": "P", "S": "I"}


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (parent folders created), atomically (:func:`masan.files.atomic_writer`):
    a reader, or a run stopped while drawing, never leaves half a PNG under the final name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(p, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return p


def confusion_figure(confusion: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str],
                     title: str = "confusion matrix") -> Figure:
    """(C, C) confusion matrix (rows true, columns predicted) as an annotated heat map."""
    cm = np.asarray(confusion)
    fig = Figure(figsize=(1.2 + 0.9 * len(class_names), 1.0 + 0.9 * len(class_names)), layout="constrained")
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    return fig


def _to_ras(volumes: Sequence[np.ndarray], affine: np.ndarray | None, point: Sequence[int]):
    """Reorient 3-D volumes (same grid) and a voxel index to RAS+; also return voxel sizes."""
    if affine is None:
        return list(volumes), tuple(point), (1.0, 1.0, 1.0)
    ornt = nib.orientations.io_orientation(affine)
    shape = volumes[0].shape
    new_point = [0, 0, 0]
    new_zooms = [1.0, 1.0, 1.0]
    zooms = nib.affines.voxel_sizes(affine)
    for a, (b, flip) in enumerate(ornt):
        new_point[int(b)] = shape[a] - 1 - point[a] if flip < 0 else point[a]
        new_zooms[int(b)] = float(zooms[a])
    return [nib.orientations.apply_orientation(v, ornt) for v in volumes], tuple(new_point), tuple(new_zooms)


def _view_slice(vol: np.ndarray, view: str, point: Sequence[int]) -> np.ndarray:
    """2-D slice of a RAS volume, transposed for ``imshow(origin="lower")``."""
    axis = _VIEW_AXIS[view]
    return np.take(vol, point[axis], axis=axis).T


def region_map_figure(
    t1: np.ndarray,
    weights: np.ndarray,
    patch_grid: Sequence[int],
    affine: np.ndarray | None = None,
    centre: Sequence[int] | None = None,
    views: Sequence[str] = VIEWS,
    title: str = "",
    cmap: str = "jet",
    alpha: float = 0.45,
) -> Figure:
    """T1 slices beside the same slices overlaid with the region weights (cf. paper Fig. 4).

    Args:
        t1: (X, Y, Z) T1 volume on the grid the model's regions tile.
        weights: (R,) region weights of this subject (or a class mean), region order of
            :mod:`masan.evaluate.region_ranking`.
        patch_grid: (gx, gy, gz).
        affine: (4, 4) voxel -> world affine of ``t1`` for orientation and voxel aspect;
            None: voxel axes are taken as RAS with 1 mm voxels.
        centre: voxel (x, y, z) the slices pass through; default the centre of the region with
            the highest weight.
        views: any of ``"axial"``, ``"coronal"``, ``"sagittal"``, one figure row each.
        cmap, alpha: colour map and opacity of the weight overlay.
    """
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise ValueError(f"views {list(views)}: choose from {list(VIEWS)}")
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    painted = paint_regions(w, patch_grid, t1.shape)
    if centre is None:
        centre = region_centre(int(np.argmax(w)), patch_grid, t1.shape)
    (t1_ras, map_ras), point, zooms = _to_ras([np.asarray(t1, np.float32), painted], affine, centre)
    lo, hi = np.percentile(t1_ras, [1, 99])
    fig = Figure(figsize=(7.5, 3.2 * len(views)), layout="constrained")
    axes = fig.subplots(len(views), 2, squeeze=False)
    image = None
    for row, view in zip(axes, views):
        axis = _VIEW_AXIS[view]
        h_axis, v_axis = [a for a in range(3) if a != axis]
        aspect = zooms[v_axis] / zooms[h_axis]
        t1_slice = _view_slice(t1_ras, view, point)
        for ax in row:
            ax.imshow(t1_slice, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            right, top = _VIEW_EDGES[view]
            ax.set_xticks([0, t1_slice.shape[1] - 1], [_OPPOSITE[right], right])
            ax.set_yticks([0, t1_slice.shape[0] - 1], [_OPPOSITE[top], top])
            ax.tick_params(length=0, labelsize=8)
        image = row[1].imshow(_view_slice(map_ras, view, point), cmap=cmap, origin="lower", alpha=alpha,
                              vmin=float(w.min()), vmax=float(w.max()), aspect=aspect, interpolation="nearest")
        row[0].set_title(f"T1, {view} slice {point[axis]}", fontsize=9)
        row[1].set_title(f"region weights, {view}", fontsize=9)
    fig.colorbar(image, ax=axes[:, 1].tolist(), shrink=0.8, label="region weight")
    if title:
        fig.suptitle(title)
    return fig


def ranking_figure(
    region_weights: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    region_names: Sequence[str],
    positive_index: int | None = None,
    method: RankMethod = "mean",
    top_k: int = TOP_K,
    title: str = "",
) -> Figure:
    """Horizontal bars of the top-``top_k`` regions ranked by
    :func:`masan.evaluate.region_ranking.region_scores`, with each class's mean weight per region.

    Args:
        region_weights: (N, R) region weights; labels (N,) int class indices.
        class_names: C names; region_names: R names (grid coordinates or atlas labels).
        positive_index, method: the ranking (see ``region_scores``).
        top_k: regions shown, best at the top.
    """
    w = np.asarray(region_weights, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if len(region_names) != w.shape[1]:
        raise ValueError(f"{len(region_names)} region names for {w.shape[1]} regions")
    scores = region_scores(w, y, positive_index, method)
    top = np.argsort(-scores, kind="stable")[:top_k]
    present = [c for c in range(len(class_names)) if (y == c).any()]
    height = 0.8 / max(len(present), 1)
    fig = Figure(figsize=(8.0, 1.2 + 0.32 * len(top) * max(1, len(present) / 2)), layout="constrained")
    ax = fig.add_subplot()
    pos = np.arange(len(top))[::-1]  # best region at the top
    for n, c in enumerate(present):
        ax.barh(pos + 0.4 - (n + 0.5) * height, w[y == c][:, top].mean(axis=0), height=height,
                label=f"{class_names[c]} (n={(y == c).sum()})")
    ax.set_yticks(pos, [f"{region_names[r]}" for r in top], fontsize=8)
    ax.set_xlabel("mean region weight")
    who = "all subjects" if positive_index is None else class_names[positive_index]
    rule = f"mean weight over {who}" if method == "mean" else f"{who} minus rest"
    ax.set_title(title or f"top {len(top)} regions by {rule}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class mean")
    return fig
