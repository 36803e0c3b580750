"""Where a subject's anatomy sits in its images: a map from grid positions to template positions.

A synthetic subject's image at grid position ``g`` (mm, the nominal grid of the written file)
shows the template at ``T(g) = W(A g)``:

- ``A`` (4, 4), rigid: the head's position in the scanner (misregistration, head placement),
  from grid mm to the subject's head frame. Each modality has its own (the fMRI run is a
  second placement of the same head).
- ``W(a) = a + d(a)``, the subject's shape: a smooth displacement ``d`` (mm) from the head
  frame to the template, one per subject, shared by its modalities. ``d`` is the cubic
  interpolating spline through a coarse grid of control displacements (:class:`Warp`), so a
  truth record holding that grid holds the warp exactly.

:func:`draw_rigid` and :func:`draw_warp` draw them; :func:`sample_through` reads a template map
through them; :func:`transform_from_record` rebuilds a subject's transform from the truth
record (:mod:`masan.synth.anatomy`) for the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from masan.convert import template

CACHED_POINTS = 1 << 21
"""A transform keeps its positions on grids of up to this many voxels (a subject's maps are
read on the same two grids); larger grids are mapped a slab of this many points at a time."""
WARP_UNIT_MM = 0.01
"""Control displacements are whole multiples of this (rounded when drawn), so the record,
which holds them as integers of this unit, is the warp."""
MATRIX_DECIMALS = 8


@dataclass(frozen=True)
class Geometry:
    """How subjects differ in shape and placement beyond :class:`masan.synth.anatomy.Nuisance`'s
    misregistration (whose ``misregistration_mm/_deg`` then give the head placement of the T1)."""

    warp_rms_mm: float = 2.5
    """RMS length (mm) of each subject's displacement over the template brain; 0: no warp."""
    warp_control_points: int = 8
    """Control points per axis of the warp's grid, spanning the template brain plus a margin."""
    fmri_offset_mm: float = 2.0
    """The fMRI run's head placement is the T1's moved by a translation of length U(0, this) mm ..."""
    fmri_offset_deg: float = 2.0
    """... and a rotation by U(0, this) degrees about a random axis through the brain centre."""


def voxel_centers_mm(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 3) world coordinates of the voxel centres (index i at position i)."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def rigid_matrix(translation_mm: Sequence[float], rotation_rad: Sequence[float], center_mm: Sequence[float]
                 ) -> np.ndarray:
    """(4, 4) mm -> mm: rotation by the rotation vector ``rotation_rad`` about ``center_mm``, then
    the translation."""
    r = Rotation.from_rotvec(np.asarray(rotation_rad, dtype=np.float64)).as_matrix()
    center = np.asarray(center_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = center - r @ center + np.asarray(translation_mm, dtype=np.float64)
    return m


def draw_rigid(rng: np.random.Generator, max_mm: float, max_deg: float, center: np.ndarray
               ) -> tuple[np.ndarray, dict]:
    """A random rigid (4, 4) mm -> mm transform and its record: translation of length U(0, ``max_mm``)
    and rotation by U(0, ``max_deg``) degrees, each about a random direction, the rotation about
    ``center``. Record: ``translation_mm``, ``rotation_deg`` (rotation vector, degrees),
    ``rotation_center_mm``."""
    def direction() -> np.ndarray:
        v = rng.standard_normal(3)
        return v / np.linalg.norm(v)

    t = direction() * rng.uniform(0, max_mm)
    rotvec = direction() * np.deg2rad(rng.uniform(0, max_deg))
    return rigid_matrix(t, rotvec, center), {
        "translation_mm": [round(float(v), 4) for v in t],
        "rotation_deg": [round(float(v), 4) for v in np.rad2deg(rotvec)],
        "rotation_center_mm": [round(float(v), 4) for v in center]}


def rigid_from_record(motion: dict) -> np.ndarray:
    """(4, 4) of a motion record: its ``matrix`` when present, else rebuilt from the
    translation, rotation vector and centre (:func:`draw_rigid`'s record)."""
    if "matrix" in motion:
        return np.asarray(motion["matrix"], dtype=np.float64)
    return rigid_matrix(motion["translation_mm"], np.deg2rad(motion["rotation_deg"]), motion["rotation_center_mm"])


def matrix_record(m: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(m, dtype=np.float64), MATRIX_DECIMALS).tolist()


def rigid_record(m: np.ndarray, center_mm: Sequence[float]) -> dict:
    """A rigid (4, 4)'s record in :func:`draw_rigid`'s terms (rotation about ``center_mm``, then
    translation) plus its ``matrix``: for a composed transform, e.g. the fMRI placement."""
    r, center = m[:3, :3], np.asarray(center_mm, dtype=np.float64)
    t = m[:3, 3] - center + r @ center
    return {"translation_mm": [round(float(v), 4) for v in t],
            "rotation_deg": [round(float(v), 4) for v in np.rad2deg(Rotation.from_matrix(r).as_rotvec())],
            "rotation_center_mm": [round(float(v), 4) for v in center], "matrix": matrix_record(m)}


@dataclass(frozen=True, eq=False)
class Warp:
    """A smooth displacement field ``d`` (mm) on the head frame (mm).

    ``displacement_mm`` (Gx, Gy, Gz, 3) float64: ``d`` at control point (i, j, k), which sits at
    ``origin_mm + (i, j, k) * spacing_mm``; between control points ``d`` is their cubic
    interpolating spline, beyond the outermost ones it continues the boundary values.
    """

    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    displacement_mm: np.ndarray

    def __post_init__(self):
        coeffs = [ndimage.spline_filter(np.ascontiguousarray(self.displacement_mm[..., c]), order=3, mode="nearest")
                  for c in range(3)]
        object.__setattr__(self, "_coeffs", coeffs)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """(..., 3) displacement (mm, float64) at points (..., 3) in mm."""
        pts = np.asarray(points_mm, dtype=np.float64)
        idx = (pts.reshape(-1, 3) - np.asarray(self.origin_mm)) / np.asarray(self.spacing_mm)
        out = np.stack([ndimage.map_coordinates(c, idx.T, order=3, mode="nearest", prefilter=False)
                        for c in self._coeffs], axis=-1)
        return out.reshape(pts.shape)

    def record(self) -> dict:
        """``origin_mm``, ``spacing_mm``, ``shape`` [Gx, Gy, Gz, 3] and ``displacement_hundredths_mm``:
        the control displacements in units of :data:`WARP_UNIT_MM`, one string of integers in C
        order (x, y, z, component). A string, not nested lists: the truth record is copied into
        the store's root attributes, which the converter rewrites after every subject."""
        units = np.rint(self.displacement_mm / WARP_UNIT_MM).astype(np.int64)
        return {"origin_mm": [round(float(v), 4) for v in self.origin_mm],
                "spacing_mm": [round(float(v), 6) for v in self.spacing_mm],
                "shape": list(units.shape), "displacement_hundredths_mm": " ".join(map(str, units.ravel()))}

    @classmethod
    def from_record(cls, rec: dict) -> "Warp":
        units = np.array(rec["displacement_hundredths_mm"].split(), dtype=np.int64).reshape(rec["shape"])
        return cls(tuple(rec["origin_mm"]), tuple(rec["spacing_mm"]), units * WARP_UNIT_MM)


def rms_length(warp: Warp, points_mm: np.ndarray) -> float:
    """RMS length (mm) of the displacement over ``points_mm`` (N, 3)."""
    return float(np.sqrt((warp(points_mm) ** 2).sum(axis=-1).mean()))


def draw_warp(rng: np.random.Generator, rms_mm: float, box_mm: tuple[Sequence[float], Sequence[float]],
              control_points: int, brain_mm: np.ndarray) -> Warp:
    """A random smooth warp with RMS length ``rms_mm`` over ``brain_mm`` (N, 3) and no net
    translation there (the head placement is the rigid part's): independent normal control
    displacements on a ``control_points``^3 grid spanning ``box_mm`` (low, high corners), their
    brain mean removed, scaled, rounded to :data:`WARP_UNIT_MM`."""
    lo, hi = (np.asarray(c, dtype=np.float64) for c in box_mm)
    n = int(control_points)
    if n < 2:
        raise ValueError(f"warp_control_points is {n}; give at least 2")
    lo, spacing = np.round(lo, 4), np.round((hi - lo) / (n - 1), 6)  # as recorded (Warp.record)
    raw = rng.standard_normal((n, n, n, 3))
    d = Warp(tuple(lo), tuple(spacing), raw)(brain_mm)
    # The field is linear in the control values and the spline reproduces constants, so
    # shifting and scaling the control values shifts and scales the field alike.
    mean = d.mean(axis=0)
    scale = rms_mm / max(float(np.sqrt(((d - mean) ** 2).sum(axis=-1).mean())), 1e-12)
    return Warp(tuple(lo), tuple(spacing), np.rint((raw - mean) * scale / WARP_UNIT_MM) * WARP_UNIT_MM)


@dataclass(frozen=True, eq=False)
class SubjectTransform:
    """Grid mm -> template mm of one subject and modality: ``rigid`` (4, 4), then ``warp`` (or none)."""

    rigid: np.ndarray
    warp: Warp | None = None
    _grids: dict = field(default_factory=dict, init=False, repr=False)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """(..., 3) template positions (mm, float64) of grid positions (..., 3) in mm."""
        pts = np.asarray(points_mm, dtype=np.float64) @ self.rigid[:3, :3].T + self.rigid[:3, 3]
        return pts if self.warp is None else pts + self.warp(pts)

    @staticmethod
    def slabs(shape: Sequence[int]) -> list[tuple[int, int]]:
        """[start, stop) ranges of X planes to map at a time: the whole grid when it is small."""
        plane = max(int(shape[1]) * int(shape[2]), 1)
        rows = int(shape[0]) if int(shape[0]) * plane <= CACHED_POINTS else max(1, CACHED_POINTS // plane)
        return [(a, min(a + rows, int(shape[0]))) for a in range(0, int(shape[0]), rows)]

    def on_grid(self, shape: Sequence[int], affine: np.ndarray, start: int = 0, stop: int | None = None
                ) -> np.ndarray:
        """(stop - start, Y, Z, 3) template positions (mm, float64) of the voxel centres of X planes
        [start, stop) of the grid ``shape`` with voxel -> grid mm ``affine``. A whole grid of up to
        :data:`CACHED_POINTS` voxels is computed once (the last two grids are kept)."""
        shape = tuple(int(n) for n in shape)
        stop = shape[0] if stop is None else stop
        affine = np.asarray(affine, dtype=np.float64)
        key = (shape, affine.tobytes())
        whole = (start, stop) == (0, shape[0]) and np.prod(shape) <= CACHED_POINTS
        if whole and key in self._grids:
            return self._grids[key]
        slab = affine.copy()
        slab[:3, 3] += start * affine[:3, 0]
        pts = self(voxel_centers_mm((stop - start,) + shape[1:], slab))
        if whole:
            if len(self._grids) >= 2:
                self._grids.pop(next(iter(self._grids)))
            self._grids[key] = pts
        return pts


def second_placement(rng: np.random.Generator, geometry: Geometry, first: np.ndarray, warp: Warp | None,
                     center: np.ndarray) -> tuple[SubjectTransform, dict]:
    """A second image of the same head (the fMRI run after the T1): the rigid placement ``first``
    (4, 4) moved by a random offset of :class:`Geometry`'s size, then the subject's ``warp``.
    Record: :func:`rigid_record` of the composed placement plus the drawn ``offset``."""
    offset, orec = draw_rigid(rng, geometry.fmri_offset_mm, geometry.fmri_offset_deg, center)
    rigid = first @ offset
    return SubjectTransform(rigid, warp), {**rigid_record(rigid, center), "offset": orec}


def transform_from_record(effect: dict, subject: str, modality: str) -> SubjectTransform | None:
    """The subject's transform for ``modality`` (``t1``/``fmri``) from an MNI152 truth record's
    ``subject_nuisance`` (its ``motion`` and, when drawn, the subject's ``warp``); None when the
    record holds none for the subject (e.g. a phantom record)."""
    nui = effect.get("subject_nuisance", {}).get(subject)
    if not nui or "motion" not in nui.get(modality, {}):
        return None
    warp = Warp.from_record(nui["warp"]) if nui.get("warp") else None
    return SubjectTransform(rigid_from_record(nui[modality]["motion"]), warp)


Motion = np.ndarray | SubjectTransform | None
"""Where a grid position (mm) finds the template (mm): None (nowhere else), a rigid (4, 4)
mm -> mm, or a :class:`SubjectTransform` (rigid, then a warp)."""


def sample_through(source: tuple[np.ndarray, np.ndarray], shape: Sequence[int], affine: np.ndarray,
           motion: Motion = None, order: int = 1) -> np.ndarray:
    """float32 ``shape`` array: ``source`` (volume, affine) read at the grid's voxel centres.

    ``motion`` maps a grid position to the template position shown there (the subject's
    placement and shape, :data:`Motion`); outside the source: 0.
    """
    shape = tuple(int(n) for n in shape)
    if isinstance(motion, SubjectTransform):
        if motion.warp is not None:
            return _sample_warped(source, shape, affine, motion, order)
        motion = motion.rigid
    return template.sample(source, shape, affine, motion, order)


def _sample_warped(source: tuple[np.ndarray, np.ndarray], shape: tuple[int, int, int], affine: np.ndarray,
                   motion: SubjectTransform, order: int) -> np.ndarray:
    """:func:`sample_through` a warp: no affine shortcut, the positions a slab at a time."""
    vol, src_aff = source
    inv = np.linalg.inv(src_aff)
    out = np.empty(shape, dtype=np.float32)
    for start, stop in motion.slabs(shape):
        idx = motion.on_grid(shape, affine, start, stop) @ inv[:3, :3].T + inv[:3, 3]
        ndimage.map_coordinates(vol, np.moveaxis(idx, -1, 0), output=out[start:stop], order=order,
                                mode="constant", cval=0.0)
    return out
