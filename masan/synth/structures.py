"""Where the validation cohorts plant their effect: named structures as ellipsoids in MNI space.

:data:`STRUCTURES` names bilateral or midline ellipsoids at approximate published MNI
coordinates; :func:`structure_masks` puts them on any grid (through a subject's placement and
shape when given), and :func:`region_ranks` says which regions of a patch grid hold them: the
truth that :mod:`masan.evaluate.oracle` compares a model's region weights with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from masan.convert.template import load_template, prepared, voxel_size
from masan.synth.deformation import Motion, sample_through, voxel_centers_mm

GM_THRESHOLD = 0.2
"""A structure's T1 effect mask is its ellipsoids intersected with GM probability > this."""


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



# ---------------------------------------------------------------------------------------------- on a grid
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


def cache_key(ellipsoids: Sequence[Ellipsoid]) -> tuple:
    """Hashable identity of a set of ellipsoids (the key of their prepared maps)."""
    return tuple((tuple(e.center_mm), tuple(e.radii_mm)) for e in ellipsoids)


def occupancy(ellipsoids: Sequence[Ellipsoid], shape: Sequence[int], affine: np.ndarray,
              motion: Motion = None) -> np.ndarray:
    """float32 ``shape``: fraction of each voxel inside the ellipsoids (partial volume, [0, 1])."""
    src = prepared(("occupancy", cache_key(ellipsoids)), voxel_size(affine), lambda: indicator(ellipsoids))
    return np.clip(sample_through(src, shape, affine, motion), 0.0, 1.0)


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
    gm = sample_through(prepared(("gm",), voxel_size(affine)), shape, affine, motion) if modality == "t1" else None
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
