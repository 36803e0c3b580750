"""The planted truth of a synthetic cohort, and an oracle that knows where to look.

A synthetic cohort's store carries its truth record in the root attribute
``planted_effect`` (written by :mod:`masan.synth.anatomy` for the MNI152 cohort or by
:mod:`masan.synth.phantom` for the phantom, copied by ``data_tools/to_zarr.py``). From it:

- :func:`planted_masks`: each planted structure's voxels on any grid, given the grid's
  voxel -> mm affine. Use ``CohortStore.affine(subject, modality)``: that affine is true
  after to_zarr's optional reorientation (``--canonical``) and crop/pad (``--t1-shape``,
  ``--fmri-shape``), so the masks are right in the store's voxel space. On the template
  (MNI) grid by default; with ``subject`` they follow that subject's own anatomy (its head
  placement and warp from the truth record), which is where an unregistered store shows it.
- :func:`is_registered`: whether the store's images were spatially normalised to the
  template (root attribute ``registration``), which decides the space above.
- :func:`planted_features`: per subject, what the planted effect changes, measured on
  the stored data (what the model sees, nuisance included): mean z-scored T1 in each
  structure, mean temporal std of the fMRI in % of each voxel's mean, and (when
  connectivity was planted) the correlation of each structure's mean series with the
  partner network's.
- :func:`oracle_predict`: a standardised logistic regression on those features: the
  accuracy a model could reach by finding the planted effect (an upper reference for
  benchmarks, not a bound).
- :func:`planted_region_ranks`: the patch-grid regions holding planted voxels, most first,
  to ask "is a planted region among the model's top-k regions".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from masan.synth import anatomy, structures
from masan.synth.deformation import transform_from_record, voxel_centers_mm
from masan.synth.phantom import FIELD_OF_VIEW_MM

PHANTOM_STRUCTURE = "ball"
SPACES = ("auto", "subject", "template")


def _kind(effect: dict) -> str:
    if effect.get("anatomy") == anatomy.ANATOMY:
        return "mni152"
    if "center" in effect and "radius" in effect:
        return "phantom"
    raise ValueError("not a planted-effect record (expected the 'planted_effect' attribute of a synthetic "
                     "cohort store: an MNI152 record with 'anatomy', or a phantom one with 'center'/'radius')")


def _ball_mask(effect: dict, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """The phantom's ball on any grid. The phantom's own grid (field of view
    :data:`FIELD_OF_VIEW_MM`, voxel i centred at i * zoom - fov / 2) puts voxel i at volume
    fraction (i + 0.5) / n, i.e. fraction = (mm + fov / 2 + zoom / 2) / fov per world axis,
    with zoom the voxel size along that world axis (kept by reorientation and crop/pad)."""
    affine = np.asarray(affine, dtype=float)
    pts = voxel_centers_mm(shape, affine)
    fov = np.asarray(FIELD_OF_VIEW_MM)
    zoom = np.abs(affine[:3, :3]).max(axis=1)
    frac = (pts + fov / 2 + zoom / 2) / fov
    return ((frac - np.asarray(effect["center"])) ** 2).sum(axis=-1) <= float(effect["radius"]) ** 2


def is_registered(store) -> bool:
    """Whether the store's images lie on the template grid (:func:`masan.convert.template.grid_affine`
    in MNI mm): its root attribute ``registration`` is a dict whose ``type`` (``rigid``,
    ``affine``, ``syn``...) is not ``none``. Absent: not registered."""
    reg = store.attrs.get("registration")
    kind = reg.get("type") if isinstance(reg, dict) else reg
    return str(kind or "none").lower() != "none"


def _subject_motion(effect: dict, subject: str | None, modality: str):
    """The subject's grid -> template transform from the record (None: template space)."""
    if subject is None or _kind(effect) != "mni152":
        return None
    tf = transform_from_record(effect, subject, modality)
    if tf is None:
        raise ValueError(f"the planted-effect record has no {modality} placement for subject {subject!r}; "
                         "pass subject=None for template-space masks")
    return tf


def planted_masks(effect: dict, shape: Sequence[int], affine: np.ndarray, modality: str = "t1",
                  subject: str | None = None) -> dict[str, np.ndarray]:
    """Boolean ``shape`` (X, Y, Z) mask per planted structure on the grid with voxel -> mm ``affine``.

    MNI152 records: ``modality="t1"`` gives the structure's ellipsoids intersected with the
    template's GM probability > ``gm_threshold`` (the voxels whose GM atrophies);
    ``"fmri"`` gives the ellipsoids alone (the voxels whose fluctuations change). On a
    coarse grid a voxel is in when its occupancy is at least half the structure's highest
    (:func:`masan.synth.structures.structure_masks`). Phantom records: ``{"ball": mask}``.

    ``subject=None``: the template's structures (a registered store, or the written grid
    without each subject's displacement). ``subject``: where that subject's images show them
    before any registration, through its placement and warp in ``subject_nuisance``
    (:func:`masan.synth.deformation.transform_from_record`); phantom records have none.
    """
    shape = tuple(int(n) for n in shape[-3:])
    if _kind(effect) == "phantom":
        return {PHANTOM_STRUCTURE: _ball_mask(effect, shape, affine)}
    return _record_masks(effect, "structures", shape, affine, modality, _subject_motion(effect, subject, modality))


def _record_masks(effect: dict, key: str, shape: Sequence[int], affine: np.ndarray, modality: str, motion
                  ) -> dict[str, np.ndarray]:
    """:func:`masan.synth.structures.structure_masks` of the record's ``structures`` or ``partner``."""
    return structures.structure_masks(structures.ellipsoids_from_record(effect[key]), tuple(shape[-3:]), affine,
                                      modality, float(effect.get("gm_threshold", structures.GM_THRESHOLD)), motion)


def _partner_union(effect: dict, shape: Sequence[int], affine: np.ndarray, motion) -> np.ndarray | None:
    if not effect.get("partner"):
        return None
    return np.logical_or.reduce(list(_record_masks(effect, "partner", shape, affine, "fmri", motion).values()))


def planted_region_ranks(effect: dict, shape: Sequence[int], affine: np.ndarray, grid: Sequence[int],
                         modality: str = "t1", subject: str | None = None) -> list[int]:
    """Flat C-order indices ``(gx * Gy + gy) * Gz + gz`` of the regions of the non-overlapping
    ``grid`` split of the volume that hold planted voxels (union of :func:`planted_masks`,
    ``subject`` as there), the region with most planted voxels first."""
    masks = planted_masks(effect, shape, affine, modality, subject)
    return structures.region_ranks(np.logical_or.reduce(list(masks.values())), grid)


def feature_names(effect: dict) -> list[str]:
    """Column names of :func:`planted_features`: ``t1_mean:<s>``, ``fmri_std:<s>`` and, when
    connectivity was planted, ``fmri_conn:<s>``, for each planted structure s."""
    names = [PHANTOM_STRUCTURE] if _kind(effect) == "phantom" else list(effect["structures"])
    cols = [f"t1_mean:{n}" for n in names] + [f"fmri_std:{n}" for n in names]
    if _kind(effect) == "mni152" and "connectivity" in effect.get("fmri_effect", []):
        cols += [f"fmri_conn:{n}" for n in names]
    return cols


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / d) if d > 0 else 0.0


def planted_features(store, subjects: Sequence[str], frame_block: int = 128, space: str = "auto") -> np.ndarray:
    """(N, F) float64 features of ``subjects`` measured on the store (columns: :func:`feature_names`).

    - ``t1_mean``: mean of ``store.read_t1(normalize=True)`` (z-scored with the subject's
      stored statistics) over the structure's T1 mask;
    - ``fmri_std``: mean over the structure's fMRI mask of each voxel's temporal std of
      ``series / temporal mean`` (fraction of the mean, i.e. % signal / 100), from the
      scaled stored values (``normalize=False``);
    - ``fmri_conn``: Pearson correlation of the structure's mean % signal series with the
      partner network's.

    Masks follow each subject's stored affine, and where they are taken is ``space``:
    ``subject``: each subject's own anatomy (``planted_masks(..., subject=...)``: an oracle
    that knows every subject's placement and warp); ``template``: the template's structures
    for everyone; ``auto`` (default): ``template`` for a registered store (:func:`is_registered`)
    and phantom records, ``subject`` otherwise. The run is read ``frame_block`` frames at a
    time and only the masked voxels are kept (memory: frames x masked voxels).
    A structure with no voxel on the grid gives NaN.
    """
    effect = store.attrs.get("planted_effect")
    per_subject = _masks_per_subject(store, effect, space)
    names = feature_names(effect)
    conn = any(n.startswith("fmri_conn:") for n in names)
    masks_for = _mask_source(store, effect, per_subject, conn)
    rows = []
    for subject in subjects:
        t1_masks, _ = masks_for(subject, "t1")
        t1 = store.read_t1(subject, normalize=True)
        row = [float(t1[m].mean()) if m.any() else np.nan for m in t1_masks.values()]
        f_masks, p_mask = masks_for(subject, "fmri")
        rows.append(row + _fmri_features(store, subject, f_masks, p_mask if conn else None, frame_block))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


def _masks_per_subject(store, effect: dict | None, space: str) -> bool:
    """Whether :func:`planted_features` takes each subject's own masks (``space``, checked
    against the store; ValueError naming the fix)."""
    if not effect:
        raise ValueError(f"{store.path} has no 'planted_effect' attribute: not a synthetic cohort "
                         "(convert the BIDS folder written by data_tools/synth_cohort.py with to_zarr.py)")
    if space not in SPACES:
        raise ValueError(f"space is {space!r}; choose from {SPACES}")
    if space == "subject" and is_registered(store):
        raise ValueError(f"{store.path} is registered to the template (attribute 'registration'): its images no "
                         "longer show each subject's placement; use space='template' or 'auto'")
    return space == "subject" or (space == "auto" and _kind(effect) == "mni152" and not is_registered(store))


def _mask_source(store, effect: dict, per_subject: bool, conn: bool):
    """``masks_for(subject, modality) -> ({structure: (X, Y, Z) bool mask}, partner mask or None)``,
    cached per grid (shape and affine) and, with ``per_subject``, for one subject at a time."""
    cache: dict[tuple, tuple] = {}

    def masks_for(subject: str, modality: str) -> tuple:
        shape = store.shape(subject, modality)[-3:]
        aff = store.affine(subject, modality)
        who = subject if per_subject else None
        key = (modality, shape, aff.round(6).tobytes(), who)
        if key not in cache:
            if who is not None:
                cache.clear()  # one subject's masks serve that subject only
            if _kind(effect) == "phantom":
                cache[key] = (planted_masks(effect, shape, aff, modality), None)
            else:  # one transform for the structures and the partner: mapping the grid is the cost
                motion = _subject_motion(effect, who, modality)
                cache[key] = (_record_masks(effect, "structures", shape, aff, modality, motion),
                              _partner_union(effect, shape, aff, motion) if modality == "fmri" and conn else None)
        return cache[key]

    return masks_for


def _fmri_features(store, subject: str, f_masks: dict, p_mask: np.ndarray | None, frame_block: int) -> list[float]:
    """``fmri_std`` of each structure mask and, with a partner mask, ``fmri_conn`` (see
    :func:`planted_features`), from the run read ``frame_block`` frames at a time, masked voxels only."""
    groups = list(f_masks.values()) + ([p_mask] if p_mask is not None else [])
    union = np.logical_or.reduce(groups)
    index = {id(g): np.flatnonzero(g[union]) for g in groups}  # positions within the union voxels
    frames = store.shape(subject, "fmri")[0]
    series = np.concatenate([store.read_fmri(subject, slice(t0, min(t0 + frame_block, frames)),
                                             normalize=False)[:, union]
                             for t0 in range(0, frames, frame_block)], axis=0).astype(np.float64)
    mean = series.mean(axis=0)
    pct = np.divide(series, mean, out=np.zeros_like(series), where=mean > 0)
    std = pct.std(axis=0)
    ok = mean > 0
    stds, mean_series = [], []
    for m in f_masks.values():
        sel = index[id(m)]
        sel = sel[ok[sel]]
        stds.append(float(std[sel].mean()) if sel.size else np.nan)
        mean_series.append(pct[:, sel].mean(axis=1) if sel.size else None)
    if p_mask is None:
        return stds
    sel = index[id(p_mask)]
    sel = sel[ok[sel]]
    partner = pct[:, sel].mean(axis=1) if sel.size else None
    return stds + [_corr(s, partner) if s is not None and partner is not None else np.nan for s in mean_series]


def oracle_model():
    """The oracle's classifier, unfitted: a standardised logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def oracle_predict(train_X: np.ndarray, train_y: Sequence, test_X: np.ndarray) -> np.ndarray:
    """(n_test, n_classes) probabilities of a standardised logistic regression fitted on
    (``train_X``, ``train_y``); columns in sorted order of the training labels."""
    return oracle_model().fit(np.asarray(train_X), np.asarray(train_y)).predict_proba(np.asarray(test_X))


def oracle_accuracy(X: np.ndarray, y: Sequence, test_size: float = 0.3, seeds: Sequence[int] = (0, 1, 2, 3, 4)
                    ) -> list[float]:
    """Oracle test accuracy on stratified ``1 - test_size`` / ``test_size`` splits, one per seed."""
    X, y = np.asarray(X), np.asarray(y)
    classes = np.unique(y)
    out = []
    for seed in seeds:
        train, test = next(StratifiedShuffleSplit(1, test_size=test_size, random_state=seed).split(X, y))
        prob = oracle_predict(X[train], y[train], X[test])
        out.append(float((classes[prob.argmax(axis=1)] == y[test]).mean()))
    return out
