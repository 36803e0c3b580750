"""Validation cohorts on a real brain: the MNI152 template with planted, graded AD-like effects.

:func:`synthesize_anatomy_cohort` writes the same BIDS layout as the phantom generator
(:mod:`masan.synth.phantom`) but every subject is the ICBM 2009a nonlinear symmetric MNI152
template (1 mm T1 and grey/white-matter probability maps, shipped inside nilearn's wheel:
nothing is downloaded) resampled onto the requested grids, with

- **the effect**, in named structures (:data:`masan.synth.structures.STRUCTURES`: bilateral or midline ellipsoids
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

Grids and resampling: :mod:`masan.convert.template` (``grid_affine``: the template's brain box,
isotropic voxels, so T1 and fMRI grids of proportional shapes cover the same field of view;
``prepared`` + ``sample``: partial-volume sampling), read through each subject's placement and
shape with :func:`masan.synth.deformation.sample_through`. Images are written in RAS voxel
order unless ``orientation`` says otherwise (e.g. ``"LAS"``). Where the effect is planted:
:mod:`masan.synth.structures`.

fMRI signal: :mod:`masan.synth.bold`. ``planted_effect.json`` records all of it (see
:func:`synthesize_anatomy_cohort`); :mod:`masan.evaluate.oracle` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage
from tqdm.auto import tqdm

from masan.convert.nifti import write_nifti_slabs
from masan.convert.template import TEMPLATE_NAME, grid_affine, load_template, prepared, voxel_size
from masan.synth.bold import Signal, bold_slabs
from masan.synth.deformation import (
    Geometry,
    SubjectTransform,
    draw_rigid,
    draw_warp,
    matrix_record,
    rms_length,
    sample_through,
    second_placement,
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
from masan.synth.structures import (
    GM_THRESHOLD,
    PARTNER_CHOICES,
    Ellipsoid,
    cache_key,
    ellipsoids_of,
    gm_loss_map,
    indicator,
    region_ranks,
    structure_masks,
)

ANATOMY = "mni152"
FMRI_EFFECTS = ("amplitude", "connectivity")
DEFAULT_STRENGTH = (0.6, 0.7)
"""(T1, fMRI) effect at severity 1. Chosen so that at the default size (16 per class, T1
48x56x48, fMRI 12x14x12 x 16) a logistic regression on the planted features separates NC
from AD nearly perfectly while the 4 classes overlap: the oracle accuracies are in
docs/validation-cohort.md, "Measured"."""
DEFAULT_STAGES = {"t1": (0.0, 1.0), "fmri": (0.0, 1.0)}
"""Per modality, the window ``(start, end)`` of disease severity over which its effect grows
from 0 to full (:func:`stage`). ``(0, 1)`` for both: one severity drives both modalities
alike, so the fMRI is a second, noisier measure of what the T1 shows. ``--stages`` sets the
order of the amyloid-cascade model (Jack et al., Lancet Neurol 2010; 2013), where synaptic
dysfunction (fMRI, FDG) becomes abnormal before atrophy (MRI): e.g. fMRI (0, 0.67), T1
(0.33, 1), so the early classes differ mostly in fMRI and the late ones mostly in T1."""
MODALITIES = ("t1", "fmri")
WARP_MARGIN_MM = 10.0
"""The warp's control grid spans the template brain plus this on every side."""


def stage(severity: float, window: Sequence[float]) -> float:
    """A modality's effect fraction at disease ``severity``: 0 before ``window[0]``, 1 after
    ``window[1]``, linear in between (a biomarker's rise along the disease course)."""
    start, end = float(window[0]), float(window[1])
    if end <= start:
        return float(severity >= start)
    return float(np.clip((severity - start) / (end - start), 0.0, 1.0))


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


@dataclass(frozen=True)
class _Effect:
    """The planted effect as :func:`synthesize_anatomy_cohort`'s arguments ask for it, checked."""

    severity: dict[str, float]
    """class -> severity before the subject's spread."""
    severity_sd: float | Sequence[float]
    strength: tuple[float, float]
    """(T1, fMRI) effect at severity 1."""
    stages: dict[str, tuple[float, ...]]
    fmri_effect: tuple[str, ...]
    planted: dict[str, tuple[Ellipsoid, ...]]
    partner: str
    partner_ells: tuple[Ellipsoid, ...]

    @classmethod
    def check(cls, classes: tuple[str, ...], severity: dict[str, float] | None, severity_sd: float | Sequence[float],
              strength: float | tuple[float, float], stages: dict[str, Sequence[float]] | None,
              fmri_effect: Sequence[str], structures: Sequence[str], partner: str | None) -> _Effect:
        """ValueError naming the argument for a spread, window, effect or structure that does not fit."""
        sev = {c: float((severity or DEFAULT_SEVERITY).get(c, 0.0)) for c in classes}
        if not np.isscalar(severity_sd) and len(severity_sd) != 2:
            raise ValueError(f"severity_sd is {severity_sd}; give one spread or two (t1, fmri)")
        k_t1, k_f = (float(strength), float(strength)) if np.isscalar(strength) else tuple(map(float, strength))
        windows = {m: tuple(map(float, (stages or {}).get(m, w))) for m, w in DEFAULT_STAGES.items()}
        for m, (a, b) in windows.items():
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
        return cls(sev, severity_sd, (k_t1, k_f), windows, fmri_effect, planted, partner,
                   ellipsoids_of([partner])[partner])

    @property
    def per_modality(self) -> bool:
        """Whether each subject draws one severity per modality."""
        return not np.isscalar(self.severity_sd)


@dataclass
class _Maps:
    """What every subject of a cohort shares: the two grids, the template maps prepared for them
    (volume, affine pairs), the T1 intensity scale and contrast, the network fields (K, X, Y, Z)."""

    t1g: _Grid
    fg: _Grid
    center: np.ndarray
    t1_scale: float
    contrast: float
    src: dict[str, tuple[np.ndarray, np.ndarray]]
    fields: np.ndarray

    @classmethod
    def make(cls, effect: _Effect, t1_shape: Sequence[int], fmri_shape: Sequence[int], orientation: str,
             signal: Signal, seed: int) -> _Maps:
        tpl = load_template()
        t1g, fg = _Grid.make(t1_shape, orientation), _Grid.make(fmri_shape, orientation)
        all_planted = tuple(e for ells in effect.planted.values() for e in ells)
        t1_scale = signal.t1_wm / tpl.i_wm
        vt, vf = voxel_size(t1g.affine), voxel_size(fg.affine)
        loss_key = ("gm_loss", cache_key(all_planted))
        src = {"t1": prepared(("t1",), vt), "brain_t1": prepared(("brain",), vt),
               "loss_t1": prepared(loss_key, vt, lambda: gm_loss_map(all_planted)),
               "loss_f": prepared(loss_key, vf, lambda: gm_loss_map(all_planted)),
               **{k: prepared((k,), vf) for k in ("gm", "wm", "csf")},
               "occ_s": prepared(("occupancy", cache_key(all_planted)), vf, lambda: indicator(all_planted)),
               "occ_p": prepared(("occupancy", cache_key(effect.partner_ells)), vf,
                                 lambda: indicator(effect.partner_ells))}
        k_fields = signal.networks
        fields = smooth_fields(np.random.default_rng([seed, 1 << 20]), k_fields, fg.shape, signal.network_length) \
            if k_fields else np.zeros((0,) + fg.shape)
        fields /= np.maximum(np.sqrt((fields ** 2).sum(axis=0)), 1e-9)
        return cls(t1g, fg, (np.asarray(tpl.bbox_mm[0]) + np.asarray(tpl.bbox_mm[1])) / 2, t1_scale,
                   (tpl.i_csf - tpl.i_gm) * t1_scale, src, fields.astype(np.float32))


@dataclass
class _Writer:
    """Writes a cohort's subjects (:meth:`subject`) and its truth record (:meth:`record`)."""

    out: Path
    effect: _Effect
    maps: _Maps
    nuisance: Nuisance
    signal: Signal
    geometry: Geometry | None
    frames: int
    tr: float
    orientation: str
    compresslevel: int
    slab_frames: int

    def subject(self, subject: str, rng: np.random.Generator, drawn: dict[str, float]) -> dict:
        """Write the subject's T1 and fMRI at severities ``drawn`` ({t1, fmri}); returns its
        ``subject_nuisance`` record. ``rng`` is the subject's own: its draws come in a fixed order."""
        s_t1, s_f = (stage(drawn[m], self.effect.stages[m]) for m in MODALITIES)
        rec, warp = {}, None
        if self.geometry is not None and self.geometry.warp_rms_mm > 0:
            box, brain_pts = _warp_frame()
            warp = draw_warp(rng, self.geometry.warp_rms_mm, box, self.geometry.warp_control_points, brain_pts)
            rec["warp"] = {**warp.record(), "rms_mm": round(rms_length(warp, brain_pts), 4)}
        head, rec["t1"] = self._t1(subject, rng, s_t1, warp)
        rec["fmri"] = self._fmri(subject, rng, s_t1, s_f, head, warp)
        return rec

    def _t1(self, subject: str, rng: np.random.Generator, s_t1: float, warp) -> tuple[np.ndarray, dict]:
        """Template + GM -> CSF in the planted structures, gain, bias, noise, misregistration.
        Returns (the head placement (4, 4), the T1's nuisance record)."""
        m, nui, g = self.maps, self.nuisance, self.maps.t1g
        gain = 1.0 + rng.uniform(-nui.gain, nui.gain)
        motion, mrec = draw_rigid(rng, nui.misregistration_mm, nui.misregistration_deg, m.center)
        head = motion
        if self.geometry is not None:
            mrec["matrix"] = matrix_record(head)
            motion = SubjectTransform(head, warp)
        bias = _bias_field(rng, g.shape, nui.bias, nui.bias_length)
        img = sample_through(m.src["t1"], g.shape, g.affine, motion)
        img *= m.t1_scale
        img += (self.effect.strength[0] * s_t1 * m.contrast) * sample_through(m.src["loss_t1"], g.shape, g.affine,
                                                                             motion)
        img *= gain * bias
        inside = sample_through(m.src["brain_t1"], g.shape, g.affine, motion) > 0.02
        img[inside] += rng.normal(0.0, nui.t1_noise * self.signal.t1_wm, int(inside.sum())).astype(np.float32)
        anat = self.out / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        write_nifti_slabs(anat / f"{subject}_T1w.nii.gz", g.file_affine, g.file_shape, np.int16,
                          iter([g.orient(to_int16(img)[..., None])]), g.zooms, self.compresslevel)
        return head, {"gain": round(gain, 6), "bias_range": [round(float(bias.min()), 4), round(float(bias.max()), 4)],
                      "motion": mrec}

    def _fmri(self, subject: str, rng: np.random.Generator, s_t1: float, s_f: float, head: np.ndarray,
              warp) -> dict:
        """EPI baseline from the (atrophied) tissue maps, fluctuations, effect, nuisance; returns
        the run's nuisance record."""
        m, nui, sig, g = self.maps, self.nuisance, self.signal, self.maps.fg
        k_t1, k_f = self.effect.strength
        gain = 1.0 + rng.uniform(-nui.gain, nui.gain)
        if self.geometry is None:
            motion, mrec = draw_rigid(rng, nui.misregistration_mm, nui.misregistration_deg, m.center)
        else:
            motion, mrec = second_placement(rng, self.geometry, head, warp, m.center)
        bias = _bias_field(rng, g.shape, nui.bias, nui.bias_length)
        tissue = {k: sample_through(m.src[k], g.shape, g.affine, motion) for k in ("gm", "wm", "csf")}
        loss = (k_t1 * s_t1) * sample_through(m.src["loss_f"], g.shape, g.affine, motion)
        tissue["gm"] -= loss
        tissue["csf"] += loss
        base = sum(sig.epi[k] * tissue[k] for k in tissue) * (gain * bias)
        amp = sum(sig.network_amplitude[k] * tissue[k] for k in tissue)
        occ_s, occ_p = (np.clip(sample_through(m.src[k], g.shape, g.affine, motion), 0, 1) for k in ("occ_s", "occ_p"))
        damp = 1.0 - k_f * s_f * occ_s if "amplitude" in self.effect.fmri_effect else np.ones_like(occ_s)
        r = sig.coupling * (1.0 - (k_f * s_f if "connectivity" in self.effect.fmri_effect else 0.0))
        courses = time_courses(rng, sig.networks + 2, self.frames)
        courses = np.pad(courses, ((0, 0), (0, sig.networks + 2 - courses.shape[1])))
        noise_sd = nui.epi_noise * sig.epi["gm"]
        slope = float((base.max() * 1.5 + 6 * noise_sd) / 32000.0)
        rec = {"gain": round(gain, 6), "bias_range": [round(float(bias.min()), 4), round(float(bias.max()), 4)],
               "motion": mrec, "coupling": round(r, 6), "scl_slope": slope}
        func = self.out / subject / "func"
        func.mkdir(parents=True, exist_ok=True)
        write_nifti_slabs(func / f"{subject}_task-rest_bold.nii.gz", g.file_affine, g.file_shape + (self.frames,),
                          np.int16, bold_slabs(rng, base, m.fields * amp, courses, occ_s, occ_p, damp, r, sig,
                                               noise_sd, slope, self.frames, self.slab_frames, g.orient),
                          g.zooms + (self.tr,), self.compresslevel, scl_slope=slope)
        return rec

    def record(self, seed: int, subject_sev: dict, subject_nui: dict) -> dict:
        """The truth record (``planted_effect.json``; keys: :func:`synthesize_anatomy_cohort`)."""
        eff, t1g, fg = self.effect, self.maps.t1g, self.maps.fg
        ranks = {}
        for mod, g in (("t1", t1g), ("fmri", fg)):
            masks = structure_masks(eff.planted, g.shape, g.affine, mod)
            union = g.orient(np.logical_or.reduce(list(masks.values()))[..., None])[..., 0]
            ranks[mod] = {"x".join(map(str, gr)): region_ranks(union, gr) for gr in ((4, 4, 4), (2, 2, 2))}
        record = {
            "anatomy": ANATOMY, "template": TEMPLATE_NAME,
            "structures": {n: [e.record() for e in ells] for n, ells in eff.planted.items()},
            "partner": {eff.partner: [e.record() for e in eff.partner_ells]},
            "gm_threshold": GM_THRESHOLD, "severity": eff.severity,
            "severity_sd": dict(zip(MODALITIES, map(float, eff.severity_sd))) if eff.per_modality else eff.severity_sd,
            "strength_t1": eff.strength[0], "strength_fmri": eff.strength[1],
            "stages": {m: list(w) for m, w in eff.stages.items()}, "fmri_effect": list(eff.fmri_effect),
            "subject_severity": subject_sev, "subject_nuisance": subject_nui,
            **({"geometry": asdict(self.geometry)} if self.geometry is not None else {}),
            "nuisance": asdict(self.nuisance), "signal": asdict(self.signal), "seed": seed, "tr_seconds": self.tr,
            "orientation": self.orientation.upper(),
            "grids": {"t1": {"shape": list(t1g.file_shape), "affine": t1g.file_affine.tolist()},
                      "fmri": {"shape": list(fg.file_shape), "affine": fg.file_affine.tolist()}},
            "region_ranks": ranks,
            "effect": {
                "severity": "subject severity = clip(class severity + N(0, severity_sd), 0, 1); each modality "
                            "takes stage(severity, stages[modality]) = clip((severity - start) / (end - start), 0, "
                            "1) (called severity below)",
                "t1": "GM fraction x (1 - strength_t1 * severity) inside each structure's ellipsoids with "
                      "GM > gm_threshold, the lost fraction becoming CSF (T1 moves towards CSF intensity)",
                "fmri_amplitude": "fluctuation amplitude x (1 - strength_fmri * severity * occupancy) in the "
                                  "structures",
                "fmri_connectivity": "corr(structure signal, partner signal) = coupling * (1 - strength_fmri * "
                                     "severity)",
                "units": "centres/radii in MNI152 mm; masks via masan.evaluate.oracle.planted_masks"},
        }
        if self.geometry is not None:
            record["effect"]["geometry"] = (
                "grid position g (mm, the written grid) shows template position A g + d(A g): A = "
                "subject_nuisance[subject][modality].motion.matrix (head placement), d = subject_nuisance[subject]."
                "warp (cubic interpolating spline through its control displacements); "
                "masan.synth.deformation.transform_from_record")
        return record


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
    ``structures``: names in :data:`masan.synth.structures.STRUCTURES` carrying the effect.
    ``fmri_effect``: any of ``amplitude``, ``connectivity`` (empty: T1 effect only). ``strength``:
    effect at severity 1, one number for both modalities or ``(t1, fmri)``: the GM fraction lost,
    the fraction of fluctuation amplitude lost and of the coupling lost. ``severity``: class ->
    severity (default NC 0, EMCI 1/3, LMCI 2/3, AD 1); each subject draws
    ``clip(severity + N(0, severity_sd), 0, 1)``; ``severity_sd=(t1, fmri)`` draws one severity
    per modality, independently, each with its own spread. ``stages``: per modality (``t1``, ``fmri``)
    the severity window over which its effect rises (:data:`DEFAULT_STAGES`, :func:`stage`);
    the strength multiplies the staged severity. ``partner``: the network the structures
    are coupled to (default: first of :data:`masan.synth.structures.PARTNER_CHOICES` not planted).
    ``geometry`` (:class:`masan.synth.deformation.Geometry`; None: each modality gets its own
    rigid misregistration and no warp): each subject gets a smooth warp, its T1 the head
    placement drawn from ``nuisance``'s misregistration, its fMRI that placement moved by a
    small offset; every map of the subject's anatomy (T1, tissue, occupancies, effect) is
    read through them (:func:`masan.synth.deformation.sample_through`).
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
    effect = _Effect.check(classes, severity, severity_sd, strength, stages, fmri_effect, structures, partner)
    nuisance, signal = nuisance or Nuisance(), signal or Signal()
    if frames < 1:
        raise ValueError("frames must be >= 1")
    maps = _Maps.make(effect, t1_shape, fmri_shape, orientation, signal, seed)
    writer = _Writer(out, effect, maps, nuisance, signal, geometry, frames, tr, orientation, compresslevel,
                     slab_frames)
    order = [c for i in range(max(counts.values(), default=0)) for c in classes if i < counts.get(c, 0)]
    rows, subject_sev, subject_nui = [], {}, {}
    for i, cls in enumerate(tqdm(order, desc="synth mni152", unit="subject", disable=not progress)):
        subject = f"sub-{i + 1:03d}"
        rng = np.random.default_rng([seed, i])
        drawn, subject_sev[subject] = _severities(rng, effect.severity[cls], effect.severity_sd)
        subject_nui[subject] = writer.subject(subject, rng, drawn)
        rows.append({"participant_id": subject, "diagnosis": cls})
    write_cohort_tables(out, rows, "MASAN MNI152 validation cohort", "masan.synth.anatomy",
                        f"seed {seed}; template {TEMPLATE_NAME}")
    (out / PLANTED_EFFECT_FILE).write_text(json.dumps(writer.record(seed, subject_sev, subject_nui), indent=1))
    return out
