"""Validation cohorts on a real brain: the MNI152 template with planted, graded AD-like effects.

:func:`synthesize_anatomy_cohort` writes the same BIDS layout as the phantom generator
(:mod:`masan.synth.phantom`) but every subject is the ICBM 2009a nonlinear symmetric MNI152
template (1 mm T1 and grey/white-matter probability maps, shipped inside nilearn's wheel:
nothing is downloaded) resampled onto the requested grids, with

- **the effect**, in named structures (:data:`STRUCTURES`: bilateral or midline ellipsoids
  at approximate published MNI coordinates) and graded by a per-subject severity
  ``s = clip(class severity + N(0, severity_sd), 0, 1)`` (class severity NC 0, EMCI 1/3,
  LMCI 2/3, AD 1), so neighbouring classes overlap while NC and AD separate:

  - T1: grey-matter atrophy. Inside a structure's mask (its ellipsoids intersected with
    GM probability > 0.2) the GM fraction loses ``strength_t1 * s`` of itself and that
    fraction becomes CSF: ``T1 += strength_t1 * s * GM * (I_csf - I_gm)``.
  - fMRI (``fmri_effect``): ``amplitude``: the fluctuation amplitude inside the structures
    is multiplied by ``1 - strength_fmri * s * occupancy``; ``connectivity``: the
    structures' shared signal ``s(t) = r p(t) + sqrt(1 - r^2) u(t)`` follows the partner
    network's time course ``p(t)`` with ``r = coupling * (1 - strength_fmri * s)``.
- **nuisance** (:class:`Nuisance`): per-subject gain, a smooth multiplicative bias field,
  Gaussian noise, and a rigid misregistration per subject and modality (the header keeps
  the nominal affine, as after an imperfect registration; the same for all frames).
- **geometry** (optional, :class:`masan.synth.deformation.Geometry`): each subject's own shape
  (a smooth warp of the template) and an unregistered head placement (the T1's rigid
  placement, the fMRI run's moved a little from it), applied to every map of the subject's
  anatomy; the header still keeps the nominal affine. Severities may also be drawn per
  modality, independently (``severity_sd=(t1, fmri)``). :mod:`masan.synth.presets` names
  the combinations (``easy``, ``adni-like``).

Grids (:func:`grid_affine`): isotropic voxels, the field of view is the template's brain
bounding box plus a margin, centred, with the voxel size chosen so that the box fills the
tightest axis (the other axes are padded). T1 and fMRI grids of proportional shapes (e.g.
the paper's 240x256x176 and 60x64x44) therefore cover the same field of view. Images are
written in RAS voxel order unless ``orientation`` says otherwise (e.g. ``"LAS"``).

Resampling (:func:`sample`): a map is first block-averaged and Gaussian-smoothed to the
target voxel size (the spread of a voxel-wide box: partial volume), then read at
the target voxel centres through one ``scipy.ndimage.affine_transform`` that also applies
the subject's misregistration (or, with a warp, ``map_coordinates`` at the mapped positions).

fMRI signal, per voxel x and frame t (fractions of the baseline)::

    bold(x, t) = base(x) * (1 + damp(x) * [a_net(x) sum_k w_k(x) c_k(t)
                                          + a_s occ_s(x) s(t) + a_p occ_p(x) p(t)]) + noise

``base`` is EPI-like (CSF bright, GM > WM) from the tissue maps, ``w_k`` smooth network
fields shared by the cohort (unit length per voxel), ``c_k``, ``p``, ``u`` orthonormal slow
time courses (:func:`masan.synth.phantom.time_courses`, so every voxel's temporal std is its
amplitude exactly), ``occ_s``/``occ_p`` the planted structures' / partner network's
occupancy of the voxel. ``planted_effect.json`` records all of it (see
:func:`synthesize_anatomy_cohort`); :mod:`masan.evaluate.oracle` reads it back.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage
from tqdm.auto import tqdm

from masan.convert.nifti import write_nifti_slabs
from masan.synth.deformation import (
    Geometry,
    SubjectTransform,
    draw_rigid,
    draw_warp,
    matrix_record,
    rms_length,
    second_placement,
    voxel_centers_mm,
)
from masan.synth.phantom import (
    DEFAULT_CLASSES,
    DEFAULT_SEVERITY,
    PLANTED_EFFECT_FILE,
    smooth_fields,
    time_courses,
    to_int16,
    write_cohort_tables,
)

ANATOMY = "mni152"
TEMPLATE_NAME = "ICBM 2009a nonlinear symmetric MNI152, 1 mm (nilearn's copy)"
_TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
FMRI_EFFECTS = ("amplitude", "connectivity")
DEFAULT_STRENGTH = (0.6, 0.7)
"""(T1, fMRI) effect at severity 1. Chosen so that at the default size (16 per class, T1
48x56x48, fMRI 12x14x12 x 16) a logistic regression on the planted features separates NC
from AD (>0.9) while the 4 classes overlap (about 0.65): see docs/validation-cohort.md."""
DEFAULT_STAGES = {"t1": (0.0, 1.0), "fmri": (0.0, 1.0)}
"""Per modality, the window ``(start, end)`` of disease severity over which its effect grows
from 0 to full (:func:`stage`). ``(0, 1)`` for both: one severity drives both modalities
alike, so the fMRI is a second, noisier measure of what the T1 shows. ``--stages`` sets the
order of the amyloid-cascade model (Jack et al., Lancet Neurol 2010; 2013), where synaptic
dysfunction (fMRI, FDG) becomes abnormal before atrophy (MRI): e.g. fMRI (0, 0.67), T1
(0.33, 1), so the early classes differ mostly in fMRI and the late ones mostly in T1."""
GM_THRESHOLD = 0.2
MODALITIES = ("t1", "fmri")
WARP_MARGIN_MM = 10.0
"""The warp's control grid spans the template brain plus this on every side."""
"""A structure's T1 effect mask is its ellipsoids intersected with GM probability > this."""


def stage(severity: float, window: Sequence[float]) -> float:
    """A modality's effect fraction at disease ``severity``: 0 before ``window[0]``, 1 after
    ``window[1]``, linear in between (a biomarker's rise along the disease course)."""
    start, end = float(window[0]), float(window[1])
    if end <= start:
        return float(severity >= start)
    return float(np.clip((severity - start) / (end - start), 0.0, 1.0))


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in MNI space: centre and semi-axes in mm."""

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]

    def contains(self, points_mm: np.ndarray) -> np.ndarray:
        """Boolean (...) for points (..., 3) in mm."""
        d = (points_mm - np.asarray(self.center_mm)) / np.asarray(self.radii_mm)
        return (d ** 2).sum(axis=-1) <= 1.0

    def record(self) -> dict:
        return {"center_mm": [float(c) for c in self.center_mm], "radii_mm": [float(r) for r in self.radii_mm]}


def _bilateral(center: tuple[float, float, float], radii: tuple[float, float, float]) -> tuple[Ellipsoid, ...]:
    x, y, z = center
    return Ellipsoid((-x, y, z), radii), Ellipsoid((x, y, z), radii)


STRUCTURES: dict[str, tuple[Ellipsoid, ...]] = {
    # Approximate MNI152 coordinates (mm) of commonly reported centres/peaks (Harvard-Oxford
    # and AAL centroids, DMN seeds of e.g. Fox et al. 2005 / Greicius et al. 2004); the
    # radii give roughly the structure's extent. Ellipsoids are axis-aligned, so they are a
    # coarse stand-in for the real shapes, good enough to plant and locate an effect.
    "hippocampus": _bilateral((26.0, -22.0, -13.0), (6.0, 15.0, 7.0)),
    "amygdala": _bilateral((23.0, -4.0, -18.0), (7.0, 7.0, 7.0)),
    "entorhinal": _bilateral((24.0, -10.0, -30.0), (6.0, 9.0, 6.0)),
    "posterior_cingulate": (Ellipsoid((0.0, -50.0, 28.0), (10.0, 12.0, 10.0)),),
    "precuneus": _bilateral((8.0, -62.0, 44.0), (7.0, 12.0, 10.0)),
    "thalamus": _bilateral((11.0, -18.0, 7.0), (7.0, 11.0, 7.0)),
    "caudate": _bilateral((13.0, 12.0, 10.0), (5.0, 10.0, 8.0)),
    "putamen": _bilateral((25.0, 2.0, 1.0), (5.0, 13.0, 8.0)),
    "medial_prefrontal": (Ellipsoid((0.0, 52.0, 2.0), (10.0, 12.0, 12.0)),),
    "angular": _bilateral((46.0, -66.0, 32.0), (8.0, 10.0, 10.0)),
}
"""Named structures: name -> ellipsoids (a bilateral pair, or one on the midline)."""

PARTNER_CHOICES = ("posterior_cingulate", "medial_prefrontal", "angular")
"""Default partner network of the planted structures: the first of these not planted
(hippocampus-PCC decoupling is the classic AD resting-state finding)."""


def ellipsoids_of(names: Sequence[str]) -> dict[str, tuple[Ellipsoid, ...]]:
    """Look up :data:`STRUCTURES`; ValueError naming the known ones."""
    bad = [n for n in names if n not in STRUCTURES]
    if bad:
        raise ValueError(f"unknown structures {bad}; known: {sorted(STRUCTURES)}")
    return {n: STRUCTURES[n] for n in names}


def ellipsoids_from_record(record: dict[str, list[dict]]) -> dict[str, tuple[Ellipsoid, ...]]:
    """Inverse of ``{name: [e.record() ...]}`` (the truth record's ``structures``/``partner``)."""
    return {name: tuple(Ellipsoid(tuple(e["center_mm"]), tuple(e["radii_mm"])) for e in items)
            for name, items in record.items()}


# ---------------------------------------------------------------------------------------------- template
@dataclass(frozen=True)
class Template:
    """The MNI152 maps on the template's 1 mm grid (cropped to the brain plus a margin).

    ``t1``: template intensities (0-255 scale), ``gm``/``wm``/``csf``: tissue probabilities
    in [0, 1] (CSF = brain - GM - WM), ``brain``: 0/1 mask (T1 > 0). All float32 (X, Y, Z);
    ``affine`` voxel -> MNI mm. ``i_gm``/``i_wm``/``i_csf``: mean T1 of nearly pure tissue.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    i_gm: float
    i_wm: float
    i_csf: float
    bbox_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    """Brain bounding box (low, high corners, mm, voxel edges included)."""


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI152 files (found without importing nilearn: it is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MNI152 cohort needs nilearn (pip install 'nilearn>=0.10'), "
                           "whose wheel ships the template")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: nilearn's bundled template files {missing} are missing; reinstall nilearn")
    return folder


@lru_cache(maxsize=1)
def load_template(margin_vox: int = 8) -> Template:
    """Load (once per process) the template maps, cropped to the brain + ``margin_vox``."""
    folder = template_dir()
    imgs = {k: nib.load(folder / f) for k, f in _TEMPLATE_FILES.items()}
    data = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in imgs.items()}
    affine = np.asarray(imgs["t1"].affine, dtype=np.float64)
    brain = (data["t1"] > 0).astype(np.float32)
    idx = np.argwhere(brain > 0)
    lo_v, hi_v = idx.min(axis=0), idx.max(axis=0)
    lo_c = np.maximum(lo_v - margin_vox, 0)
    hi_c = np.minimum(hi_v + margin_vox + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo_c, hi_c))
    shift = np.eye(4)
    shift[:3, 3] = lo_c
    gm = data["gm"][crop] / 255.0
    wm = data["wm"][crop] / 255.0
    brain = brain[crop]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    t1 = data["t1"][crop]
    zoom = np.abs(np.diag(affine)[:3])
    lo_mm = affine[:3, :3] @ lo_v + affine[:3, 3] - zoom / 2
    hi_mm = affine[:3, :3] @ hi_v + affine[:3, 3] + zoom / 2
    return Template(t1=np.ascontiguousarray(t1), gm=np.ascontiguousarray(gm), wm=np.ascontiguousarray(wm),
                    csf=np.ascontiguousarray(csf), brain=np.ascontiguousarray(brain), affine=affine @ shift,
                    i_gm=float(t1[gm > 0.8].mean()), i_wm=float(t1[wm > 0.9].mean()),
                    i_csf=float(t1[(csf > 0.8) & (brain > 0)].mean()),
                    bbox_mm=(tuple(float(v) for v in np.minimum(lo_mm, hi_mm)),
                             tuple(float(v) for v in np.maximum(lo_mm, hi_mm))))


def grid_affine(shape: Sequence[int], margin_mm: float = 4.0) -> np.ndarray:
    """(4, 4) voxel -> MNI mm affine of an isotropic RAS grid of ``shape`` whose field of view is
    the template's brain bounding box + ``margin_mm`` on every side, centred; the voxel size is
    the smallest that fits the box (it fills the tightest axis, the others are padded)."""
    lo, hi = (np.asarray(c) for c in load_template().bbox_mm)
    shape = np.asarray(shape, dtype=float)
    voxel = float(np.max((hi - lo + 2 * margin_mm) / shape))
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = (lo + hi) / 2 - voxel * (shape - 1) / 2
    return aff


def voxel_size(affine: np.ndarray) -> float:
    """Largest voxel edge (mm) of an affine."""
    return float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).max())


# ---------------------------------------------------------------------------------------------- resampling
def _prepare(volume: np.ndarray, affine: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Low-pass a 1 mm map for sampling at ``voxel_mm``: block-average by f = floor(voxel / 2)
    (at least 1), then Gaussian smoothing to the spread of a voxel-wide box (total variance
    voxel^2 / 12, as the block average's f^2 / 12): the map's value at a voxel centre is then
    about its mean over the voxel (partial volume), without aliasing."""
    f = max(1, int(voxel_mm // 2))
    if f > 1:
        pad = [(0, -n % f) for n in volume.shape]
        v = np.pad(volume, pad)
        s = v.shape
        volume = v.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)
        block = np.diag([f, f, f, 1.0]).astype(np.float64)
        block[:3, 3] = (f - 1) / 2
        affine = affine @ block
    sigma = math.sqrt(max(voxel_mm ** 2 - f ** 2, 0.0) / 12.0) / f
    if sigma > 0.2:
        volume = ndimage.gaussian_filter(volume, sigma, mode="constant", truncate=3.0)
    return np.ascontiguousarray(volume, dtype=np.float32), affine


_PREPARED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def prepared(key: tuple, voxel_mm: float, make=None) -> tuple[np.ndarray, np.ndarray]:
    """Cached :func:`_prepare` of a template map (``key = ("gm",)`` etc.) or of a derived map
    (``make()`` returns it on the template grid). Returns (volume, voxel -> mm affine)."""
    ck = (key, round(float(voxel_mm), 3))
    if ck not in _PREPARED:
        tpl = load_template()
        vol = getattr(tpl, key[0]) if make is None else make()
        if len(_PREPARED) > 64:
            _PREPARED.clear()
        _PREPARED[ck] = _prepare(vol, tpl.affine, voxel_mm)
    return _PREPARED[ck]


Motion = np.ndarray | SubjectTransform | None
"""Where a grid position (mm) finds the template (mm): None (nowhere else), a rigid (4, 4)
mm -> mm, or a :class:`masan.synth.deformation.SubjectTransform` (rigid, then a warp)."""


def sample(source: tuple[np.ndarray, np.ndarray], shape: Sequence[int], affine: np.ndarray,
           motion: Motion = None, order: int = 1) -> np.ndarray:
    """float32 ``shape`` array: ``source`` (volume, affine) read at the grid's voxel centres.

    ``motion`` maps a grid position to the template position shown there (the subject's
    placement and shape, :data:`Motion`); outside the source: 0.
    """
    vol, src_aff = source
    shape = tuple(int(n) for n in shape)
    if isinstance(motion, SubjectTransform):
        if motion.warp is not None:
            return _sample_warped(source, shape, affine, motion, order)
        motion = motion.rigid
    m = np.linalg.inv(src_aff) @ (np.eye(4) if motion is None else motion) @ np.asarray(affine, dtype=np.float64)
    return ndimage.affine_transform(vol, m[:3, :3], m[:3, 3], output_shape=shape,
                                    order=order, mode="constant", cval=0.0, output=np.float32)


def _sample_warped(source: tuple[np.ndarray, np.ndarray], shape: tuple[int, int, int], affine: np.ndarray,
                   motion: SubjectTransform, order: int) -> np.ndarray:
    """:func:`sample` through a warp: no affine shortcut, the positions a slab at a time."""
    vol, src_aff = source
    inv = np.linalg.inv(src_aff)
    out = np.empty(shape, dtype=np.float32)
    for start, stop in motion.slabs(shape):
        idx = motion.on_grid(shape, affine, start, stop) @ inv[:3, :3].T + inv[:3, 3]
        ndimage.map_coordinates(vol, np.moveaxis(idx, -1, 0), output=out[start:stop], order=order,
                                mode="constant", cval=0.0)
    return out


def indicator(ellipsoids: Sequence[Ellipsoid]) -> np.ndarray:
    """float32 0/1 union of the ellipsoids on the template's 1 mm grid."""
    tpl = load_template()
    out = np.zeros(tpl.brain.shape, dtype=np.float32)
    inv = np.linalg.inv(tpl.affine)
    for e in ellipsoids:
        c, r = np.asarray(e.center_mm), np.asarray(e.radii_mm)
        corners = np.stack([inv[:3, :3] @ (c + s * r) + inv[:3, 3] for s in (-1, 1)])
        lo = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, out.shape)
        hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, out.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        sub = np.eye(4)
        sub[:3, 3] = lo
        pts = voxel_centers_mm(hi - lo, tpl.affine @ sub)
        out[box] = np.maximum(out[box], e.contains(pts))
    return out


def _key(ellipsoids: Sequence[Ellipsoid]) -> tuple:
    return tuple((tuple(e.center_mm), tuple(e.radii_mm)) for e in ellipsoids)


def occupancy(ellipsoids: Sequence[Ellipsoid], shape: Sequence[int], affine: np.ndarray,
              motion: Motion = None) -> np.ndarray:
    """float32 ``shape``: fraction of each voxel inside the ellipsoids (partial volume, [0, 1])."""
    src = prepared(("occupancy", _key(ellipsoids)), voxel_size(affine), lambda: indicator(ellipsoids))
    return np.clip(sample(src, shape, affine, motion), 0.0, 1.0)


def gm_loss_map(ellipsoids: Sequence[Ellipsoid], threshold: float = GM_THRESHOLD) -> np.ndarray:
    """1 mm map of the GM that atrophies at full effect: GM x [inside the ellipsoids and GM > threshold]."""
    tpl = load_template()
    return indicator(ellipsoids) * (tpl.gm > threshold) * tpl.gm


def structure_masks(structures: dict[str, Sequence[Ellipsoid]], shape: Sequence[int], affine: np.ndarray,
                    modality: str = "t1", gm_threshold: float = GM_THRESHOLD, motion: Motion = None
                    ) -> dict[str, np.ndarray]:
    """Boolean ``shape`` mask per structure on any grid (``affine``: voxel -> MNI mm, or, with
    ``motion``, voxel -> the subject's grid mm; the masks then follow the subject's anatomy).

    A voxel is in when the structure's occupancy is at least half its maximum on this grid
    (so a small structure on a coarse fMRI grid still gets its best voxels), and, for
    ``modality="t1"``, the template's GM probability there exceeds ``gm_threshold``.
    """
    if modality not in ("t1", "fmri"):
        raise ValueError(f"modality must be 't1' or 'fmri', got {modality!r}")
    gm = sample(prepared(("gm",), voxel_size(affine)), shape, affine, motion) if modality == "t1" else None
    out = {}
    for name, ells in structures.items():
        occ = occupancy(tuple(ells), shape, affine, motion)
        mask = (occ >= 0.5 * occ.max()) & (occ > 0) if occ.max() > 0 else np.zeros(occ.shape, bool)
        out[name] = mask & (gm > gm_threshold) if gm is not None else mask
    return out


def region_counts(mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Planted voxels per region of the non-overlapping ``grid`` split (flat C order, as
    :mod:`masan.model.regions`; voxel i of an axis of n lies in cell ``i * G // n``)."""
    cells = [np.arange(n) * g // n for n, g in zip(mask.shape, grid)]
    counts = np.zeros(tuple(grid), dtype=np.int64)
    idx = np.nonzero(mask)
    np.add.at(counts, tuple(c[i] for c, i in zip(cells, idx)), 1)
    return counts.ravel()


def region_ranks(mask: np.ndarray, grid: Sequence[int]) -> list[int]:
    """Flat region indices holding planted voxels, most planted voxels first (ties: lower index)."""
    counts = region_counts(mask, grid)
    order = np.argsort(-counts, kind="stable")
    return [int(i) for i in order if counts[i] > 0]


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Nuisance:
    """What differs between subjects besides the disease (every real cohort has it)."""

    gain: float = 0.10
    """Per-subject scanner gain: x (1 + U(-gain, gain)), per modality."""
    bias: float = 0.10
    """Smooth multiplicative bias field, peak |deviation| (1 +- bias), per subject and modality."""
    bias_length: float = 0.35
    """Correlation length of the bias field, fraction of the field of view."""
    misregistration_mm: float = 3.0
    """Rigid misregistration per subject and modality: translation of length U(0, this) mm ..."""
    misregistration_deg: float = 3.0
    """... and rotation by U(0, this) degrees about a random axis through the brain centre."""
    t1_noise: float = 0.03
    """T1 Gaussian noise std, fraction of the WM intensity (inside the brain; skull-stripped)."""
    epi_noise: float = 0.01
    """EPI Gaussian noise std per frame, fraction of the GM baseline (tSNR ~100 in GM)."""


@dataclass(frozen=True)
class Signal:
    """Intensities (stored units) and the fMRI fluctuation model (fractions of baseline)."""

    t1_wm: float = 1000.0
    """The template's T1 is scaled so that white matter is this."""
    epi: dict = field(default_factory=lambda: {"csf": 1300.0, "gm": 900.0, "wm": 650.0})
    network_amplitude: dict = field(default_factory=lambda: {"gm": 0.015, "wm": 0.005, "csf": 0.008})
    """Temporal std of the network fluctuation, by tissue (fraction of baseline)."""
    networks: int = 3
    """Smooth spatial network fields shared by the cohort."""
    network_length: float = 0.15
    """Their correlation length, fraction of the field of view."""
    structure_amplitude: float = 0.03
    """Temporal std of the structures' shared signal s(t) (fully occupied voxel)."""
    partner_amplitude: float = 0.03
    """Temporal std of the partner network's signal p(t)."""
    coupling: float = 0.8
    """corr(s, p) at severity 0."""


def _severities(rng: np.random.Generator, severity: float, sd: float | Sequence[float]
                ) -> tuple[dict[str, float], float | dict[str, float]]:
    """A subject's severity per modality, ``clip(severity + N(0, sd), 0, 1)``, and its record:
    one draw for both modalities (``sd`` a number) or one per modality (``sd`` = (t1, fmri))."""
    def draw(spread: float) -> float:
        return float(np.clip(severity + rng.normal(0.0, spread), 0.0, 1.0))

    if np.isscalar(sd):
        s = draw(sd)
        return {m: s for m in MODALITIES}, round(s, 6)
    drawn = {m: draw(spread) for m, spread in zip(MODALITIES, sd)}
    return drawn, {m: round(v, 6) for m, v in drawn.items()}


@lru_cache(maxsize=1)
def _warp_frame() -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(the warp's control box: template brain box + :data:`WARP_MARGIN_MM`, (N, 3) mm points of
    the template brain on a 4 mm lattice, where a warp's mean and RMS are taken)."""
    tpl = load_template()
    lo, hi = (np.asarray(c) for c in tpl.bbox_mm)
    idx = np.argwhere(tpl.brain[::4, ::4, ::4] > 0) * 4
    return (lo - WARP_MARGIN_MM, hi + WARP_MARGIN_MM), idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float, length: float) -> np.ndarray:
    """1 + amplitude * f, f a smooth field with max |f| = 1, made on a <= 16^3 grid and zoomed up."""
    coarse = tuple(min(n, 16) for n in shape)
    f = smooth_fields(rng, 1, coarse, length)[0]
    f /= max(np.abs(f).max(), 1e-9)
    if coarse != shape:
        f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse)], order=1, mode="nearest", grid_mode=True)
    return (1.0 + amplitude * f).astype(np.float32)


def _orientation(code: str, shape: tuple[int, int, int]) -> tuple[np.ndarray | None, np.ndarray]:
    """(ornt transform from RAS to ``code`` or None, affine correction for the reoriented array)."""
    if code.upper() == "RAS":
        return None, np.eye(4)
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(code.upper())))
    return ornt, inv_ornt_aff(ornt, shape)


@dataclass
class _Grid:
    """One modality's grid and what every subject needs on it."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray | None
    file_affine: np.ndarray
    file_shape: tuple[int, int, int]
    zooms: tuple[float, float, float]

    @classmethod
    def make(cls, shape: Sequence[int], orientation: str) -> "_Grid":
        shape = tuple(int(n) for n in shape)
        aff = grid_affine(shape)
        ornt, fix = _orientation(orientation, shape)
        file_shape = shape if ornt is None else tuple(int(shape[int(a)]) for a in ornt[:, 0].argsort())
        v = voxel_size(aff)
        return cls(shape, aff, ornt, aff @ fix, file_shape, (v, v, v))

    def orient(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.ornt is None else np.ascontiguousarray(apply_orientation(arr, self.ornt))


def _bold_slabs(rng: np.random.Generator, base: np.ndarray, fields: np.ndarray, courses: np.ndarray,
                occ_s: np.ndarray, occ_p: np.ndarray, damp: np.ndarray, r: float, signal: Signal,
                noise_sd: float, slope: float, frames: int, slab: int, grid: _Grid) -> Iterator[np.ndarray]:
    """(X, Y, Z, n) int16 stored-value slabs of the run (see the module docstring's formula).

    ``fields`` (K, X, Y, Z) already carry the per-voxel network amplitude; ``courses``
    (frames, K + 2) are [p, u, c_1..c_K]. Memory: one slab.
    """
    f32 = np.float32
    courses = courses.astype(f32)
    p, u, net = courses[:, 0], courses[:, 1], courses[:, 2:]
    s = f32(r) * p + f32(math.sqrt(max(1.0 - r * r, 0.0))) * u
    ws = (f32(signal.structure_amplitude) * occ_s).astype(f32)[..., None]
    wp = (f32(signal.partner_amplitude) * occ_p).astype(f32)[..., None]
    gain = (base * damp).astype(f32)[..., None] / f32(slope)  # stored units per unit fluctuation
    offset = base.astype(f32)[..., None] / f32(slope)
    for t0 in range(0, frames, slab):
        t1 = min(t0 + slab, frames)
        fl = np.tensordot(fields, net[t0:t1], axes=([0], [1])) if fields.shape[0] else f32(0.0)
        fl = fl + ws * s[t0:t1] + wp * p[t0:t1]
        out = rng.standard_normal(offset.shape[:3] + (t1 - t0,), dtype=f32)
        out *= f32(noise_sd / slope)
        out += offset
        out += gain * fl
        yield grid.orient(to_int16(out))


def synthesize_anatomy_cohort(
        out_dir: str | Path, n_per_class: int | dict[str, int] = 16,
        t1_shape: tuple[int, int, int] = (48, 56, 48), fmri_shape: tuple[int, int, int] = (12, 14, 12),
        frames: int = 16, structures: Sequence[str] = ("hippocampus", "amygdala"),
        fmri_effect: Sequence[str] = FMRI_EFFECTS, strength: float | tuple[float, float] = DEFAULT_STRENGTH,
        seed: int = 0, progress: bool = False, classes: Sequence[str] = DEFAULT_CLASSES,
        severity: dict[str, float] | None = None, severity_sd: float | tuple[float, float] = 0.15,
        partner: str | None = None, stages: dict[str, Sequence[float]] | None = None,
        nuisance: Nuisance | None = None, signal: Signal | None = None, tr: float = 2.0,
        orientation: str = "RAS", compresslevel: int = 6, slab_frames: int = 64,
        geometry: Geometry | None = None) -> Path:
    """Write an MNI152-based BIDS cohort with planted effects and return its folder.

    Shapes are RAS voxel counts (X, Y, Z); ``frames`` fMRI frames per run, TR ``tr`` s.
    ``structures``: names in :data:`STRUCTURES` carrying the effect. ``fmri_effect``: any of
    ``amplitude``, ``connectivity`` (empty: T1 effect only). ``strength``: effect at
    severity 1, one number for both modalities or ``(t1, fmri)``: the GM fraction lost, the
    fraction of fluctuation amplitude lost and of the coupling lost. ``severity``: class ->
    severity (default NC 0, EMCI 1/3, LMCI 2/3, AD 1); each subject draws
    ``clip(severity + N(0, severity_sd), 0, 1)``; ``severity_sd=(t1, fmri)`` draws one severity
    per modality, independently, each with its own spread. ``stages``: per modality (``t1``, ``fmri``)
    the severity window over which its effect rises (:data:`DEFAULT_STAGES`, :func:`stage`);
    the strength multiplies the staged severity. ``partner``: the network the structures
    are coupled to (default: first of :data:`PARTNER_CHOICES` not planted).
    ``geometry`` (:class:`masan.synth.deformation.Geometry`; None: each modality gets its own
    rigid misregistration and no warp): each subject gets a smooth warp, its T1 the head
    placement drawn from ``nuisance``'s misregistration, its fMRI that placement moved by a
    small offset; every map of the subject's anatomy (T1, tissue, occupancies, effect) is
    read through them (:func:`sample`).
    ``orientation``: voxel axis codes of the written files (``RAS``, ``LAS``, ``PSR``...).
    Subjects are interleaved across classes (sub-001 NC, sub-002 EMCI, ...); the same
    arguments give the same files.

    Writes ``sub-XXX/anat/sub-XXX_T1w.nii.gz`` (int16), ``sub-XXX/func/sub-XXX_task-rest_bold.nii.gz``
    (int16 with ``scl_slope``, written ``slab_frames`` frames at a time), participants.tsv
    (participant_id, diagnosis), dataset_description.json and planted_effect.json: the
    truth record, keys ``anatomy`` ("mni152"), ``template``, ``structures`` and ``partner``
    ({name: [{center_mm, radii_mm}, ...]}), ``gm_threshold``, ``severity``, ``severity_sd``
    (``{t1, fmri}`` when per modality), ``strength_t1``, ``strength_fmri``, ``fmri_effect``,
    ``subject_severity`` ({subject: s}, or {subject: {t1, fmri}}), ``subject_nuisance``
    ({subject: {t1: {gain, bias_range, motion}, fmri: {...}}}; with ``geometry`` each
    ``motion`` also holds its ``matrix`` (4x4, grid mm -> head frame mm), the fMRI's its
    ``offset`` from the T1's, and the subject a ``warp``: :meth:`Warp.record` and its
    ``rms_mm``), ``geometry`` (when given), ``nuisance``, ``signal``, ``grids`` (shape and
    affine per modality as written), ``region_ranks`` ({t1|fmri: {"4x4x4": [...], "2x2x2":
    [...]}} on the written grids) and ``effect`` (the formulas in words).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = tuple(classes)
    counts = n_per_class if isinstance(n_per_class, dict) else {c: int(n_per_class) for c in classes}
    sev = {c: float((severity or DEFAULT_SEVERITY).get(c, 0.0)) for c in classes}
    per_modality = not np.isscalar(severity_sd)
    if per_modality and len(severity_sd) != 2:
        raise ValueError(f"severity_sd is {severity_sd}; give one spread or two (t1, fmri)")
    k_t1, k_f = (float(strength), float(strength)) if np.isscalar(strength) else tuple(map(float, strength))
    stages = {m: tuple(map(float, (stages or {}).get(m, w))) for m, w in DEFAULT_STAGES.items()}
    for m, (a, b) in stages.items():
        if not (0.0 <= a <= b <= 1.0):
            raise ValueError(f"stage window for {m} is ({a}, {b}); give 0 <= start <= end <= 1")
    fmri_effect = tuple(fmri_effect)
    bad = set(fmri_effect) - set(FMRI_EFFECTS)
    if bad:
        raise ValueError(f"fmri_effect {sorted(bad)} unknown; choose from {FMRI_EFFECTS}")
    planted = ellipsoids_of(list(structures))
    if not planted:
        raise ValueError("name at least one structure to plant the effect in")
    partner = partner or next(n for n in PARTNER_CHOICES if n not in planted)
    if partner in planted:
        raise ValueError(f"partner network {partner!r} is also a planted structure; pick another")
    partner_ells = ellipsoids_of([partner])[partner]
    nuisance, signal = nuisance or Nuisance(), signal or Signal()
    if frames < 1:
        raise ValueError("frames must be >= 1")

    tpl = load_template()
    t1g, fg = _Grid.make(t1_shape, orientation), _Grid.make(fmri_shape, orientation)
    all_planted = tuple(e for ells in planted.values() for e in ells)
    center = (np.asarray(tpl.bbox_mm[0]) + np.asarray(tpl.bbox_mm[1])) / 2
    t1_scale = signal.t1_wm / tpl.i_wm
    contrast = (tpl.i_csf - tpl.i_gm) * t1_scale
    vt, vf = voxel_size(t1g.affine), voxel_size(fg.affine)
    loss_key = ("gm_loss", _key(all_planted))
    src = {"t1": prepared(("t1",), vt), "brain_t1": prepared(("brain",), vt),
           "loss_t1": prepared(loss_key, vt, lambda: gm_loss_map(all_planted)),
           "loss_f": prepared(loss_key, vf, lambda: gm_loss_map(all_planted)),
           **{k: prepared((k,), vf) for k in ("gm", "wm", "csf")}}
    occ_src = {"s": prepared(("occupancy", _key(all_planted)), vf, lambda: indicator(all_planted)),
               "p": prepared(("occupancy", _key(partner_ells)), vf, lambda: indicator(partner_ells))}
    cohort_rng = np.random.default_rng([seed, 1 << 20])
    k_fields = signal.networks
    fields = smooth_fields(cohort_rng, k_fields, fg.shape, signal.network_length) if k_fields else \
        np.zeros((0,) + fg.shape)
    fields /= np.maximum(np.sqrt((fields ** 2).sum(axis=0)), 1e-9)
    fields = fields.astype(np.float32)

    order = [c for i in range(max(counts.values(), default=0)) for c in classes if i < counts.get(c, 0)]
    rows, subject_sev, subject_nui = [], {}, {}
    bar = tqdm(total=len(order), desc="synth mni152", unit="subject", disable=not progress)
    for i, cls in enumerate(order):
        subject = f"sub-{i + 1:03d}"
        rng = np.random.default_rng([seed, i])
        drawn, subject_sev[subject] = _severities(rng, sev[cls], severity_sd)
        s_t1, s_f = stage(drawn["t1"], stages["t1"]), stage(drawn["fmri"], stages["fmri"])
        rec = {}
        warp = None
        if geometry is not None and geometry.warp_rms_mm > 0:
            box, brain_pts = _warp_frame()
            warp = draw_warp(rng, geometry.warp_rms_mm, box, geometry.warp_control_points, brain_pts)
            rec["warp"] = {**warp.record(), "rms_mm": round(rms_length(warp, brain_pts), 4)}

        # ---- T1: template + GM -> CSF in the planted structures, gain, bias, noise, misregistration
        gain = 1.0 + rng.uniform(-nuisance.gain, nuisance.gain)
        motion, mrec = draw_rigid(rng, nuisance.misregistration_mm, nuisance.misregistration_deg, center)
        head = motion
        if geometry is not None:
            mrec["matrix"] = matrix_record(head)
            motion = SubjectTransform(head, warp)
        bias = _bias_field(rng, t1g.shape, nuisance.bias, nuisance.bias_length)
        img = sample(src["t1"], t1g.shape, t1g.affine, motion)
        img *= t1_scale
        img += (k_t1 * s_t1 * contrast) * sample(src["loss_t1"], t1g.shape, t1g.affine, motion)
        img *= gain * bias
        inside = sample(src["brain_t1"], t1g.shape, t1g.affine, motion) > 0.02
        img[inside] += rng.normal(0.0, nuisance.t1_noise * signal.t1_wm, int(inside.sum())).astype(np.float32)
        rec["t1"] = {"gain": round(gain, 6), "bias_range": [round(float(bias.min()), 4), round(float(bias.max()), 4)],
                     "motion": mrec}
        anat = out / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        write_nifti_slabs(anat / f"{subject}_T1w.nii.gz", t1g.file_affine, t1g.file_shape, np.int16,
                          iter([t1g.orient(to_int16(img)[..., None])]), t1g.zooms, compresslevel)
        del img, bias, inside

        # ---- fMRI: EPI baseline from (atrophied) tissue maps, fluctuations, effect, nuisance
        gain = 1.0 + rng.uniform(-nuisance.gain, nuisance.gain)
        if geometry is None:
            motion, mrec = draw_rigid(rng, nuisance.misregistration_mm, nuisance.misregistration_deg, center)
        else:
            motion, mrec = second_placement(rng, geometry, head, warp, center)
        bias = _bias_field(rng, fg.shape, nuisance.bias, nuisance.bias_length)
        tissue = {k: sample(src[k], fg.shape, fg.affine, motion) for k in ("gm", "wm", "csf")}
        loss = (k_t1 * s_t1) * sample(src["loss_f"], fg.shape, fg.affine, motion)
        tissue["gm"] -= loss
        tissue["csf"] += loss
        base = sum(signal.epi[k] * tissue[k] for k in tissue) * (gain * bias)
        amp = sum(signal.network_amplitude[k] * tissue[k] for k in tissue)
        occ_s = np.clip(sample(occ_src["s"], fg.shape, fg.affine, motion), 0, 1)
        occ_p = np.clip(sample(occ_src["p"], fg.shape, fg.affine, motion), 0, 1)
        damp = 1.0 - k_f * s_f * occ_s if "amplitude" in fmri_effect else np.ones_like(occ_s)
        r = signal.coupling * (1.0 - (k_f * s_f if "connectivity" in fmri_effect else 0.0))
        courses = time_courses(rng, k_fields + 2, frames)
        courses = np.pad(courses, ((0, 0), (0, k_fields + 2 - courses.shape[1])))
        noise_sd = nuisance.epi_noise * signal.epi["gm"]
        slope = float((base.max() * 1.5 + 6 * noise_sd) / 32000.0)
        rec["fmri"] = {"gain": round(gain, 6), "bias_range": [round(float(bias.min()), 4),
                                                               round(float(bias.max()), 4)],
                       "motion": mrec, "coupling": round(r, 6), "scl_slope": slope}
        subject_nui[subject] = rec
        func = out / subject / "func"
        func.mkdir(parents=True, exist_ok=True)
        write_nifti_slabs(func / f"{subject}_task-rest_bold.nii.gz", fg.file_affine, fg.file_shape + (frames,),
                          np.int16, _bold_slabs(rng, base, fields * amp, courses, occ_s, occ_p, damp, r, signal,
                                                noise_sd, slope, frames, slab_frames, fg),
                          fg.zooms + (tr,), compresslevel, scl_slope=slope)
        rows.append({"participant_id": subject, "diagnosis": cls})
        bar.update()
    bar.close()

    write_cohort_tables(out, rows, "MASAN MNI152 validation cohort", "masan.synth.anatomy",
                        f"seed {seed}; template {TEMPLATE_NAME}")
    planted_rec = {n: [e.record() for e in ells] for n, ells in planted.items()}
    ranks = {}
    for mod, g in (("t1", t1g), ("fmri", fg)):
        masks = structure_masks(planted, g.shape, g.affine, mod)
        union = g.orient(np.logical_or.reduce(list(masks.values()))[..., None])[..., 0]
        ranks[mod] = {"x".join(map(str, gr)): region_ranks(union, gr) for gr in ((4, 4, 4), (2, 2, 2))}
    record = {
        "anatomy": ANATOMY, "template": TEMPLATE_NAME,
        "structures": planted_rec, "partner": {partner: [e.record() for e in partner_ells]},
        "gm_threshold": GM_THRESHOLD, "severity": sev,
        "severity_sd": dict(zip(MODALITIES, map(float, severity_sd))) if per_modality else severity_sd,
        "strength_t1": k_t1, "strength_fmri": k_f, "stages": {m: list(w) for m, w in stages.items()},
        "fmri_effect": list(fmri_effect),
        "subject_severity": subject_sev, "subject_nuisance": subject_nui,
        **({"geometry": asdict(geometry)} if geometry is not None else {}),
        "nuisance": asdict(nuisance), "signal": asdict(signal), "seed": seed, "tr_seconds": tr,
        "orientation": orientation.upper(),
        "grids": {"t1": {"shape": list(t1g.file_shape), "affine": t1g.file_affine.tolist()},
                  "fmri": {"shape": list(fg.file_shape), "affine": fg.file_affine.tolist()}},
        "region_ranks": ranks,
        "effect": {
            "severity": "subject severity = clip(class severity + N(0, severity_sd), 0, 1); each modality "
                        "takes stage(severity, stages[modality]) = clip((severity - start) / (end - start), 0, 1) "
                        "(called severity below)",
            "t1": "GM fraction x (1 - strength_t1 * severity) inside each structure's ellipsoids with "
                  "GM > gm_threshold, the lost fraction becoming CSF (T1 moves towards CSF intensity)",
            "fmri_amplitude": "fluctuation amplitude x (1 - strength_fmri * severity * occupancy) in the structures",
            "fmri_connectivity": "corr(structure signal, partner signal) = coupling * (1 - strength_fmri * severity)",
            "units": "centres/radii in MNI152 mm; masks via masan.evaluate.oracle.planted_masks"},
    }
    if geometry is not None:
        record["effect"]["geometry"] = (
            "grid position g (mm, the written grid) shows template position A g + d(A g): A = "
            "subject_nuisance[subject][modality].motion.matrix (head placement), d = subject_nuisance[subject]."
            "warp (cubic interpolating spline through its control displacements); "
            "masan.synth.deformation.transform_from_record")
    (out / PLANTED_EFFECT_FILE).write_text(json.dumps(record, indent=1))
    return out
