"""The geometry contract between a cohort store, a model and a trained run.

A model sees voxels, not millimetres or seconds: it is only right on a store whose subjects
share one T1 grid, one fMRI grid, one voxel size, one orientation and one TR, and a trained
run is only right on stores with the geometry it was trained on. This module reads that
geometry from a store (:func:`store_geometry`), fills the model's input shapes from it and
checks them (:func:`resolve_inputs`), and compares a store with the geometry a run recorded
(:func:`mismatches`). Every refusal is a :class:`ContractError` naming the field, the values,
the subjects and the fix; training and ``masan.predict`` raise it before writing anything.

Conventions: shapes in voxels (T1 ``(X, Y, Z)``; fMRI ``(X, Y, Z)`` per frame), spacing in mm
(from the stored affine's columns), orientation as nibabel's axis codes of the stored affine
(e.g. ``RAS``), TR in seconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import nibabel as nib

from masan.config import ConfigError, RunConfig
from masan.convert import resample
from masan.convert.nifti import SAME_VALUE_RTOL
from masan.store.cohort import CohortStore

REGISTRATION_KEYS = ("type", "template", "t1_grid", "fmri_grid")
"""What of a store's registration settings decides what a voxel holds."""


class ContractError(ConfigError):
    """A store breaks the geometry a model or run needs (a user error: exit 2, nothing written)."""


@dataclass
class Geometry:
    """One store's geometry over a set of subjects (JSON-ready; None: modality unused)."""

    t1_shape: list[int] | None = None
    fmri_shape: list[int] | None = None
    t1_spacing_mm: list[float] | None = None
    fmri_spacing_mm: list[float] | None = None
    orientation: str | None = None
    """Axis codes shared by every stored image, e.g. ``RAS``."""
    frames_min: int | None = None
    """Frames of the shortest fMRI run."""
    frames_max: int | None = None
    tr_seconds: float | None = None
    """The fMRI runs' TR (None where no run records one)."""
    registration: dict | None = None
    """The store's registration settings (template, type, grids), None without."""
    store: str = ""
    shortest: str = ""
    """The subject with the fewest frames (for messages)."""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _listing(groups: dict, unit: str = "") -> str:
    parts = []
    for value, subjects in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(subjects) - 3} more" if len(subjects) > 3 else ""
        parts.append(f"{value}{unit}: {', '.join(subjects[:3])}{more}")
    return "; ".join(parts)


def _cluster(values: dict[str, tuple[float, ...]], rtol: float) -> dict[tuple[float, ...], list[str]]:
    """Group subjects whose values agree within ``rtol`` (keyed by the group's first value)."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for subject, v in values.items():
        for key in groups:
            if all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(key, v)):
                groups[key].append(subject)
                break
        else:
            groups[v] = [subject]
    return groups


def store_geometry(store: CohortStore, subjects: list[str], modalities: list[str]) -> Geometry:
    """The geometry ``subjects`` share in ``store`` for ``modalities`` (``t1``, ``fmri``).

    Raises :class:`ContractError` when they do not share one: T1 or fMRI grids of different
    shapes, voxel sizes or orientations, or fMRI runs of different TRs, naming the groups of
    subjects and the conversion option that makes them agree.
    """
    geo = Geometry(store=str(store.path), registration=store.attrs.get("registration"))
    axcodes: dict[str, list[str]] = defaultdict(list)
    copies: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m in modalities:
        shapes: dict[tuple, list[str]] = defaultdict(list)
        spacing: dict[str, tuple[float, ...]] = {}
        for s in subjects:
            shape = store.shape(s, m)
            shapes[tuple(shape[1:] if m == "fmri" else shape)].append(s)
            entry = store.row(s)[m]
            if "voxel_mm" in entry:  # recorded in the cohort table at conversion
                spacing[s], codes = tuple(entry["voxel_mm"]), entry["axcodes"]
            else:  # stores converted before: from the image's attributes
                affine = store.affine(s, m)
                spacing[s], codes = resample.voxel_size(affine), "".join(nib.aff2axcodes(affine))
            axcodes[codes].append(f"{s} {m}")
            if entry.get("sha256"):  # the source file's, recorded at conversion
                copies[(m, entry["sha256"])].append(s)
        flag = "--t1-shape" if m == "t1" else "--fmri-shape"
        sizes = _cluster(spacing, SAME_VALUE_RTOL)
        if len(sizes) > 1:
            raise ContractError(f"{m} voxel sizes in {store.path} differ ({_listing(sizes, ' mm')}): the same "
                                "voxel holds different anatomy per scanner; reconvert with data_tools/to_zarr.py "
                                f"--spacing MM (every image resampled to one voxel size; --spacing alone: the "
                                f"cohort's most common voxel size) and {flag} X Y Z")
        if len(shapes) > 1:
            raise ContractError(f"{m} images in {store.path} differ in shape ({_listing(shapes)}); a model takes "
                                f"one shape: reconvert with data_tools/to_zarr.py {flag} X Y Z")
        setattr(geo, f"{m}_shape", list(next(iter(shapes))))
        setattr(geo, f"{m}_spacing_mm", list(next(iter(sizes))))
    if len(axcodes) > 1:
        raise ContractError(f"images in {store.path} are stored in different orientations ({_listing(axcodes)}): "
                            "the same voxel index is another side of the head per subject; reconvert with "
                            "data_tools/to_zarr.py --canonical (every image stored RAS)")
    geo.orientation = next(iter(axcodes), None)
    for (m, digest), same in copies.items():
        if len(same) > 1:
            geo.notes.append(f"{', '.join(same)} have byte-identical {m} source files (sha256 {digest[:12]}...): one "
                             "scan under several subject ids can land in both the training and the test part of a "
                             "split and inflate the test scores; keep one (fix the BIDS folder or manifest, then "
                             "convert again with --prune)")
    if "fmri" in modalities:
        frames = {s: store.shape(s, "fmri")[0] for s in subjects}
        geo.shortest = min(frames, key=frames.get)
        geo.frames_min, geo.frames_max = frames[geo.shortest], max(frames.values())
        trs = {s: store.row(s)["fmri"].get("tr_seconds") for s in subjects}
        known = {s: (float(t),) for s, t in trs.items() if t}
        unknown = sorted(s for s, t in trs.items() if not t)
        groups = _cluster(known, SAME_VALUE_RTOL)
        if len(groups) > 1:
            shown = {k[0]: v for k, v in groups.items()}
            raise ContractError(f"fMRI runs in {store.path} have different TRs ({_listing(shown, ' s')}): N frames are "
                                "a different duration and sampling per subject; train on runs of one TR (convert "
                                "each TR's subjects into their own store)")
        if groups and unknown:
            geo.notes.append(f"{len(unknown)} fMRI run(s) record no TR ({', '.join(unknown[:3])}); taken as "
                             f"{next(iter(groups))[0]:g} s like the others")
        geo.tr_seconds = next(iter(groups))[0] if groups else None
    return geo


def resolve_inputs(cfg: RunConfig, geo: Geometry) -> list[str]:
    """Fill the model's input shapes that are null (``model.t1_shape``, ``model.fmri_shape``,
    ``model.fmri_frames``, ``data.fmri_frames``) from ``geo`` in place, and check the ones
    given; returns what was filled (for the log).

    One frame count: ``data.fmri_frames`` and ``model.fmri_frames`` are the same number; one
    given fills the other, both null take the store's (runs must then agree). Raises
    :class:`ContractError` naming the key, both values and the fix.
    """
    filled = []
    m, d = cfg.model, cfg.data
    for mod, key in (("t1", "t1_shape"), ("fmri", "fmri_shape")):
        have = getattr(geo, key)
        if have is None:
            continue
        want = getattr(m, key)
        if want is None:
            setattr(m, key, list(have))
            filled.append(f"model.{key}={list(have)}")
        elif list(want) != list(have):
            raise ContractError(f"model.{key}={list(want)} but the {mod} images of {geo.store} are "
                                f"{'x'.join(map(str, have))}; set model.{key}=[{','.join(map(str, have))}] (one "
                                "shell word; or null: the store's)")
    _check_grid(cfg, geo)
    if geo.frames_min is None:
        return filled
    if d.fmri_frames is not None and m.fmri_frames is not None and d.fmri_frames != m.fmri_frames:
        raise ContractError(f"data.fmri_frames={d.fmri_frames} but model.fmri_frames={m.fmri_frames}: the model "
                            "takes the frames the data gives; set one of them (the other null) or both equal")
    frames = d.fmri_frames if d.fmri_frames is not None else m.fmri_frames
    if frames is None:
        if geo.frames_min != geo.frames_max:
            raise ContractError(f"fMRI runs in {geo.store} have {geo.frames_min}-{geo.frames_max} frames; set "
                                f"data.fmri_frames (e.g. {geo.frames_min}: the first N frames of each run)")
        frames = geo.frames_min
    if frames > geo.frames_min:
        key = "data.fmri_frames" if d.fmri_frames is not None else "model.fmri_frames"
        raise ContractError(f"{key}={frames}, but subject {geo.shortest} of {geo.store} has {geo.frames_min} fMRI "
                            f"frames; set data.fmri_frames={geo.frames_min} (at most) and model.fmri_frames=null, "
                            "or leave the short runs out of the store")
    if m.fmri_frames is None:
        m.fmri_frames = frames
        filled.append(f"model.fmri_frames={frames}")
    # null means "all frames", which is this count only where every run has it
    if d.fmri_frames is None and geo.frames_min != geo.frames_max:
        d.fmri_frames = frames
        filled.append(f"data.fmri_frames={frames}")
    return filled


def _check_grid(cfg: RunConfig, geo: Geometry) -> None:
    """The store's grids cut into ``model.patch_grid``: T1 (and fMRI with ``fmri_layout=patches``)
    a multiple of it per axis, fMRI at least one voxel per region."""
    grid = list(cfg.model.patch_grid)
    for mod, shape, exact in (("t1", geo.t1_shape, True), ("fmri", geo.fmri_shape, cfg.model.fmri_layout == "patches")):
        if shape is None:
            continue
        bad = any(n % g for n, g in zip(shape, grid)) if exact else any(n < g for n, g in zip(shape, grid))
        if bad:
            need = "a multiple of" if exact else "at least"
            flag = "--t1-shape" if mod == "t1" else "--fmri-shape"
            raise ContractError(f"model.patch_grid={grid} does not fit the {mod} images of {geo.store} "
                                f"({'x'.join(map(str, shape))}): every axis must be {need} the grid's; change "
                                f"model.patch_grid or reconvert with data_tools/to_zarr.py {flag} X Y Z")


def unchecked_tr(trained: dict, geo: Geometry) -> str | None:
    """A note when one side records an fMRI TR and the other none (runs stored without one):
    :func:`mismatches` cannot compare them, so frames of another duration would pass."""
    a, b = trained.get("tr_seconds"), geo.tr_seconds
    if geo.fmri_shape is None or (a is None) == (b is None):
        return None
    return (f"the fMRI TR cannot be checked: the run trained on {f'{a:g} s' if a else 'runs without a TR'}, "
            f"{geo.store} holds {f'{b:g} s' if b else 'runs without a TR'}; its frames may be of another duration")


def mismatches(trained: dict, geo: Geometry, frames: int | None) -> list[str]:
    """Differences between the geometry a run ``trained`` on (:meth:`Geometry.to_json`) and
    another store's ``geo`` that the run's model cannot bridge, as messages naming the field,
    both values and the fix; ``frames`` is what the run feeds per fMRI run."""
    out = []
    fix = "convert the store with the options of the run's store (data_tools/inspect_store.py shows them)"
    for key, what in (("t1_shape", "T1 grid"), ("fmri_shape", "fMRI grid")):
        a, b = trained.get(key), getattr(geo, key)
        if a is not None and b is not None and list(a) != list(b):
            out.append(f"{what} {'x'.join(map(str, b))} in {geo.store}, the run was trained on "
                       f"{'x'.join(map(str, a))}; {fix}")
    for key, what in (("t1_spacing_mm", "T1 voxel size"), ("fmri_spacing_mm", "fMRI voxel size")):
        a, b = trained.get(key), getattr(geo, key)
        if a and b and not all(math.isclose(x, y, rel_tol=SAME_VALUE_RTOL) for x, y in zip(a, b)):
            out.append(f"{what} {b} mm in {geo.store}, the run was trained on {a} mm; {fix} (--spacing)")
    a, b = trained.get("orientation"), geo.orientation
    if a and b and a != b:
        out.append(f"orientation {b} in {geo.store}, the run was trained on {a}; {fix}")
    a, b = trained.get("tr_seconds"), geo.tr_seconds
    if a and b and not math.isclose(a, b, rel_tol=SAME_VALUE_RTOL):
        out.append(f"fMRI TR {b:g} s in {geo.store}, the run was trained on {a:g} s: its frames are another "
                   "duration; predict runs of the run's TR")
    if frames is not None and geo.frames_min is not None and geo.frames_min < frames:
        out.append(f"subject {geo.shortest} of {geo.store} has {geo.frames_min} fMRI frames, the run feeds {frames}; "
                   "leave the short runs out")
    ra, rb = trained.get("registration"), geo.registration
    if any((ra or {}).get(k) != (rb or {}).get(k) for k in REGISTRATION_KEYS):
        def show(r: dict | None) -> str:
            return "not registered" if not r else f"registered ({r.get('type')}, {r.get('template')})"
        out.append(f"{geo.store} is {show(rb)}, the run's store was {show(ra)}; {fix} (--register)")
    return out
