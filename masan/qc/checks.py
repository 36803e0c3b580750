"""Per-subject checks of the QC report: header facts, value ranges, frames, overlap, registration.

Each check reads what it needs from a :class:`~masan.store.cohort.CohortStore` and returns
:class:`Flag` s (codes: :mod:`masan.qc.report`). The fMRI is read one block of frames at a time,
so memory stays at one block plus a few per-voxel sums, whatever the run's length. Reads go
through :func:`masan.qc.damage.reading`, so a damaged or unreadable subject raises
:class:`~masan.qc.damage.Unreadable` naming the true cause; the stored values are read as
they are and checked against their recorded checksum (:func:`masan.qc.damage.check_values`)
before they are scaled, so a chunk that decodes to wrong values is caught too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from masan.convert import registration
from masan.qc.damage import Unreadable, check_values, crc32, reading
from masan.store.cohort import CohortStore, scaled_float32

if TYPE_CHECKING:
    from masan.qc.options import QCOptions

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


@dataclass
class Flag:
    """Something that looks wrong with a subject."""

    code: str
    """One of the codes in :mod:`masan.qc.report`'s docstring."""
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


def effective_tr(meta: dict) -> float | None:
    """The fMRI TR in s: the image's own ``tr_seconds`` (e.g. from the BIDS sidecar) when it has
    one, else the NIfTI header's (None when neither gives one)."""
    return meta.get("tr_seconds", meta.get("nifti", {}).get("tr_seconds"))


def header_facts(store: CohortStore, subject: str, modality: str) -> dict:
    """Shape, dtype, voxel size (mm), TR (s) and orientation of one stored array and its source.

    Returns keys ``shape`` (stored: (X, Y, Z) or (T, X, Y, Z)), ``source_shape`` (as in the
    NIfTI file: (X, Y, Z[, T])), ``dtype``, ``zooms_mm`` (of the stored affine), ``tr_seconds``
    (:func:`effective_tr`), ``axcodes`` (of the stored affine), ``source_axcodes``,
    ``handedness`` (+1: right-handed voxel axes like RAS, -1: mirrored like LAS; sign of the
    determinant of the stored affine's 3x3), ``affine`` ((4, 4) world mm), ``stats`` (mean/std
    recorded at conversion) and ``registration`` (the conversion's record, or None).
    """
    meta = store.meta(subject, modality)
    nii = meta.get("nifti", {})
    affine = store.affine(subject, modality)
    return {
        "shape": list(store.shape(subject, modality)),
        "source_shape": nii.get("shape"),
        "dtype": nii.get("dtype"),
        "zooms_mm": [round(float(z), 3) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "tr_seconds": effective_tr(meta),
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "source_axcodes": "".join(nii.get("axcodes") or []),
        "handedness": int(np.sign(np.linalg.det(affine[:3, :3]))),
        "affine": affine,
        "stats": meta.get("stats", {}),
        "registration": meta.get("registration"),
    }


def read_headers(store: CohortStore, subjects: list[str]) -> tuple[dict[str, dict[str, dict]], dict[str, Flag]]:
    """:func:`header_facts` of every modality the store has for each subject (no voxels read):
    ``{subject: {modality: facts}}``, and ``{subject: unreadable Flag}`` for the subjects whose
    headers could not be read (they keep the modalities that could)."""
    facts: dict[str, dict[str, dict]] = {}
    broken: dict[str, Flag] = {}
    for s in subjects:
        facts[s] = {}
        for m in ("t1", "fmri"):
            if not store.has(s, m):
                continue
            try:
                with reading(store, s, m):
                    facts[s][m] = header_facts(store, s, m)
            except Unreadable as e:
                broken[s] = Flag("unreadable", e.modality, str(e))
                break
    return facts, broken


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


def cohort_numbers(facts: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """``<modality>_<mean|std>`` -> {subject: value} from the statistics the conversion stored
    with each array (``facts`` of :func:`read_headers`; no voxels read)."""
    out: dict[str, dict[str, float]] = {}
    for s, per_modality in facts.items():
        for m, f in per_modality.items():
            for k in STATS:
                if k in f["stats"]:
                    out.setdefault(f"{m}_{k}", {})[s] = float(f["stats"][k])
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
    ``at_max``, ``nonzero``: range facts of the whole run; ``crc``: CRC-32 of its stored values
    (:func:`masan.qc.damage.crc32`).
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
    crc: int


def summarize_fmri(store: CohortStore, subject: str, carpet_voxels: int) -> FmriSummary:
    """Read the run in blocks of :data:`FRAME_BLOCK` frames and summarise it (float64 sums)."""
    t, *spatial = store.shape(subject, "fmri")
    slope, inter, _, _ = store.scaling(subject, "fmri")
    n = int(np.prod(spatial))
    # a few times more sample voxels than shown: the carpet keeps those in the foreground
    stride = max(1, n // (4 * carpet_voxels))
    index = np.arange(0, n, stride)
    s1, s2 = np.zeros(n), np.zeros(n)
    frame_mean, frame_std, carpet = np.empty(t), np.empty(t), np.empty((t, index.size), np.float32)
    vmin, vmax, at_max, nonzero, crc = np.inf, -np.inf, 0, 0, 0
    for t0 in range(0, t, FRAME_BLOCK):
        raw = store.read_raw(subject, "fmri", frames=slice(t0, min(t0 + FRAME_BLOCK, t)))
        crc = crc32(raw, crc)
        flat = scaled_float32(raw, slope, inter).reshape(raw.shape[0], n).astype(np.float64)
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
                       vmin, vmax, at_max, nonzero, crc)


def foreground_level(volume: np.ndarray) -> float | None:
    """The intensity above which a voxel is head: :data:`FOREGROUND` of the 99th percentile;
    None for a volume without a positive one."""
    top = float(np.percentile(volume, 99))
    return FOREGROUND * top if top > 0 else None


def foreground(volume: np.ndarray) -> np.ndarray:
    """Boolean mask of the head (:func:`foreground_level`)."""
    level = foreground_level(volume)
    return volume > level if level is not None else np.zeros(volume.shape, bool)


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


def _recorded_crc(store: CohortStore, subject: str, modality: str) -> str | None:
    """The CRC-32 the conversion recorded for the stored level 0 (None in stores without one).
    Asked after the read, not taken from the headers read before: a conversion running now may
    have republished the subject in between, and the read followed it."""
    with reading(store, subject, modality):
        return store.meta(subject, modality).get("checksum", {}).get("crc32")


def check_subject(store: CohortStore, subject: str, facts: dict[str, dict], opts: QCOptions, min_frames: int,
                  zscores: dict[str, dict[str, float]]) -> tuple[SubjectQC, np.ndarray | None, FmriSummary | None]:
    """Facts and flags of one subject (``facts``: its :func:`read_headers` entry); also returns its
    T1 (X, Y, Z) and fMRI summary (or None) for the figures. Raises
    :class:`~masan.qc.damage.Unreadable` when its voxels cannot be read or differ from their checksum."""
    qc = SubjectQC(subject, store.label(subject), dict(facts))
    t1 = summary = None
    for m in ("t1", "fmri"):
        if not store.has(subject, m):
            qc.flags.append(Flag("missing", m, f"no {m} in the store (converted with --require t1?)"))
    if "t1" in qc.facts:
        with reading(store, subject, "t1"):
            raw = store.read_raw(subject, "t1")
            slope, inter, _, _ = store.scaling(subject, "t1")
        check_values(store, subject, "t1", _recorded_crc(store, subject, "t1"), crc32(raw))
        t1 = scaled_float32(raw, slope, inter)
        del raw  # scaled, the stored copy only costs memory: one full-size T1 at a time
        vmax = float(t1.max())
        qc.flags += range_flags("t1", float(t1.min()), vmax, int((t1 == vmax).sum()), int(np.count_nonzero(t1)), opts)
    if "fmri" in qc.facts:
        with reading(store, subject, "fmri"):
            summary = summarize_fmri(store, subject, opts.carpet_voxels)
        check_values(store, subject, "fmri", _recorded_crc(store, subject, "fmri"), summary.crc)
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
    qc.flags += registration_flags(qc, opts)
    for key, z in sorted(zscores.items()):
        if subject in z and abs(z[subject]) > opts.z_threshold:
            m, stat = key.rsplit("_", 1)
            qc.flags.append(Flag("outlier", m, f"{m} {stat} is {z[subject]:+.1f} robust SD from the cohort "
                                 f"median (|z| > {opts.z_threshold:g})"))
    return qc, t1, summary


_SIMILARITY = {"t1": ("template_correlation", "correlation with the template", "min_template_corr"),
               "fmri": ("brain_dice", "brain overlap (Dice) with the template", "min_brain_dice")}


def registration_flags(qc: SubjectQC, opts: QCOptions) -> list[Flag]:
    """``registration`` flags from the similarities the conversion recorded with each registered
    image (also kept in ``qc.similarity``); none for images that were not registered."""
    flags = []
    for m, facts in qc.facts.items():
        record = facts["registration"]
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


