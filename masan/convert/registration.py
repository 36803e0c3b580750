"""Spatial normalisation of one subject onto a template grid with ANTs (``to_zarr.py --register``).

Per subject (:class:`SubjectRegistration`, driven by :mod:`masan.convert.cohort`):

1. **T1 -> template.** ``ants.registration(fixed, moving, type_of_transform=Rigid|Affine|SyN)``
   with the template's T1 resampled onto the T1 grid as ``fixed`` (:func:`template_on_grid`)
   and the subject's T1 as ``moving``; the T1 is resampled onto that grid (linear).
2. **fMRI -> T1 -> template.** The run's temporal mean is registered rigidly to the subject's
   own (unregistered) T1; that transform and the T1's are composed once into one displacement
   field sampled on the fMRI grid, which every frame then goes through, a slab of frames at a
   time (``imagetype=3``: memory is one slab whatever the run's length).
3. **Similarity** before (the header's placement only) and after: the correlation of the T1
   with the template over the template's brain voxels, and the Dice overlap of the fMRI mean's
   brain mask (``ants.get_mask``) with the template's brain (the EPI contrast differs from the
   T1's, so an intensity correlation would not say much).
4. **Transforms** go to the subject's ``registration`` group (:meth:`SubjectRegistration.write`):
   the ANTs affine parameters (JSON), and for SyN the forward and inverse warp fields as arrays.
   :func:`transform_files` writes them back as ANTs files for ``ants.apply_transforms``.

Grids (:func:`grid`) are the template's brain box in MNI mm (:func:`masan.convert.template.grid_affine`):
the given shape, or the box at :data:`DEFAULT_VOXEL_MM` (one shape for a whole cohort,
whatever its acquisitions, as the loader needs).

World conventions: a NIfTI affine maps voxels to RAS mm, ITK/ANTs images live in LPS mm (x and
y negated): :func:`to_ants` converts, and ANTs' transforms and warp vectors stay in LPS as ANTs
writes them (:func:`ras_matrix` gives an affine's RAS form). ANTs' forward transforms map
template points to subject points (they pull the subject onto the template grid).

Reproducibility: every registration gets the seed :data:`SEED`; with one ITK thread per worker
(``to_zarr.py --threads 1``) a rerun gives identical bytes, with several the metric's per-thread
sums add up in another order and reruns differ slightly (docs/data-format.md). ITK reads its
thread count once per process (:func:`set_threads` must run before the first registration).
``ants`` (and the template) are loaded lazily: a conversion without ``--register`` never does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from masan.convert.nifti import NiftiError
from masan.convert.resample import as_stored

TYPES = ("none", "rigid", "affine", "syn")
"""``--register`` choices; ``none`` writes the store exactly as without registration."""
_ANTS_TYPES = {"rigid": "Rigid", "affine": "TRSAA", "syn": "SyN"}
"""antspyx's type per ``--register``: ``affine`` is TRSAA (translation, rigid, similarity, then
affine stages, one composite transform): a single affine stage from the centres of mass fell into
wrong fits on T1s with the neck in their field of view, where the rigid stages do not."""
TEMPLATES = ("mni152",)
"""``--template`` choices: the MNI152 T1 that :func:`masan.convert.template.load_template` loads."""
GROUP = "registration"
"""The subject version's group holding the transforms."""
ATTRS = "masan"
SEED = 20231
"""Fixed seed of ANTs' metric sampling (any nonzero value; recorded with the transforms)."""
METHOD = 1
"""Version of this procedure: raise it when what a registration stores changes, so that stores redo it."""
INTERPOLATION = "linear"
DEFAULT_VOXEL_MM = {"t1": 1.0, "fmri": 3.0}
"""Voxel size of the default grids (no ``--t1-shape``/``--fmri-shape``): 1 mm for T1, 3 mm for fMRI."""
GRID_MARGIN_MM = 4.0
"""Margin around the template's brain box on every side of a grid."""
MIN_TEMPLATE_CORRELATION = 0.7
"""A registered T1 less correlated with the template than this (over its brain) is a conversion
warning, and flagged by data_tools/qc_report.py (``--min-template-corr``)."""
MIN_BRAIN_DICE = 0.8
"""A registered fMRI mean whose brain overlaps the template's less than this (Dice) is a conversion
warning, and flagged by data_tools/qc_report.py (``--min-brain-dice``)."""
MAX_SESSION_MOTION = (20.0, 20.0)
"""(mm, degrees): a rigid fit of the fMRI mean to its own session's T1 that moves the run's centre
further, or turns it more, than the two scans of one session plausibly differ is a warning (a bad
T1 fit, or a header error in one of them)."""
WORSE_BY = 0.05
"""A registration that lowers a similarity by more than this is a conversion warning (resampling
alone blurs a little: a well registered image may score slightly below its header placement)."""
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_LPS = np.diag([-1.0, -1.0, 1.0])
_ORTHONORMAL_TOL = 1e-4


class RegistrationError(NiftiError):
    """A subject cannot be registered; the message names the file and what to do."""


# ============================================================================ settings and grids


def _template() -> Any:
    from masan.convert import template  # scipy and the template files: only registering conversions pay for them

    return template


def grid(modality: str, shape: tuple[int, int, int] | None) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, (4, 4) voxel -> MNI mm affine) of the template grid of ``modality`` (``t1``/``fmri``):
    ``shape`` when given, else the template's brain box (+ margin) at :data:`DEFAULT_VOXEL_MM`."""
    if shape is None:
        lo, hi = (np.asarray(c) for c in _template().load_template().bbox_mm)
        shape = tuple(int(n) for n in np.ceil((hi - lo + 2 * GRID_MARGIN_MM) / DEFAULT_VOXEL_MM[modality]))
    shape = tuple(int(n) for n in shape)
    return shape, _template().grid_affine(shape, GRID_MARGIN_MM)


@lru_cache(maxsize=8)
def _settings(kind: str, template: str, t1_shape: tuple | None, fmri_shape: tuple | None) -> str:
    grids = {m: grid(m, s) for m, s in (("t1", t1_shape), ("fmri", fmri_shape))}
    return json.dumps({
        "type": kind, "template": template, "template_name": _template().TEMPLATE_NAME,
        "t1_grid": {"shape": list(grids["t1"][0]), "affine": grids["t1"][1].tolist()},
        "fmri_grid": {"shape": list(grids["fmri"][0]), "affine": grids["fmri"][1].tolist()},
        "t1": f"ants.registration type_of_transform={_ANTS_TYPES[kind]} to the template T1 on the T1 grid",
        "fmri": "temporal mean rigidly to the subject's T1, composed with the T1's transforms",
        "interpolation": INTERPOLATION, "seed": SEED, "method": METHOD,
    })


def settings(kind: str, template: str, t1_shape: tuple | None, fmri_shape: tuple | None) -> dict:
    """What decides a registered store's bytes (JSON-ready; part of the conversion's fingerprint):
    ``type``, ``template`` (and its name), the ``t1_grid``/``fmri_grid`` (shape, affine in MNI mm),
    the procedure, ``interpolation``, ``seed``, ``method``. Raises RegistrationError for an
    unknown type or template."""
    if kind not in _ANTS_TYPES:
        raise RegistrationError(f"registration type {kind!r} is not one of {TYPES[1:]}")
    if template not in TEMPLATES:
        raise RegistrationError(f"template {template!r} is not one of {list(TEMPLATES)}")
    return json.loads(_settings(kind, template, None if t1_shape is None else tuple(t1_shape),
                                None if fmri_shape is None else tuple(fmri_shape)))


NOT_INSTALLED = "not installed"


def tool_version() -> str:
    """The installed antspyx version (recorded with each registration), or :data:`NOT_INSTALLED`."""
    try:
        return importlib.metadata.version("antspyx")
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def template_on_grid(template: str, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The template's T1 (float32, template units) and brain mask (bool), both ``shape`` (X, Y, Z),
    resampled onto the grid ``affine`` (voxel -> MNI mm) with partial-volume smoothing."""
    if template not in TEMPLATES:
        raise RegistrationError(f"template {template!r} is not one of {list(TEMPLATES)}")
    tpl = _template()
    voxel = tpl.voxel_size(affine)
    t1 = tpl.sample(tpl.prepared(("t1",), voxel), shape, affine)
    brain = tpl.sample(tpl.prepared(("brain",), voxel), shape, affine) > 0.5
    return t1, brain


# ============================================================================ ANTs plumbing


def set_threads(n: int) -> None:
    """ITK threads for this process's registrations. ITK reads the setting once, at its first
    use in a process: call this before any registration (conversion workers do, first thing)."""
    os.environ[THREADS_ENV] = str(max(1, int(n)))


def threads() -> int | None:
    """ITK threads this process asked for (:func:`set_threads`; None: ITK's default, the cores):
    1 means this subject's transforms are repeatable to the byte."""
    value = os.environ.get(THREADS_ENV)
    return int(value) if value and value.isdigit() else None


def _ants() -> Any:
    import ants  # seconds to import, and only registration needs it

    return ants


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """ANTs' fixed sampling seed for the calls inside; antspyx reads it from ``ants.config``
    (its ``set_ants_deterministic`` would also refuse every transform but the 'Repro' ones)."""
    cfg = _ants().config
    before = cfg._random_seed
    cfg._random_seed = SEED
    try:
        yield
    finally:
        cfg._random_seed = before


def to_ants(volume: np.ndarray, affine: np.ndarray, path: str | Path = "", tr: float | None = None) -> Any:
    """An ANTs image of ``volume`` ((X, Y, Z) or a series (X, Y, Z, T), float32) placed by the NIfTI
    ``affine`` (voxel -> RAS mm): ITK's LPS origin, spacing and direction. ``tr`` (s) spaces a
    series' frames. RegistrationError naming ``path`` when the affine has shear (ITK axes are
    orthogonal)."""
    m = _LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOL):
        raise RegistrationError(f"{path}: its affine has shear, which ANTs images cannot represent; resample "
                                "it onto an unsheared grid first (e.g. nibabel.processing.resample_to_output), "
                                "or convert without --register")
    origin = _LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    data = np.ascontiguousarray(volume, dtype=np.float32)
    if data.ndim == 4:
        d4 = np.eye(4)
        d4[:3, :3] = direction
        return _ants().from_numpy(data, origin=(*origin, 0.0), spacing=(*spacing, tr or 1.0), direction=d4)
    return _ants().from_numpy(data, origin=tuple(origin), spacing=tuple(spacing), direction=direction)


def ras_matrix(parameters: list[float], fixed_parameters: list[float]) -> np.ndarray:
    """(4, 4) RAS form of an ANTs ``AffineTransform`` (its 12 parameters: the 3x3 matrix row by row,
    then the translation; its fixed parameters: the centre), which maps points x -> A (x - c) + t + c
    in LPS mm."""
    a = np.asarray(parameters[:9], dtype=np.float64).reshape(3, 3)
    t, c = np.asarray(parameters[9:12], dtype=np.float64), np.asarray(fixed_parameters, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, t + c - a @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float | None:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (None when either is constant there)."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y / den) if den > 0 else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|a & b| / (|a| + |b|) of two boolean masks (0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 0.0


def _affine_record(path: str) -> dict:
    tx = _ants().read_transform(path)
    params, fixed = [float(v) for v in tx.parameters], [float(v) for v in tx.fixed_parameters]
    return {"ants_type": "AffineTransform", "parameters": params, "fixed_parameters": fixed,
            "matrix_ras": ras_matrix(params, fixed).tolist()}


def _warp_file(files: list[str], inverse: bool) -> str | None:
    suffix = "InverseWarp.nii.gz" if inverse else "Warp.nii.gz"
    found = [f for f in files if f.endswith(suffix) and (inverse or not f.endswith("InverseWarp.nii.gz"))]
    return found[0] if found else None


# ============================================================================ one subject


@dataclass
class SubjectRegistration:
    """Registers one subject: its T1 to the template (:meth:`t1`), then its fMRI to the T1
    (:meth:`fmri_prepare`, :meth:`fmri_frames`), and stores the transforms (:meth:`write`).

    ``workdir`` takes the files ANTs writes (transforms, warp fields): it lies inside the store's
    staging area, so it has the store's permissions, and the caller removes it. Values handed in
    and out are the file's stored values (float32 in, the file's dtype out), so the NIfTI
    scaling stays valid; outside the subject's field of view the stored value is 0 (as padding).
    """

    kind: str
    template: str
    t1_shape: tuple[int, int, int] | None
    fmri_shape: tuple[int, int, int] | None
    workdir: Path
    subject: str
    records: dict = field(default_factory=dict)
    """What :meth:`write` stores: ``t1_to_template`` and ``fmri_to_t1`` transform records."""
    warnings: list[str] = field(default_factory=list)
    """Registrations that left the image less like the template than its header had placed it."""
    _t1_image: Any = None
    _t1_files: list[str] = field(default_factory=list)
    _t1_inverse: list[str] = field(default_factory=list)
    _fmri: tuple | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def grid(self, modality: str) -> tuple[tuple[int, int, int], np.ndarray]:
        """(shape, affine) of this conversion's template grid of ``modality``."""
        return grid(modality, self.t1_shape if modality == "t1" else self.fmri_shape)

    def _register(self, fixed: Any, moving: Any, kind: str, prefix: str, path: str) -> dict:
        try:
            with _seeded():
                return _ants().registration(fixed, moving, type_of_transform=_ANTS_TYPES[kind],
                                            outprefix=str(self.workdir / prefix))
        except (RuntimeError, ValueError) as e:  # how antspyx reports ITK's failures (an exit code)
            raise RegistrationError(
                f"{path}: {_ANTS_TYPES[kind]} registration of subject {self.subject} failed ({type(e).__name__}: "
                f"{e}); check that the image is a brain (skull-stripped T1, whole-brain BOLD) with a sane header, "
                "or convert without --register") from e

    def t1(self, volume: np.ndarray, affine: np.ndarray, dtype: np.dtype, path: str) -> tuple[np.ndarray, dict]:
        """Register the T1 ((X, Y, Z) stored values, voxel -> RAS mm ``affine``) to the template;
        returns it on the T1 grid in ``dtype`` and the image's ``registration`` record
        (similarity before/after)."""
        shape, grid_aff = self.grid("t1")
        tpl, brain = template_on_grid(self.template, shape, grid_aff)
        fixed, moving = to_ants(tpl, grid_aff), to_ants(volume, affine, path)
        before = _ants().resample_image_to_target(moving, fixed, interp_type="linear").numpy()
        reg = self._register(fixed, moving, self.kind, "t1_", path)
        out = reg["warpedmovout"].numpy()
        after = correlation(out, tpl, brain)
        if after is None:
            raise RegistrationError(f"{path}: after {_ANTS_TYPES[self.kind]} registration subject {self.subject}'s "
                                    "T1 is blank over the template's brain (placed outside it); check the T1 "
                                    "(orientation, header, skull-stripped?) or convert without --register")
        self._t1_image, self._t1_files, self._t1_inverse = moving, list(reg["fwdtransforms"]), reg["invtransforms"]
        affines = [f for f in self._t1_files if f.endswith(".mat")]
        self.records["t1_to_template"] = {"affine": _affine_record(affines[0]),
                                          "warp": _warp_file(self._t1_files, False),
                                          "inverse_warp": _warp_file(list(self._t1_inverse), True)}
        sim = {"template_correlation": {"before": correlation(before, tpl, brain), "after": after,
                                        "over": "template brain voxels"}}
        self._check(path, "correlation with the template", sim["template_correlation"], MIN_TEMPLATE_CORRELATION)
        return as_stored(out, dtype), self._image_record(shape, sim)

    def fmri_prepare(self, mean: np.ndarray, affine: np.ndarray, tr: float | None, path: str) -> dict:
        """Register the run's temporal mean ((X, Y, Z), voxel -> RAS mm ``affine``) rigidly to the
        subject's T1 and compose every transform into one field on the fMRI grid; returns the
        image's ``registration`` record. Call after :meth:`t1`."""
        if self._t1_image is None:
            raise RegistrationError(f"{path}: the fMRI is registered through subject {self.subject}'s T1, which "
                                    "is missing; add the T1, or convert without --register")
        shape, grid_aff = self.grid("fmri")
        _, brain = template_on_grid(self.template, shape, grid_aff)
        target = to_ants(np.zeros(shape, np.float32), grid_aff)
        moving = to_ants(mean, affine, path)
        # the T1 at its own voxel size: brought down to the EPI's, the fit missed by millimetres
        reg = self._register(self._t1_image, moving, "rigid", "fmri_", path)
        chain = self._t1_files + list(reg["fwdtransforms"])
        field_file = _ants().apply_transforms(target, moving, chain, whichtoinvert=[False] * len(chain),
                                              compose=str(self.workdir / "fmri_to_template_"))
        self._fmri = (target, field_file, affine, tr)
        self.records["fmri_to_t1"] = {"affine": _affine_record(reg["fwdtransforms"][0])}
        self._check_session_motion(path, self.records["fmri_to_t1"]["affine"]["matrix_ras"], mean.shape, affine)
        before = _ants().resample_image_to_target(moving, target, interp_type="linear")
        after = self._apply(moving)
        sim = {"brain_dice": {"before": self._brain_dice(before, brain), "after": self._brain_dice(after, brain),
                              "over": "ants.get_mask of the fMRI mean vs the template's brain"}}
        self._check(path, "brain overlap (Dice) with the template", sim["brain_dice"], MIN_BRAIN_DICE)
        return self._image_record(shape, sim)

    def _check(self, path: str, what: str, similarity: dict, floor: float) -> None:
        """A warning when the registration left ``what`` under ``floor`` or lowered it (the
        subject is stored all the same: the QC report shows it, and the user decides)."""
        before, after = similarity["before"], similarity["after"]
        look = self._look()
        if after < floor:
            self.warnings.append(f"{path}: after registration the {what} is {after:.3f}, under {floor:g}: probably "
                                 f"a failed fit; {look}, and leave the subject out or fix its image if it is")
        elif before is not None and after < before - WORSE_BY:
            self.warnings.append(f"{path}: registration lowered the {what} from {before:.3f} (header placement) to "
                                 f"{after:.3f}; {look}")

    def _check_session_motion(self, path: str, matrix_ras: list, shape: tuple, affine: np.ndarray) -> None:
        m = np.asarray(matrix_ras, dtype=np.float64)
        centre = affine @ np.append((np.asarray(shape[:3], dtype=np.float64) - 1) / 2, 1.0)
        moved = float(np.linalg.norm(m @ centre - centre))
        turned = float(np.degrees(np.arccos(np.clip((np.trace(m[:3, :3]) - 1) / 2, -1.0, 1.0))))
        max_mm, max_deg = MAX_SESSION_MOTION
        if moved > max_mm or turned > max_deg:
            self.warnings.append(f"{path}: the fMRI's rigid fit to subject {self.subject}'s own T1 moves the run's "
                                 f"centre {moved:.0f} mm and turns it {turned:.0f} degrees (more than {max_mm:g} mm "
                                 f"or {max_deg:g} degrees within one session): a bad fit or a header error in the T1 "
                                 f"or the BOLD; {self._look()}")

    def _look(self) -> str:
        return f"look at subject {self.subject} in the QC report (data_tools/qc_report.py)"

    def _apply(self, image: Any, series: bool = False) -> Any:
        target, field_file, _, _ = self._fmri
        # single precision: a slab is the largest thing a worker holds, and values go back to the
        # file's type anyway
        return _ants().apply_transforms(target, image, [field_file], interpolator=INTERPOLATION,
                                        imagetype=3 if series else 0, whichtoinvert=[False], singleprecision=True)

    @staticmethod
    def _brain_dice(image: Any, brain: np.ndarray) -> float:
        if not image.numpy().any():
            return 0.0
        return dice(_ants().get_mask(image, cleanup=0).numpy() > 0, brain)

    def fmri_frames(self, slab: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """(X, Y, Z, n) stored values of consecutive frames -> (X', Y', Z', n) on the fMRI grid, in
        ``dtype`` (one ANTs call per slab)."""
        _, _, affine, tr = self._fmri
        out = self._apply(to_ants(slab, affine, tr=tr), series=True).numpy()
        return as_stored(out, dtype)

    def _image_record(self, shape: tuple[int, ...], similarity: dict) -> dict:
        return {"type": self.kind, "template": self.template, "grid_shape": list(shape),
                "interpolation": INTERPOLATION, "transforms": GROUP, **similarity}

    def write(self, parent: Any, compressors: Any) -> None:
        """The ``registration`` group in ``parent`` (a subject version): attributes ``masan``
        (type, template, seed, tool, ITK threads, the transform records with the ANTs affine parameters) and,
        for SyN, the T1 grid's warp fields ``t1_warp``/``t1_inverse_warp`` ((X, Y, Z, 3) float32,
        LPS mm displacements) with their CRC-32s."""
        group = parent.create_group(GROUP, overwrite=True)
        records = {k: dict(v) for k, v in self.records.items()}
        checksums = {}
        t1 = records.get("t1_to_template", {})
        for key, name in (("warp", "t1_warp"), ("inverse_warp", "t1_inverse_warp")):
            if t1.get(key):
                values = np.ascontiguousarray(_ants().image_read(t1[key]).numpy(), dtype=np.float32)
                arr = group.create_array(name, shape=values.shape, dtype="float32", chunks=values.shape,
                                         compressors=compressors, fill_value=0,
                                         dimension_names=["x", "y", "z", "vector"],
                                         config={"write_empty_chunks": True})
                arr[...] = values
                checksums[name] = f"{zlib.crc32(memoryview(values).cast('B')):08x}"
                t1[key] = name
        shape, grid_aff = self.grid("t1")
        group.update_attributes({ATTRS: {
            "type": self.kind, "template": self.template, "seed": SEED, "antspyx": tool_version(),
            "itk_threads": threads(),
            "t1_grid": {"shape": list(shape), "affine": grid_aff.tolist()}, **records, "checksum": checksums}})


# ============================================================================ reading back


def verify(group: Any) -> bool:
    """True when a subject's ``registration`` group is absent or its warp arrays match their CRC-32s."""
    if GROUP not in group:
        return True
    reg = group[GROUP]
    try:
        for name, crc in dict(reg.attrs)[ATTRS].get("checksum", {}).items():
            values = np.ascontiguousarray(reg[name][...])
            if f"{zlib.crc32(memoryview(values).cast('B')):08x}" != crc:
                return False
    except Exception:  # noqa: BLE001 - any read failure of damaged chunk files is "damaged"
        return False
    return True


def transform_files(group: Any, folder: str | Path) -> dict[str, list[str]]:
    """Write a subject's stored transforms as ANTs files into ``folder``; returns transform lists:

    - ``t1`` / ``fmri``: ``ants.apply_transforms(fixed=<grid image>, moving=<source T1 or fMRI frame>,
      transformlist=..., whichtoinvert=[False] * n)`` brings the source onto the template grid;
    - ``t1_inverse``: ``ants.apply_transforms(fixed=<source T1>, moving=<image on the T1 grid>,
      transformlist=..., whichtoinvert=[True] + [False] * (n - 1))`` brings template-space images
      (an atlas) onto the subject's T1 (ANTs' ``invtransforms`` order).

    ``group`` is the subject's version group (``CohortStore.group_path``). The files are the
    subject's medical data: write them where the store's permissions hold."""
    ants = _ants()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reg = group[GROUP]
    attrs = dict(reg.attrs)[ATTRS]

    def affine_file(record: dict, name: str) -> str:
        tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                        parameters=record["parameters"], fixed_parameters=record["fixed_parameters"])
        path = str(folder / name)
        ants.write_transform(tx, path)
        return path

    def warp_file(name: str) -> str:
        shape, grid_aff = tuple(attrs["t1_grid"]["shape"]), np.asarray(attrs["t1_grid"]["affine"])
        ref = to_ants(np.zeros(shape, np.float32), grid_aff)
        warp = ants.from_numpy(np.asarray(reg[name][...], dtype=np.float32), origin=ref.origin,
                               spacing=ref.spacing, direction=ref.direction, has_components=True)
        path = str(folder / f"t1_to_template_{name.removeprefix('t1_')}.nii.gz")
        ants.image_write(warp, path)
        return path

    t1 = attrs["t1_to_template"]
    affine = affine_file(t1["affine"], "t1_to_template_affine.mat")
    out = {"t1": [affine], "t1_inverse": [affine]}
    if t1.get("warp"):
        out["t1"].insert(0, warp_file(t1["warp"]))
        out["t1_inverse"].append(warp_file(t1["inverse_warp"]))
    if "fmri_to_t1" in attrs:
        out["fmri"] = out["t1"] + [affine_file(attrs["fmri_to_t1"]["affine"], "fmri_to_t1_affine.mat")]
    return out
