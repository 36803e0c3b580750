"""Figures of the QC report: three orthogonal views in world space, registration overlay, fMRI panel.

The views are drawn by nilearn (``display_mode="ortho"``: sagittal, coronal, axial cuts through
one world point) from a nibabel image made of the stored array and the stored affine, so what
a reader sees is the world (RAS mm) the affine says, whatever order the voxels are stored in:
a subject stored mirrored (LAS among RAS) looks like the others here, and its flag
(:mod:`masan.qc.geometry`) says its voxels are not. Each cut carries the letters of the
world directions at its edges (L/R, P/A, I/S), read from the cut's own axis limits, so they stay
right if the display convention changes (neurological: the subject's left on the left).
Figures are matplotlib ``Figure`` objects (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from masan.convert import registration
from masan.qc.checks import FmriSummary, foreground, foreground_level

Rect = tuple[float, float, float, float]
WORLD_AXES = {"x": ("y", "z"), "y": ("x", "z"), "z": ("x", "y")}
"""nilearn cut direction -> the world axes shown (horizontal, vertical): sagittal, coronal, axial."""
ENDS = {"x": ("L", "R"), "y": ("P", "A"), "z": ("I", "S")}
"""World axis -> the letters of its negative and positive ends (RAS+)."""
CONTOUR_POINTS = 160
"""Samples per side of a cut's plane for an overlay's line: finer than the figure's pixels per cut."""
MARKER = {"color": "yellow", "fontsize": 8, "fontweight": "bold",
          # boxed: the cuts touch, and two neighbours' edge letters must not read as one word ("A L")
          "bbox": {"boxstyle": "round,pad=0.15", "facecolor": "black", "edgecolor": "yellow", "linewidth": 0.5}}


def _image(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """An (X, Y, Z) float32 array with its voxel -> world mm affine, as nilearn's input."""
    return nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))


def orientation_markers(display) -> None:
    """Write L/R, P/A, I/S at the edges of each cut of a nilearn ortho ``display``; which letter
    goes where follows the cut's axis limits (world mm increasing left to right or not)."""
    for direction, cut in display.axes.items():
        ax = cut.ax
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        horizontal, vertical = (ENDS[a] for a in WORLD_AXES[direction])
        left, right = horizontal if x0 < x1 else horizontal[::-1]
        bottom, top = vertical if y0 < y1 else vertical[::-1]
        for text, x, y, ha, va in ((left, 0.01, 0.5, "left", "center"), (right, 0.99, 0.5, "right", "center"),
                                   (bottom, 0.5, 0.01, "center", "bottom"), (top, 0.5, 0.99, "center", "top")):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, **MARKER)


def ortho(fig: Figure, rect: Rect, volume: np.ndarray, affine: np.ndarray, epi: bool = False, **kw):
    """Three orthogonal cuts of ``volume`` (X, Y, Z; ``affine`` voxel -> world mm) in ``rect`` of
    ``fig``: gray anatomy (robust 1-99.5 percentile window), or ``epi`` (a colour map with its
    bar); ``kw`` go to nilearn. Returns the nilearn display (for contours, markers)."""
    from nilearn import plotting  # here, not at import: it costs a second or two; --help and errors need none of it

    img = _image(volume, affine)
    finite = np.asarray(volume)[np.isfinite(volume)]
    lo, hi = np.percentile(finite, (1, 99.5)) if finite.size else (0.0, 1.0)
    window = {"vmin": float(lo), "vmax": float(max(hi, lo + 1e-6))}
    with warnings.catch_warnings():
        # nilearn warns about its own defaults (non-diagonal affines are resampled, empty cuts)
        warnings.simplefilter("ignore")
        if epi:
            display = plotting.plot_epi(img, display_mode="ortho", figure=fig, axes=rect, draw_cross=False,
                                        annotate=False, black_bg=True, colorbar=True, **{**window, **kw})
        else:
            display = plotting.plot_anat(img, display_mode="ortho", figure=fig, axes=rect, draw_cross=False,
                                         annotate=False, black_bg=True, colorbar=False, dim=0, **{**window, **kw})
        display.annotate(left_right=False, positions=True, size=8)
    return display


def _plane(cut, direction: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (3, n, n) of a cut's plane, on a regular grid over its view, and the grid's
    horizontal and vertical world coordinates (n, n) each."""
    (x0, x1), (y0, y1) = cut.ax.get_xlim(), cut.ax.get_ylim()
    h, v = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    world = np.empty((3, n, n))
    horizontal, vertical = ("xyz".index(a) for a in WORLD_AXES[direction])
    world[horizontal], world[vertical] = h, v
    world["xyz".index(direction)] = cut.coord
    return world, h, v


def _draw_line(display, shape: tuple[int, ...], affine: np.ndarray, level: float, volume: np.ndarray | None,
               **kw) -> None:
    """Contour at ``level`` over each cut of a field sampled on a :data:`CONTOUR_POINTS`-square grid
    of the cut's plane: ``volume`` (trilinear, NaN outside its grid) or, for None, 1 inside the
    grid of ``shape`` and 0 outside. Any affine (oblique too); a cut the line misses gets none."""
    inverse = np.linalg.inv(affine)
    top = np.asarray(shape[:3])[:, None, None] - 0.5  # a grid reaches half a voxel past its outer centres
    for direction, cut in display.axes.items():
        limits = cut.ax.get_xlim(), cut.ax.get_ylim()
        world, h, v = _plane(cut, direction, CONTOUR_POINTS)
        ijk = np.tensordot(inverse[:3, :3], world, axes=1) + inverse[:3, 3][:, None, None]
        inside = np.all((ijk >= -0.5) & (ijk <= top), axis=0)
        if volume is None:
            field = inside.astype(np.float32)
        else:
            field = np.where(inside, ndimage.map_coordinates(volume, ijk, order=1, mode="nearest"), np.nan)
        if inside.any() and np.nanmin(field) < level < np.nanmax(field):
            cut.ax.contour(h, v, field, levels=[level], **kw)
        cut.ax.set_xlim(*limits[0])  # a line must not rescale the cut
        cut.ax.set_ylim(*limits[1])


def contour(display, volume: np.ndarray, affine: np.ndarray, level: float, **kw) -> None:
    """The iso-line ``level`` of ``volume`` ((X, Y, Z) on its own grid, ``affine`` voxel -> world
    mm) over each cut of ``display``; ``kw`` go to matplotlib's ``contour``."""
    _draw_line(display, volume.shape, affine, level, volume, **kw)


def field_of_view(display, shape: tuple[int, ...], affine: np.ndarray, **kw) -> None:
    """The edge of a grid of ``shape`` (``affine`` voxel -> world mm) over each cut of ``display``."""
    _draw_line(display, shape, affine, 0.5, None, **kw)


def _title(fig: Figure, text: str) -> None:
    fig.text(0.5, 0.99, text, ha="center", va="top", fontsize=9)


def t1_views_figure(t1: np.ndarray, t1_affine: np.ndarray, fmri_mean: np.ndarray | None,
                    fmri_affine: np.ndarray | None) -> Figure:
    """The T1 ((X, Y, Z), ``t1_affine`` voxel -> world mm) in three orthogonal cuts, with the fMRI
    mean's foreground outline (red) and the edge of the fMRI field of view (dashed yellow) drawn
    over it through the two affines."""
    fig = Figure(figsize=(9, 3.4))
    display = ortho(fig, (0, 0, 1, 0.92), t1, t1_affine)
    if fmri_mean is not None:
        field_of_view(display, fmri_mean.shape, fmri_affine, colors="yellow", linewidths=0.8, linestyles="--")
        level = foreground_level(fmri_mean)  # the outline of the mask the QC checks measure
        if level is not None:
            contour(display, fmri_mean, fmri_affine, level, colors="red", linewidths=0.8)
    orientation_markers(display)
    _title(fig, "T1 in world space (RAS mm, neurological: L on the left) with the fMRI mean outline (red) and the "
                "fMRI field of view (dashed yellow)")
    return fig


def registration_figure(t1: np.ndarray, t1_affine: np.ndarray, template: str) -> Figure:
    """The registered T1 ((X, Y, Z) on its template grid, ``t1_affine`` voxel -> template mm) in
    three orthogonal cuts with the template's brain outline (cyan) and its grey/white edge
    (yellow: the template T1 at the median of its brain voxels) drawn over it: where they cut
    through the subject's anatomy, the registration missed."""
    fig = Figure(figsize=(9, 3.4))
    display = ortho(fig, (0, 0, 1, 0.92), t1, t1_affine)
    tpl, brain = registration.template_on_grid(template, t1.shape, t1_affine)
    inside = brain > 0.5
    contour(display, brain.astype(np.float32), t1_affine, 0.5, colors="cyan", linewidths=0.7)
    if inside.any():
        contour(display, tpl, t1_affine, float(np.median(tpl[inside])), colors="yellow", linewidths=0.7)
    orientation_markers(display)
    _title(fig, f"T1 registered to {template}: the template's brain outline (cyan) and grey/white edge (yellow)")
    return fig


def fmri_figure(summary: FmriSummary, fmri_affine: np.ndarray, n_voxels: int) -> Figure:
    """Global mean and per-frame spread over time; a carpet (voxels x frames, each voxel's
    series minus its mean over its temporal std, clipped at ±3); the temporal std in three
    orthogonal cuts (world space, as :func:`t1_views_figure`)."""
    t = len(summary.frame_mean)
    fig = Figure(figsize=(9, 7))
    ax_sig = fig.add_axes((0.07, 0.8, 0.9, 0.15))
    frames = np.arange(t)
    ax_sig.plot(frames, summary.frame_mean, label="mean over voxels")
    ax_sig.plot(frames, summary.frame_std, label="std over voxels")
    blank = np.flatnonzero(summary.frame_std == 0)
    if blank.size:
        ax_sig.plot(blank, summary.frame_mean[blank], "rx", label="one-valued frame")
    ax_sig.legend(fontsize=7, loc="upper right")
    ax_sig.set_xlim(-0.5, t - 0.5)
    ax_sig.tick_params(labelbottom=False, labelsize=7)
    ax_sig.set_title(f"fMRI: {t} frames", fontsize=9)
    ax_carpet = fig.add_axes((0.07, 0.46, 0.9, 0.32), sharex=ax_sig)
    keep = foreground(summary.mean).reshape(-1)[summary.carpet_index]
    series = summary.carpet[:, keep] if keep.any() else summary.carpet
    if series.shape[1] > n_voxels:
        series = series[:, np.linspace(0, series.shape[1] - 1, n_voxels).round().astype(int)]
    sd = series.std(axis=0)
    z = (series - series.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    ax_carpet.imshow(np.clip(z.T, -3, 3), aspect="auto", cmap="gray", vmin=-3, vmax=3, interpolation="nearest",
                     extent=(-0.5, t - 0.5, series.shape[1], 0))
    ax_carpet.set_xlabel("frame", fontsize=8)
    ax_carpet.set_ylabel(f"{series.shape[1]} voxels (z)", fontsize=8)
    tsd = summary.tsd.astype(np.float32)
    display = ortho(fig, (0.0, 0.0, 1.0, 0.33), tsd, fmri_affine, epi=True, cmap="magma", vmin=0.0,
                    vmax=float(np.percentile(tsd, 99.5)) or 1.0)
    orientation_markers(display)
    fig.text(0.5, 0.335, "temporal std (world space, RAS mm)", ha="center", va="bottom", fontsize=8)
    return fig
