"""Visual quality check of a cohort store: checks, figures and a static HTML report.

``data_tools/qc_report.py STORE --out DIR`` calls :func:`write_report`, which writes
``DIR/index.html`` and one or two PNGs per subject (no server, no JavaScript):

- a cohort section: label counts, stored shapes, the last conversion's failures and warnings
  (``conversion_report.json``), and the flagged subjects with links;
- per subject: the header facts of each modality (stored and source shape, dtype, voxel size
  in mm, TR in s, orientation codes of the stored array and of the source file), the flags,
  a T1 mosaic (axial slices, RAS+, the subject's right on the image right) with the outline
  of the fMRI mean image and the edge of the fMRI field of view resampled onto it through the
  two stored affines, and an fMRI panel (global signal and per-frame spread, a carpet of
  voxel time series, temporal-std slices);
- per subject of a registered store (``to_zarr.py --register``): the T1 in template space with
  the template's brain outline and tissue edge drawn over it, and its similarity to the template
  before and after registration (:mod:`masan.data.registration`).

Flags (:class:`Flag`, ``code``) say what looks wrong:

==============  ==========================================================================
``orientation`` the T1 and fMRI voxel axes point different ways (``aff2axcodes`` differ):
                harmless for tools that use the affines, wrong for ones that don't
``fov``         under ``fov_overlap`` of the fMRI foreground lies inside the T1 volume
``constant``    a volume with one value only, fMRI frames with one value (e.g. all zero),
                or an fMRI run without any temporal variation
``clipped``     over ``clip_fraction`` of the nonzero voxels sit at the maximum value
``frames``      fewer frames than ``min_frames`` (default: the cohort's most common length)
``outlier``     mean or std of a modality more than ``z_threshold`` robust z from the
                cohort (median / 1.4826 MAD over every subject of the store, the MAD taken
                as at least 5% of the median)
``missing``     a modality is absent from the store (converted with ``--require t1``)
``registration`` the registered T1's correlation with the template under
                ``min_template_corr``, the fMRI mean's brain overlap (Dice) with the template's
                under ``min_brain_dice``, or either lower after registration than the header
                had placed it (by more than ``registration.WORSE_BY``): a failed registration
==============  ==========================================================================

Values are the data values (NIfTI scaling applied, not z-scored). The fMRI is read one block
of frames at a time, so memory stays at one block plus a few per-voxel sums, whatever the run's
length. The cohort statistics for ``outlier`` come from the statistics the conversion stored
with each array (``stats``: mean/std over the nonzero voxels), so ``--subjects`` compares the
chosen subjects with the whole cohort without reading it.
"""

from __future__ import annotations

import datetime
import html
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage
from tqdm.auto import tqdm

from masan.access import apply_access, creation_umask, describe_mode, restrictive_mode
from masan.data import registration
from masan.data.store import CohortStore, StoreError
from masan.files import atomic_write_text

INDEX = "index.html"
GENERATOR = "masan.data.qc"
"""``<meta name="generator">`` of our reports: an existing --out folder is reused only if it is one."""
FRAME_BLOCK = 64
"""fMRI frames read at once (memory: one block of float32 frames)."""
MAD_TO_SD = 1.4826
"""MAD of a normal distribution times this is its standard deviation."""
FOREGROUND = 0.2
"""Foreground (head) = voxels above this fraction of the 99th percentile: the fMRI outline."""
STATS = ("mean", "std")
MIN_REL_SPREAD = 0.05
"""Floor of the cohort spread in robust z, relative to the median: scans differ in gain by a few
percent as a rule, and a cohort of near-identical scans (MAD ~ 0) would flag any difference."""


class QCError(ValueError):
    """The report cannot be made (bad store, subject or output folder); the message names the fix."""


def _flag(default, flag: str | None, help: str, **argparse_kw):
    """A :class:`QCOptions` field that is also ``qc_report.py``'s option ``flag`` (None: none)."""
    return field(default=default, metadata={"flag": flag, "help": help, "argparse": argparse_kw})


@dataclass
class QCOptions:
    """What ``qc_report.py`` checks and draws. A field with a ``flag`` is that option of the
    tool, one for one (:func:`add_option_arguments`, :meth:`from_args`): a new threshold is one
    field here."""

    subjects: list[str] | None = _flag(None, "--subjects", "only these subjects (default: all); the cohort "
                                       "section still covers the whole store", nargs="+", metavar="ID")
    min_frames: int | None = _flag(None, "--min-frames", "flag fMRI runs with fewer frames (default: the "
                                   "cohort's most common run length, at least 2)", type=int)
    z_threshold: float = _flag(3.5, "--z-threshold", "flag a modality whose mean or std is this many robust SD "
                               "(median / MAD) from the cohort median", type=float)
    clip_fraction: float = _flag(0.01, "--clip-fraction", "flag a volume with more than this share of its "
                                 "nonzero voxels at the maximum", type=float)
    fov_overlap: float = _flag(0.5, "--fov-overlap", "flag a subject with less than this share of the fMRI "
                               "foreground inside the T1 volume", type=float)
    min_template_corr: float = _flag(0.7, "--min-template-corr", "registered stores: flag a T1 whose correlation "
                                     "with the template over its brain voxels is below this", type=float)
    min_brain_dice: float = _flag(0.8, "--min-brain-dice", "registered stores: flag an fMRI whose mean's brain "
                                  "mask overlaps the template's brain less (Dice)", type=float)
    mosaic_slices: int = _flag(12, "--slices", "axial slices in the T1 mosaic (half as many temporal-std "
                               "slices)", type=int, metavar="N")
    carpet_voxels: int = _flag(1500, None, "voxel time series in the carpet (an evenly spaced sample of the "
                               "fMRI foreground)")
    dpi: int = _flag(80, None, "resolution of the figures")
    progress: bool = _flag(True, None, "a progress bar (qc_report.py: --no-progress)")

    @classmethod
    def from_args(cls, args, **given) -> "QCOptions":
        """Options from :func:`add_option_arguments`' parsed flags (``given`` wins)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["flag"] and hasattr(args, f.name)}
        return cls(**{**values, **given})


def add_option_arguments(parser) -> None:
    """One option per :class:`QCOptions` field with a ``flag``, its default shown."""
    for f in fields(QCOptions):
        if f.metadata["flag"]:
            default = "" if f.default is None else " (default: %(default)s)"
            parser.add_argument(f.metadata["flag"], dest=f.name, default=f.default,
                                help=f.metadata["help"] + default, **f.metadata["argparse"])


@dataclass
class Flag:
    """Something that looks wrong with a subject."""

    code: str
    """One of the codes in the module docstring."""
    modality: str
    """``t1``, ``fmri`` or ``t1+fmri``."""
    message: str


@dataclass
class SubjectQC:
    """Everything the report shows for one subject."""

    subject: str
    label: str
    facts: dict[str, dict]
    """modality -> header facts (see :func:`header_facts`); absent modalities are missing."""
    flags: list[Flag] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    """caption -> PNG file name (relative to the report folder)."""
    numbers: dict[str, float] = field(default_factory=dict)
    """Measured shares (0-1) shown beside the facts, e.g. the fMRI head inside the T1 volume."""
    similarity: dict[str, dict] = field(default_factory=dict)
    """Registered stores: modality -> the similarity to the template recorded at conversion
    (``{"measure", "before", "after"}``)."""


# ====================================================================== checks


def header_facts(store: CohortStore, subject: str, modality: str) -> dict:
    """Shape, dtype, voxel size (mm), TR (s) and orientation of one stored array and its source.

    Returns keys ``shape`` (stored: (X, Y, Z) or (T, X, Y, Z)), ``source_shape`` (as in the
    NIfTI file: (X, Y, Z[, T])), ``dtype``, ``zooms_mm`` (of the stored affine), ``tr_seconds``,
    ``axcodes`` (of the stored affine), ``source_axcodes``, ``affine`` ((4, 4) world mm).
    """
    meta = store.meta(subject, modality)
    nii = meta.get("nifti", {})
    affine = store.affine(subject, modality)
    return {
        "shape": list(store.shape(subject, modality)),
        "source_shape": nii.get("shape"),
        "dtype": nii.get("dtype"),
        "zooms_mm": [round(float(z), 3) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "tr_seconds": nii.get("tr_seconds"),
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "source_axcodes": "".join(nii.get("axcodes") or []),
        "affine": affine,
    }


def robust_z(values: dict[str, float], min_rel_spread: float = MIN_REL_SPREAD) -> dict[str, float]:
    """(value - median) / spread per key, spread = 1.4826 MAD but at least ``min_rel_spread``
    times the median's magnitude (all 0 when that is 0 too, or with fewer than 3 values)."""
    keys = [k for k, v in values.items() if v is not None and np.isfinite(v)]
    if len(keys) < 3:
        return {k: 0.0 for k in keys}
    v = np.array([values[k] for k in keys], dtype=np.float64)
    med = np.median(v)
    scale = max(MAD_TO_SD * np.median(np.abs(v - med)), min_rel_spread * abs(med))
    return {k: float((x - med) / scale) if scale > 0 else 0.0 for k, x in zip(keys, v)}


def cohort_numbers(store: CohortStore) -> dict[str, dict[str, float]]:
    """``<modality>_<mean|std>`` -> {subject: value} over the whole store, from the statistics
    the conversion stored with each array (no voxels read)."""
    out: dict[str, dict[str, float]] = {}
    for s in store.subjects:
        for m in ("t1", "fmri"):
            if store.has(s, m):
                stats = store.meta(s, m).get("stats", {})
                for k in STATS:
                    if k in stats:
                        out.setdefault(f"{m}_{k}", {})[s] = float(stats[k])
    return out


def default_min_frames(store: CohortStore) -> int:
    """The cohort's most common fMRI run length (at least 2: a temporal std needs two frames)."""
    lengths = Counter(store.shape(s, "fmri")[0] for s in store.subjects if store.has(s, "fmri"))
    return max(2, lengths.most_common(1)[0][0]) if lengths else 2


def range_flags(modality: str, vmin: float, vmax: float, at_max: int, nonzero: int, opts: QCOptions) -> list[Flag]:
    """``constant`` (one value) and ``clipped`` (too many voxels at the maximum) of a volume
    or run, given its range, the number of voxels equal to the maximum and of nonzero voxels."""
    if vmin == vmax:
        return [Flag("constant", modality, f"every voxel of the {modality} is {vmin:g}")]
    share = at_max / max(nonzero, 1)
    if vmax > 0 and at_max > 1 and share > opts.clip_fraction:
        return [Flag("clipped", modality, f"{100 * share:.1f}% of the nonzero {modality} voxels equal the "
                     f"maximum {vmax:g} (saturated or clipped intensities; over {100 * opts.clip_fraction:g}% "
                     "is flagged)")]
    return []


@dataclass
class FmriSummary:
    """One pass over an fMRI run (T frames of (X, Y, Z)), block by block.

    ``mean``/``tsd``: (X, Y, Z) temporal mean and std; ``frame_mean``/``frame_std``: (T,) mean
    and spread over the voxels of each frame; ``carpet``: (T, K) values of K voxels on a
    regular sample grid; ``carpet_index``: their flat voxel indices; ``vmin``/``vmax``,
    ``at_max``, ``nonzero``: range facts of the whole run.
    """

    mean: np.ndarray
    tsd: np.ndarray
    frame_mean: np.ndarray
    frame_std: np.ndarray
    carpet: np.ndarray
    carpet_index: np.ndarray
    vmin: float
    vmax: float
    at_max: int
    nonzero: int


def summarize_fmri(store: CohortStore, subject: str, carpet_voxels: int) -> FmriSummary:
    """Read the run in blocks of :data:`FRAME_BLOCK` frames and summarise it (float64 sums)."""
    t, *spatial = store.shape(subject, "fmri")
    n = int(np.prod(spatial))
    # a few times more sample voxels than shown: the carpet keeps those in the foreground
    stride = max(1, n // (4 * carpet_voxels))
    index = np.arange(0, n, stride)
    s1, s2 = np.zeros(n), np.zeros(n)
    frame_mean, frame_std, carpet = np.empty(t), np.empty(t), np.empty((t, index.size), np.float32)
    vmin, vmax, at_max, nonzero = np.inf, -np.inf, 0, 0
    for t0 in range(0, t, FRAME_BLOCK):
        block = store.read_fmri(subject, frames=slice(t0, min(t0 + FRAME_BLOCK, t)), normalize=False)
        flat = block.reshape(block.shape[0], n).astype(np.float64)
        s1 += flat.sum(axis=0)
        s2 += (flat ** 2).sum(axis=0)
        frame_mean[t0:t0 + len(flat)] = flat.mean(axis=1)
        frame_std[t0:t0 + len(flat)] = flat.std(axis=1)
        carpet[t0:t0 + len(flat)] = flat[:, index]
        bmax = float(flat.max())
        if bmax > vmax:
            vmax, at_max = bmax, 0
        at_max += int((flat == vmax).sum()) if bmax == vmax else 0
        vmin = min(vmin, float(flat.min()))
        nonzero += int(np.count_nonzero(flat))
    mean = s1 / t
    tsd = np.sqrt(np.maximum(s2 / t - mean ** 2, 0.0))
    return FmriSummary(mean.reshape(spatial), tsd.reshape(spatial), frame_mean, frame_std, carpet, index,
                       vmin, vmax, at_max, nonzero)


def foreground(volume: np.ndarray) -> np.ndarray:
    """Boolean mask of the head: above :data:`FOREGROUND` of the 99th percentile."""
    top = np.percentile(volume, 99)
    return volume > FOREGROUND * top if top > 0 else np.zeros(volume.shape, bool)


def fov_overlap(fmri_mean: np.ndarray, fmri_affine: np.ndarray, t1_shape: tuple[int, ...],
                t1_affine: np.ndarray) -> float:
    """Share of the fMRI foreground voxels whose world position (mm) lies inside the T1 volume."""
    vox = np.argwhere(foreground(fmri_mean))
    if not len(vox):
        return 0.0
    to_t1 = np.linalg.inv(t1_affine) @ fmri_affine
    ijk = vox @ to_t1[:3, :3].T + to_t1[:3, 3]
    inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(t1_shape) - 0.5), axis=1)
    return float(inside.mean())


def check_subject(store: CohortStore, subject: str, opts: QCOptions, min_frames: int,
                  zscores: dict[str, dict[str, float]]) -> tuple[SubjectQC, np.ndarray | None, FmriSummary | None]:
    """Facts and flags of one subject; also returns its T1 (X, Y, Z) and fMRI summary (or None)
    for the figures."""
    qc = SubjectQC(subject, store.label(subject), {})
    t1 = summary = None
    for m in ("t1", "fmri"):
        if store.has(subject, m):
            qc.facts[m] = header_facts(store, subject, m)
        else:
            qc.flags.append(Flag("missing", m, f"no {m} in the store (converted with --require t1?)"))
    if "t1" in qc.facts:
        t1 = store.read_t1(subject, normalize=False)
        vmax = float(t1.max())
        qc.flags += range_flags("t1", float(t1.min()), vmax, int((t1 == vmax).sum()), int(np.count_nonzero(t1)), opts)
    if "fmri" in qc.facts:
        summary = summarize_fmri(store, subject, opts.carpet_voxels)
        frames = qc.facts["fmri"]["shape"][0]
        qc.flags += range_flags("fmri", summary.vmin, summary.vmax, summary.at_max, summary.nonzero, opts)
        flat = int((summary.frame_std == 0).sum())
        if flat and summary.vmin != summary.vmax:
            qc.flags.append(Flag("constant", "fmri", f"{flat} of {frames} frames hold one value only "
                                 "(blank or dropped volumes)"))
        elif frames > 1 and summary.vmin != summary.vmax and not summary.tsd.any():
            qc.flags.append(Flag("constant", "fmri", "no voxel changes over time: the run repeats one volume"))
        if frames < min_frames:
            qc.flags.append(Flag("frames", "fmri", f"{frames} frames, fewer than {min_frames} "
                                 "(a truncated run? the cohort's usual length or --min-frames)"))
    if t1 is not None and summary is not None:
        a, b = qc.facts["t1"]["axcodes"], qc.facts["fmri"]["axcodes"]
        if a != b:
            qc.flags.append(Flag("orientation", "t1+fmri", f"T1 voxel axes point {a}, fMRI {b} (from the stored "
                                 "affines): tools that ignore the affines see them flipped; reconvert with "
                                 "--canonical to store both as RAS"))
        share = fov_overlap(summary.mean, qc.facts["fmri"]["affine"], t1.shape, qc.facts["t1"]["affine"])
        qc.numbers["fMRI head inside the T1 field of view"] = share
        if share < opts.fov_overlap:
            qc.flags.append(Flag("fov", "t1+fmri", f"only {100 * share:.0f}% of the fMRI head lies inside the "
                                 "T1 field of view (affines from different spaces, or a wrong sform/qform)"))
    qc.flags += registration_flags(store, subject, qc, opts)
    for key, z in sorted(zscores.items()):
        if subject in z and abs(z[subject]) > opts.z_threshold:
            m, stat = key.rsplit("_", 1)
            qc.flags.append(Flag("outlier", m, f"{m} {stat} is {z[subject]:+.1f} robust SD from the cohort "
                                 f"median (|z| > {opts.z_threshold:g})"))
    return qc, t1, summary


_SIMILARITY = {"t1": ("template_correlation", "correlation with the template", "min_template_corr"),
               "fmri": ("brain_dice", "brain overlap (Dice) with the template", "min_brain_dice")}


def registration_flags(store: CohortStore, subject: str, qc: SubjectQC, opts: QCOptions) -> list[Flag]:
    """``registration`` flags from the similarities the conversion recorded with each registered
    image (also kept in ``qc.similarity``); none for images that were not registered."""
    flags = []
    for m in qc.facts:
        record = store.meta(subject, m).get("registration")
        if not record:
            continue
        key, what, floor_name = _SIMILARITY[m]
        before, after = record[key]["before"], record[key]["after"]
        qc.similarity[m] = {"measure": what, "before": before, "after": after}
        floor = getattr(opts, floor_name)
        fix = ("the registration probably failed: look at the overlay; check the source's orientation and header, "
               "that the T1 is skull-stripped, or try another --register type")
        if after < floor:
            flags.append(Flag("registration", m, f"{m} {what} is {after:.2f} after registration, under "
                              f"{floor:g} (--{floor_name.replace('_', '-')}); {fix}"))
        elif before is not None and after < before - registration.WORSE_BY:
            flags.append(Flag("registration", m, f"{m} {what} fell from {before:.2f} (header placement) to "
                              f"{after:.2f} by registration; {fix}"))
    return flags


# ====================================================================== figures


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) volume and affine reoriented to RAS+ (voxels permuted/flipped, no resampling)."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(volume, ornt)
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)


def _slices(mask: np.ndarray, n: int) -> np.ndarray:
    """``n`` evenly spaced indices along the last axis, within the extent of ``mask`` (else all)."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = (zs[0], zs[-1]) if len(zs) else (0, mask.shape[2] - 1)
    return np.unique(np.linspace(lo, hi, n + 2)[1:-1].round().astype(int)) if hi > lo else np.array([lo])


def montage(planes: list[np.ndarray], ncols: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tile (X, Y) planes (RAS: X right, Y anterior) into one image for ``imshow`` (rows from the
    top: anterior up), NaN between tiles so contours stop at tile edges; also the (row, col) of
    each tile's top-left corner."""
    nx, ny = planes[0].shape
    ncols = min(ncols, len(planes))
    nrows = -(-len(planes) // ncols)
    out = np.full((nrows * (ny + 1), ncols * (nx + 1)), np.nan)
    corners = []
    for i, plane in enumerate(planes):
        r, c = (i // ncols) * (ny + 1), (i % ncols) * (nx + 1)
        out[r:r + ny, c:c + nx] = plane.T[::-1]
        corners.append((r, c))
    return out, corners


def _montage_axes(fig: Figure, rect: tuple[float, float, float, float], image: np.ndarray, aspect: float, **kw):
    ax = fig.add_axes(rect)
    ax.imshow(np.ma.masked_invalid(image), aspect=aspect, interpolation="nearest", **kw)
    ax.set_axis_off()
    return ax


@dataclass
class _Mosaic:
    """A montage of axial T1 slices drawn into a figure: the RAS volume and affine, the slice
    indices ``ks``, the montage ``image`` (NaN between tiles), its tile corners and axes."""

    fig: Figure
    ax: object
    vol: np.ndarray
    aff: np.ndarray
    ks: np.ndarray
    image: np.ndarray
    corners: list[tuple[int, int]]

    @classmethod
    def draw(cls, t1: np.ndarray, t1_affine: np.ndarray, n_slices: int, ncols: int) -> "_Mosaic":
        """Axial slices (RAS+: right on the right, anterior up) through the head, gray, one image."""
        vol, aff = to_ras(t1, t1_affine)
        ks = _slices(foreground(vol) if vol.max() > vol.min() else np.ones(vol.shape, bool), n_slices)
        image, corners = montage([vol[:, :, k] for k in ks], ncols)
        zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        aspect = float(zooms[1] / zooms[0])
        height, width = image.shape
        fig = Figure(figsize=(10, 10 * height * aspect / width + 0.4))
        lo, hi = np.nanpercentile(image, (1, 99.5))
        ax = _montage_axes(fig, (0, 0, 1, 0.93), image, aspect, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
        return cls(fig, ax, vol, aff, ks, image, corners)

    def finish(self, title: str) -> Figure:
        """Slice labels and the title; returns the figure."""
        for k, (r, c) in zip(self.ks, self.corners):
            self.ax.text(c + 1, r + 1, f"z={k}", color="white", fontsize=7, va="top")
        self.fig.text(0.5, 0.99, title, ha="center", va="top", fontsize=9)
        return self.fig


def t1_mosaic_figure(t1: np.ndarray, t1_affine: np.ndarray, fmri_mean: np.ndarray | None,
                     fmri_affine: np.ndarray | None, n_slices: int, ncols: int = 6) -> Figure:
    """Axial T1 slices (RAS+: right on the right, anterior up) with the fMRI mean's foreground
    outline (red) and the edge of the fMRI field of view (dashed yellow) resampled onto them
    through the two affines (world mm; trilinear). One image (a montage), for speed."""
    mosaic = _Mosaic.draw(t1, t1_affine, n_slices, ncols)
    vol, aff, ks, image, ax = mosaic.vol, mosaic.aff, mosaic.ks, mosaic.image, mosaic.ax
    if fmri_mean is not None:
        to_fmri = np.linalg.inv(fmri_affine) @ aff
        ii, jj = np.meshgrid(np.arange(vol.shape[0]), np.arange(vol.shape[1]), indexing="ij")
        sampled = []
        for k in ks:
            pts = np.stack([ii, jj, np.full_like(ii, k), np.ones_like(ii)]).reshape(4, -1)
            coords = (to_fmri @ pts)[:3]
            # the field of view reaches half a voxel past the outer voxel centres
            inside = np.all((coords >= -0.5) & (coords <= np.asarray(fmri_mean.shape)[:, None] - 0.5), axis=0)
            values = ndimage.map_coordinates(fmri_mean, coords, order=1, mode="nearest")
            sampled.append(np.where(inside, values, np.nan).reshape(ii.shape))
        fmri_img, _ = montage(sampled, ncols)
        inside = np.where(np.isnan(image), np.nan, np.isfinite(fmri_img).astype(float))
        if np.nanmin(inside) < 0.5 < np.nanmax(inside):
            ax.contour(inside, levels=[0.5], colors="yellow", linewidths=0.8, linestyles="--")
        top = np.percentile(fmri_mean, 99)
        values = np.where(np.isnan(image), np.nan, np.nan_to_num(fmri_img))
        if top > 0 and np.nanmax(values) > FOREGROUND * top:
            ax.contour(values, levels=[FOREGROUND * top], colors="red", linewidths=0.8)
    return mosaic.finish("T1 (RAS, axial) with the fMRI mean outline (red) and the fMRI field of view (dashed yellow)")


def registration_figure(t1: np.ndarray, t1_affine: np.ndarray, template: str, n_slices: int,
                        ncols: int = 6) -> Figure:
    """The registered T1 ((X, Y, Z) on its template grid, ``t1_affine`` voxel -> template mm) in
    axial slices with the template's brain outline (cyan) and its grey/white edge (yellow: the
    template T1 at the median of its brain voxels) drawn over it: where they cut through the
    subject's anatomy, the registration missed."""
    mosaic = _Mosaic.draw(t1, t1_affine, n_slices, ncols)
    tpl, brain = registration.template_on_grid(template, t1.shape, t1_affine)
    tpl, _ = to_ras(tpl, t1_affine)
    brain, _ = to_ras(brain.astype(np.float32), t1_affine)
    edge = float(np.median(tpl[brain > 0.5])) if (brain > 0.5).any() else 0.0
    for volume, level, color in ((brain, 0.5, "cyan"), (tpl, edge, "yellow")):
        tiles, _ = montage([volume[:, :, k] for k in mosaic.ks], ncols)
        tiles = np.where(np.isnan(mosaic.image), np.nan, tiles)
        if np.nanmin(tiles) < level < np.nanmax(tiles):
            mosaic.ax.contour(tiles, levels=[level], colors=color, linewidths=0.7)
    return mosaic.finish(f"T1 registered to {template}: the template's brain outline (cyan) and grey/white edge "
                         "(yellow)")


def fmri_figure(summary: FmriSummary, fmri_affine: np.ndarray, n_voxels: int, n_slices: int) -> Figure:
    """Global mean and per-frame spread over time; a carpet (voxels x frames, each voxel's
    series minus its mean over its temporal std, clipped at ±3); temporal-std slices."""
    t = len(summary.frame_mean)
    fig = Figure(figsize=(10, 6))
    ax_sig = fig.add_axes((0.07, 0.78, 0.9, 0.17))
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
    ax_carpet = fig.add_axes((0.07, 0.35, 0.9, 0.4), sharex=ax_sig)
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
    tsd, _ = to_ras(summary.tsd, fmri_affine)
    ks = _slices(np.ones(tsd.shape, bool), n_slices)
    image, corners = montage([tsd[:, :, k] for k in ks], len(ks))
    vmax = float(np.percentile(tsd, 99.5)) or 1.0
    ax = _montage_axes(fig, (0.07, 0.0, 0.9, 0.25), image, 1.0, cmap="magma", vmin=0, vmax=vmax)
    for k, (r, c) in zip(ks, corners):
        ax.text(c + 1, r + 1, f"tSD z={k}", color="white", fontsize=7, va="top")
    return fig


# ====================================================================== HTML


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}
section.subject{border-left:6px solid #3a3;padding:.2em 1em;margin:1.5em 0}
section.subject.flagged{border-left-color:#c22;background:#fff6f6}
.badge{font-size:12px;padding:2px 6px;border-radius:4px;color:#fff;background:#3a3}
.flagged .badge{background:#c22}
ul.flags li{color:#a11}img{max-width:100%;display:block;margin:.4em 0}
code{font-size:12px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cohort_html(store: CohortStore, results: list[SubjectQC], opts: QCOptions, min_frames: int) -> str:
    """The cohort section: labels, shapes, conversion failures and warnings, flagged subjects."""
    rows = store.table
    labels = Counter(r["label"] for r in rows)
    parts = ["<section id='cohort'><h2>Cohort</h2>",
             f"<p>{len(rows)} subjects in the store; {len(results)} shown here; runs shorter than "
             f"{min_frames} frames and |robust z| above {opts.z_threshold:g} are flagged.</p>",
             "<h3>Labels</h3>",
             _table(["label", "subjects"], [[c, labels.get(c, 0)] for c in store.classes]
                    + [[c, n] for c, n in labels.items() if c not in store.classes])]
    settings = store.attrs.get(registration.GROUP)
    parts.append(f"<p>registration: {_e(settings['type'])} to {_e(settings['template'])} (ANTs; T1 grid "
                 f"{settings['t1_grid']['shape']}, fMRI grid {settings['fmri_grid']['shape']}, MNI mm); flagged under "
                 f"correlation {opts.min_template_corr:g} (T1) or brain Dice {opts.min_brain_dice:g} (fMRI)</p>"
                 if settings else "<p>registration: none (the files' voxels, placed by their headers)</p>")
    for m in ("t1", "fmri"):
        shapes = Counter(tuple(r[m]["shape"]) for r in rows if r.get(m))
        parts.append(f"<p>{m} stored shapes: " + ", ".join(f"<code>{list(s)}</code> x{n}" for s, n in
                                                             shapes.most_common()) + "</p>")
    report = store.report()
    failed = report.get("failed", [])
    parts.append(f"<h3 id='failures'>Conversion failures ({len(failed)})</h3>")
    if report:
        parts.append(_table(["subject", "file", "error"], [[f.get("subject"), f.get("file") or "", f.get("error")]
                                                            for f in failed]) if failed else "<p>none</p>")
        if report.get("aborted"):
            parts.append(f"<p class='aborted'>the last conversion was aborted: {_e(report['aborted'])}</p>")
        warnings = report.get("warnings", [])
        if warnings:
            parts.append(f"<details><summary>{len(warnings)} conversion warnings</summary><ul>"
                         + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></details>")
    else:
        parts.append(f"<p>no conversion_report.json in {_e(store.path)}</p>")
    flagged = [r for r in results if r.flags]
    parts.append(f"<h3 id='flagged'>Flagged subjects ({len(flagged)} of {len(results)})</h3>")
    parts.append("<table><tr><th>subject</th><th>label</th><th>flags</th></tr>" + "".join(
        f"<tr><td><a href='#{_e(r.subject)}'>{_e(r.subject)}</a></td><td>{_e(r.label)}</td>"
        f"<td>{_e(', '.join(sorted({f.code for f in r.flags})))}</td></tr>" for r in flagged) + "</table>")
    return "".join(parts) + "</section>"


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def subject_html(qc: SubjectQC) -> str:
    """One subject's section; ``class="subject flagged"`` and ``data-flags`` when flagged."""
    codes = " ".join(sorted({f.code for f in qc.flags}))
    state = "flagged" if qc.flags else "ok"
    rows = [[m, f["shape"], f["source_shape"], f["dtype"], f["zooms_mm"],
             "" if f["tr_seconds"] is None else f"{f['tr_seconds']:g}", f["axcodes"], f["source_axcodes"]]
            for m, f in qc.facts.items()]
    parts = [f"<section class='subject {state}' id='{_e(qc.subject)}' data-flags='{_e(codes)}'>",
             f"<h2>{_e(qc.subject)} <small>({_e(qc.label)})</small> "
             f"<span class='badge'>{'FLAGGED: ' + _e(codes) if qc.flags else 'OK'}</span></h2>",
             _table(["modality", "stored shape", "source shape", "dtype", "voxel mm", "TR s", "axes (stored)",
                     "axes (source)"], rows)]
    if qc.numbers:
        parts.append("<p>" + ", ".join(f"{_e(k)}: {100 * v:.0f}%" for k, v in qc.numbers.items()) + "</p>")
    if qc.similarity:
        parts.append("<p class='similarity'>registration: " + "; ".join(
            f"{_e(m)} {_e(v['measure'])} {_number(v['before'])} (header placement) -> {_number(v['after'])}"
            for m, v in qc.similarity.items()) + "</p>")
    if qc.flags:
        parts.append("<ul class='flags'>" + "".join(
            f"<li class='flag' data-flag='{_e(f.code)}'><b>{_e(f.code)}</b> ({_e(f.modality)}): {_e(f.message)}</li>"
            for f in qc.flags) + "</ul>")
    for caption, name in qc.images.items():
        parts.append(f"<figure><img src='{_e(name)}' alt='{_e(qc.subject)} {_e(caption)}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def page_html(store: CohortStore, results: list[SubjectQC], opts: QCOptions, min_frames: int) -> str:
    when = datetime.datetime.now().isoformat(timespec="seconds")
    flagged = sum(1 for r in results if r.flags)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR}'><title>QC {_e(store.path.name)}</title>"
            f"<style>{CSS}</style></head><body><h1>QC report of <code>{_e(store.path)}</code></h1>"
            f"<p>written {when}; {len(results)} subjects, <b>{flagged} flagged</b> "
            f"(<a href='#flagged'>list</a>)</p>"
            + cohort_html(store, results, opts, min_frames) + "".join(subject_html(r) for r in results)
            + "</body></html>\n")


# ====================================================================== the report


def _prepare_out(out: Path, store: CohortStore) -> None:
    """Refuse an --out that is inside the store or a folder other than an earlier QC report
    (its files get the store's permissions); clear an earlier report's files."""
    out_abs, store_abs = out.resolve(), store.path.resolve()
    if out_abs == store_abs or store_abs in out_abs.parents:
        raise QCError(f"--out {out} is inside the cohort store {store.path}; write the report elsewhere, "
                      f"e.g. --out {store.path.parent / (store.path.name + '_qc')}")
    if out.exists() and any(out.iterdir()):
        index = out / INDEX
        if not (index.is_file() and f"content='{GENERATOR}'" in index.read_text(errors="replace")[:2000]):
            raise QCError(f"--out {out} exists and is not an earlier QC report (its files would be given the "
                          "store's permissions); choose a new or empty folder")
        for p in out.iterdir():
            if p.name == INDEX or p.suffix == ".png":
                p.unlink()


def _save(fig: Figure, path: Path, dpi: int) -> str:
    """PNG of ``fig`` at ``path``; returns its file name. (Not masan.evaluate.plots.save_figure:
    importing masan.evaluate loads torch, seconds for a tool that needs none of it.)"""
    fig.savefig(path, dpi=dpi)
    return path.name


def write_report(store_path: str | os.PathLike, out: str | os.PathLike, opts: QCOptions | None = None) -> dict:
    """Check the subjects of a store and write ``out/index.html`` plus PNGs.

    The report is never more readable than the store (it shows subjects' images and labels):
    files are created under a umask from the store's mode, then the folder gets the store's
    mode and group (:mod:`masan.access`). Returns ``{"index", "subjects", "flagged" (subject ->
    flag codes), "access"}``. Raises :class:`QCError` naming the fix for a bad store, subject
    or output folder.
    """
    opts = opts or QCOptions()
    out = Path(out)
    try:
        store = CohortStore(store_path)
        everyone = store.subjects
    except StoreError as e:
        raise QCError(str(e)) from None
    chosen = list(dict.fromkeys(opts.subjects)) if opts.subjects else everyone
    unknown = [s for s in chosen if s not in set(everyone)]
    if unknown:
        raise QCError(f"--subjects {unknown} not in the store {store.path} ({len(everyone)} subjects: "
                      f"{everyone[:5]}{'...' if len(everyone) > 5 else ''}); list them with "
                      f"python data_tools/inspect_store.py {store.path}")
    if not chosen:
        raise QCError(f"the store {store.path} has no subjects; convert some with data_tools/to_zarr.py")
    _prepare_out(out, store)
    min_frames = opts.min_frames if opts.min_frames is not None else default_min_frames(store)
    zscores = {k: robust_z(v) for k, v in cohort_numbers(store).items()}
    mode, gid = restrictive_mode([store.path])
    results = []
    with creation_umask(mode):
        out.mkdir(parents=True, exist_ok=True)
        for subject in tqdm(chosen, desc="qc", unit="subject", disable=not opts.progress):
            qc, t1, summary = check_subject(store, subject, opts, min_frames, zscores)
            if t1 is not None:
                fig = t1_mosaic_figure(t1, qc.facts["t1"]["affine"], None if summary is None else summary.mean,
                                       qc.facts.get("fmri", {}).get("affine"), opts.mosaic_slices)
                qc.images["T1 mosaic with fMRI outline"] = _save(fig, out / f"{subject}_t1.png", opts.dpi)
            registered = store.meta(subject, "t1").get("registration") if t1 is not None else None
            if registered:
                fig = registration_figure(t1, qc.facts["t1"]["affine"], registered["template"], opts.mosaic_slices)
                qc.images[f"T1 registered to {registered['template']} ({registered['type']}) with the template's "
                          "edges"] = _save(fig, out / f"{subject}_registration.png", opts.dpi)
            if summary is not None:
                fig = fmri_figure(summary, qc.facts["fmri"]["affine"], opts.carpet_voxels,
                                  max(1, opts.mosaic_slices // 2))
                qc.images["fMRI signal, carpet and temporal std"] = _save(fig, out / f"{subject}_fmri.png", opts.dpi)
            results.append(qc)
        atomic_write_text(out / INDEX, page_html(store, results, opts, min_frames))
    applied = apply_access(out, mode, gid)
    return {"index": out / INDEX, "subjects": len(results),
            "flagged": {r.subject: sorted({f.code for f in r.flags}) for r in results if r.flags},
            "access": describe_mode(*applied)}

