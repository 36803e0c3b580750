"""Phantom cohorts with a planted group effect, written as a BIDS folder of NIfTI files.

Each subject is an ellipsoid head (scalp, CSF, grey matter, white matter, ventricles) with
T1-like int16 intensities, a small random size/gain jitter and Gaussian noise. Its fMRI run
is an EPI-like baseline image times ``1 + amplitude * fluctuation(t, x)`` (a few spatially
smooth fields with slow random time courses) plus noise, with a real TR in the header.

The group effect lives in ONE region, a ball given in fractions of the volume
(:class:`PlantedEffect`: ``center`` in [0, 1]^3 along X, Y, Z, ``radius`` as a fraction of
each axis). Inside it, for a subject of class c with severity s_c (NC 0, EMCI 1/3, LMCI
2/3, AD 1 by default) and strength k:

- T1: intensity x (1 - s_c * k) (atrophy-like darkening);
- fMRI: fluctuation amplitude x (1 - s_c * k).

The default ball (centre 0.375, radius 0.1) lies inside cell (1, 1, 1) of the 4x4x4 grid
and cell (0, 0, 0) of the 2x2x2 grid, so models with either patch grid see it in a single
region. ``planted_effect.json`` in the BIDS folder records it (to_zarr copies it into the
store's root attributes); :meth:`PlantedEffect.region_index` gives the region's flat index.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from masan.convert.nifti import write_nifti_slabs
from masan.convert.sources import PLANTED_EFFECT_FILE

DEFAULT_CLASSES = ("NC", "EMCI", "LMCI", "AD")
DEFAULT_SEVERITY = {"NC": 0.0, "EMCI": 1 / 3, "LMCI": 2 / 3, "AD": 1.0}
FIELD_OF_VIEW_MM = (240.0, 256.0, 176.0)
"""Physical extent of both images; voxel sizes follow from the shapes."""


@dataclass(frozen=True)
class Tissue:
    """Phantom intensities (int16 units), head geometry (fractions of the volume) and what
    varies between subjects.

    Attributes:
        t1, epi: intensity of each tissue (scalp, CSF, GM, WM) in T1 and in the EPI baseline.
        head_radius: semi-axes of the head ellipsoid, fractions of each axis; the brain's
            layers scale from it. ``ventricle_radius``: the ventricles' semi-axes.
        size_jitter, gain_jitter: relative random scaling of each subject's head, and scanner
            gain per subject.
        fluctuation: fMRI fluctuation amplitude (fraction of baseline) outside the planted
            region, from ``fluctuation_fields`` smooth spatial fields of correlation length
            ``smoothness`` (fraction of the volume).
        noise: Gaussian noise std (int16 units) of the T1 and of each EPI frame.
    """

    t1: dict = field(default_factory=lambda: {"scalp": 300.0, "csf": 150.0, "gm": 550.0, "wm": 850.0})
    epi: dict = field(default_factory=lambda: {"scalp": 200.0, "csf": 900.0, "gm": 700.0, "wm": 550.0})
    head_radius: tuple[float, float, float] = (0.44, 0.44, 0.42)
    ventricle_radius: tuple[float, float, float] = (0.04, 0.12, 0.06)
    size_jitter: float = 0.03
    gain_jitter: float = 0.08
    fluctuation: float = 0.05
    fluctuation_fields: int = 3
    smoothness: float = 0.15
    noise: dict = field(default_factory=lambda: {"t1": 20.0, "epi": 8.0})


@dataclass(frozen=True)
class PlantedEffect:
    """Where and how strongly the group effect is planted (see module docstring)."""

    center: tuple[float, float, float] = (0.375, 0.375, 0.375)
    radius: float = 0.1
    strength: float = 0.5
    severity: dict = field(default_factory=lambda: dict(DEFAULT_SEVERITY))

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Boolean (X, Y, Z) ball at voxel centres."""
        grids = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
        r2 = sum((g - c) ** 2 for g, c in zip(grids, self.center))
        return r2 <= self.radius ** 2

    def cell(self, grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """The grid cell holding the whole ball, or None when it spans several cells."""
        lo = [int(np.floor((c - self.radius) * g)) for c, g in zip(self.center, grid)]
        hi = [int(np.floor((c + self.radius) * g)) for c, g in zip(self.center, grid)]
        return tuple(lo) if lo == hi else None

    def region_index(self, grid: tuple[int, int, int]) -> int | None:
        """Flat C-order index (ix * gy * gz + iy * gz + iz) of :meth:`cell`."""
        cell = self.cell(grid)
        return None if cell is None else int(np.ravel_multi_index(cell, grid))

    def record(self, grids: tuple[tuple[int, int, int], ...] = ((4, 4, 4), (2, 2, 2))) -> dict:
        d = asdict(self)
        d["cells"] = {"x".join(map(str, g)): self.cell(g) for g in grids}
        d["region_index"] = {"x".join(map(str, g)): self.region_index(g) for g in grids}
        d["effect"] = {"t1": "intensity x (1 - severity * strength) inside the ball",
                       "fmri": "fluctuation amplitude x (1 - severity * strength) inside the ball",
                       "center_radius_units": "fractions of the X, Y, Z extent (voxel centres (i + 0.5) / n)"}
        return d


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    return np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in shape], indexing="ij")


def _phantom(shape: tuple[int, int, int], scale: float, contrast: dict, tissue: Tissue) -> np.ndarray:
    """Noise-free head: nested ellipsoids, float64 (X, Y, Z)."""
    g = _grid(shape)
    rho = np.sqrt(sum((x / (r * scale)) ** 2 for x, r in zip(g, tissue.head_radius)))
    img = np.zeros(shape)
    img[rho < 1.0] = contrast["scalp"]
    img[rho < 0.9] = contrast["csf"]
    img[rho < 0.85] = contrast["gm"]
    img[rho < 0.65] = contrast["wm"]
    for side in (-1, 1):  # two lateral ventricles beside the midline
        centre = (side * 0.06 * scale, 0.0, 0.02 * scale)
        v = sum(((x - c) / (r * scale)) ** 2 for x, c, r in zip(g, centre, tissue.ventricle_radius))
        img[v < 1.0] = contrast["csf"]
    return img


def smooth_fields(rng: np.random.Generator, k: int, shape: tuple[int, int, int], length: float) -> np.ndarray:
    """k unit-variance Gaussian random fields (k, X, Y, Z), correlation length in volume fractions."""
    freqs = np.meshgrid(*[np.fft.fftfreq(n) * n for n in shape], indexing="ij")
    kernel = np.exp(-0.5 * sum(f ** 2 for f in freqs) * (2 * np.pi * length) ** 2)
    fields = np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal((k,) + shape), axes=(1, 2, 3)) * kernel,
                                  axes=(1, 2, 3)))
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def time_courses(rng: np.random.Generator, k: int, frames: int) -> np.ndarray:
    """Slow random time courses (frames, k'), zero mean, unit std and mutually orthogonal.

    k' = min(k, frames - 1). Orthogonality makes every voxel's temporal std equal to its
    amplitude (see :func:`_fmri_slabs`), so the planted damping is not drowned by chance.
    """
    k = min(k, frames - 1)
    if k < 1:
        return np.zeros((frames, 0))
    raw = rng.standard_normal((frames + 8, k))
    kernel = np.hanning(9)
    courses = np.stack([np.convolve(raw[:, j], kernel, mode="valid")[:frames] for j in range(k)], axis=1)
    q, _ = np.linalg.qr(courses - courses.mean(axis=0))
    return q * np.sqrt(frames)


def to_int16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.abs(a)), 0, np.iinfo(np.int16).max).astype(np.int16)


def _affine(shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[float, float, float]]:
    zooms = tuple(f / n for f, n in zip(FIELD_OF_VIEW_MM, shape))
    aff = np.diag(zooms + (1.0,))
    aff[:3, 3] = [-f / 2 for f in FIELD_OF_VIEW_MM]
    return aff, zooms


def _fmri_slabs(rng: np.random.Generator, base: np.ndarray, amplitude: np.ndarray, frames: int,
                slab: int, tissue: Tissue) -> Iterator[np.ndarray]:
    """(X, Y, Z, n) int16 slabs of base * (1 + amplitude * fluctuation) + noise.

    fluctuation(t, x) = sum_k w_k(x) c_k(t) with smooth spatial weights w normalised to unit
    length per voxel and orthonormal time courses c: coherent, smooth patterns whose
    temporal std is exactly 1 everywhere.
    """
    courses = time_courses(rng, tissue.fluctuation_fields, frames)
    fields = smooth_fields(rng, courses.shape[1], base.shape, tissue.smoothness) if courses.shape[1] else \
        np.zeros((0,) + base.shape)
    fields /= np.maximum(np.sqrt((fields ** 2).sum(axis=0)), 1e-9)
    weighted = base * amplitude
    for t0 in range(0, frames, slab):
        fluct = np.tensordot(fields, courses[t0:t0 + slab], axes=([0], [1]))  # (X, Y, Z, n)
        out = base[..., None] + weighted[..., None] * fluct
        out += rng.normal(0.0, tissue.noise["epi"], out.shape)
        yield to_int16(out)


def synthesize_subject(out_dir: Path, subject: str, cls: str, rng: np.random.Generator,
                       t1_shape: tuple[int, int, int], fmri_shape: tuple[int, int, int], frames: int,
                       effect: PlantedEffect, tissue: Tissue, tr: float, compresslevel: int,
                       slab_frames: int) -> None:
    """Write ``sub-XXX/anat/*_T1w.nii.gz`` and ``sub-XXX/func/*_task-rest_bold.nii.gz``."""
    severity = effect.severity[cls] * effect.strength
    scale = 1.0 + tissue.size_jitter * rng.uniform(-1, 1)
    gain = 1.0 + tissue.gain_jitter * rng.uniform(-1, 1)

    t1 = _phantom(t1_shape, scale, tissue.t1, tissue) * gain
    t1[effect.mask(t1_shape)] *= 1.0 - severity
    t1 += rng.normal(0.0, tissue.noise["t1"], t1_shape)
    aff, zooms = _affine(t1_shape)
    anat = out_dir / subject / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    write_nifti_slabs(anat / f"{subject}_T1w.nii.gz", aff, t1_shape, np.int16, iter([to_int16(t1)[..., None]]),
                      zooms, compresslevel)

    base = _phantom(fmri_shape, scale, tissue.epi, tissue) * gain
    amplitude = np.full(fmri_shape, tissue.fluctuation)
    amplitude[effect.mask(fmri_shape)] *= 1.0 - severity
    aff, zooms = _affine(fmri_shape)
    func = out_dir / subject / "func"
    func.mkdir(parents=True, exist_ok=True)
    write_nifti_slabs(func / f"{subject}_task-rest_bold.nii.gz", aff, fmri_shape + (frames,), np.int16,
                      _fmri_slabs(rng, base, amplitude, frames, slab_frames, tissue), zooms + (tr,), compresslevel)


def write_cohort_tables(out: Path, rows: list[dict], name: str, generator: str, description: str) -> None:
    """The BIDS tables of a synthetic cohort: participants.tsv (``rows`` of participant_id,
    diagnosis) and dataset_description.json naming the ``generator`` module."""
    with (out / "participants.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["participant_id", "diagnosis"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": name, "BIDSVersion": "1.8.0", "DatasetType": "raw",
         "GeneratedBy": [{"Name": generator, "Description": description}]}, indent=1))


def synthesize_cohort(out_dir: str | Path, n_per_class: int | dict[str, int] = 12,
                      t1_shape: tuple[int, int, int] = (32, 32, 32), fmri_shape: tuple[int, int, int] = (16, 16, 16),
                      frames: int = 8, effect_region: tuple[tuple[float, float, float], float] | None = None,
                      effect_strength: float = 0.5, classes: tuple[str, ...] = DEFAULT_CLASSES, seed: int = 0,
                      severity: dict[str, float] | None = None, tr: float = 2.0, tissue: Tissue | None = None,
                      compresslevel: int = 6, slab_frames: int = 64, progress: bool = False) -> Path:
    """Write a phantom BIDS cohort and return its folder.

    ``n_per_class``: subjects per class (int: the same for all). ``effect_region``:
    ``(center, radius)`` in volume fractions (default ``((0.375, 0.375, 0.375), 0.1)``).
    ``severity``: class -> factor in [0, 1] (default NC 0, EMCI 1/3, LMCI 2/3, AD 1; classes
    not named get 0). Subjects are interleaved across classes; the same seed gives the same
    files. Writes participants.tsv (participant_id, diagnosis), dataset_description.json and
    planted_effect.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = n_per_class if isinstance(n_per_class, dict) else {c: n_per_class for c in classes}
    sev = {c: (severity or DEFAULT_SEVERITY).get(c, 0.0) for c in classes}
    center, radius = effect_region or (PlantedEffect.center, PlantedEffect.radius)
    effect = PlantedEffect(tuple(center), float(radius), float(effect_strength), sev)
    tissue = tissue or Tissue()
    order = [c for i in range(max(counts.values(), default=0)) for c in classes if i < counts.get(c, 0)]
    rows = []
    bar = tqdm(total=len(order), desc="synth", unit="subject", disable=not progress)
    for i, cls in enumerate(order):
        subject = f"sub-{i + 1:03d}"
        rng = np.random.default_rng([seed, i])
        synthesize_subject(out, subject, cls, rng, tuple(t1_shape), tuple(fmri_shape), frames, effect, tissue,
                           tr, compresslevel, slab_frames)
        rows.append({"participant_id": subject, "diagnosis": cls})
        bar.update()
    bar.close()
    write_cohort_tables(out, rows, "MASAN phantom cohort", "masan.synth.phantom", f"seed {seed}")
    (out / PLANTED_EFFECT_FILE).write_text(json.dumps(effect.record(), indent=1))
    return out
