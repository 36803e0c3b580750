"""Checked cohort -> Zarr v3 cohort store (the library behind ``data_tools/to_zarr.py``).

Steps, each a function:

1. :mod:`masan.convert.sources` lists the subjects (:func:`discover_bids` / :func:`read_manifest`)
   and checks them (:func:`check_sources`: labels, ids, files), per subject.
2. :func:`convert_subject` writes one subject into ``STORE/.staging/<id>.<v>``, each modality
   a NIfTI-Zarr image (:mod:`masan.store.nifti_zarr`; T1 whole, fMRI in frame slabs of one
   shard each) as the file has it or, with ``register``, resampled onto the template's grids
   (:mod:`masan.convert.registration`, transforms kept beside), re-reads and checksums it, then
   publishes it as a new version folder ``STORE/subjects/<id>/<v>`` with one rename
   (:mod:`masan.store.publish`).
3. :func:`convert_cohort` runs 2 over worker processes with a progress bar, skips subjects
   whose sources and options are unchanged, redoes half-written or changed ones, points the
   cohort table (root attributes) at each new version before the old one is removed, and
   always writes ``conversion_report.json``. Subjects leave the store only with ``prune``.

Store safety (locking, versions, permissions) and layout: docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from masan import access
from masan.convert import nifti, registration, resample
from masan.convert.sources import (  # noqa: F401  (re-exported: the converter's public API)
    DEFAULT_CLASSES,
    FMRI_SIDECAR,
    ConvertError,
    Failure,
    Job,
    SubjectSource,
    check_sources,
    discover_bids,
    parse_label_map,
    planted_effect,
    read_manifest,
)
from masan.files import atomic_write_json
from masan.store import nifti_zarr, permissions, places, publish
from masan.store.cohort import FORMAT, FORMAT_VERSION, MODALITIES, REPORT, STAGING, SUBJECTS, TRASH, StrictLocalStore
from masan.store.permissions import StoreAccess

SOURCE_HASH_BLOCK = 1 << 22
TR_SUSPECT_SECONDS = 20.0
"""A TR above this is a unit error (headers often hold ms with the unit 'sec'): not stored as a TR."""


@dataclass
class ConvertOptions:
    """How voxels are laid out in the store. Changing any of these reconverts every subject."""

    canonical: bool = False
    """Reorient every image to RAS+ (voxels permuted/flipped, affine adjusted). The command
    line does it by default (``--keep-orientation`` opts out)."""
    spacing: tuple[float, float] | None = None
    """Resample every image onto an isotropic RAS grid of (T1 mm, fMRI mm) over its field of
    view (:mod:`masan.convert.resample`), then centre it into ``t1_shape``/``fmri_shape``; 0 for a
    modality: the cohort's most common voxel size (chosen by :func:`convert_cohort`). None:
    the file's voxels (a cohort of several voxel sizes then breaks the training contract)."""
    t1_shape: tuple[int, int, int] | None = None
    """Centre crop/pad T1 to this (X, Y, Z) (the paper: 240 256 176); None keeps it. With
    ``register``: the shape of the template grid (None: ``registration.DEFAULT_VOXEL_MM``)."""
    fmri_shape: tuple[int, int, int] | None = None
    """Centre crop/pad each fMRI frame to this (the paper: 60 64 44); None keeps it. With
    ``register``: the shape of the template grid, as ``t1_shape``."""
    patch_grid: tuple[int, int, int] = (4, 4, 4)
    """T1 chunk = one cell of this grid (shape // grid), so a patch read touches one chunk."""
    fmri_chunk_frames: int = 16
    """fMRI chunk = this many whole frames."""
    fmri_shard_frames: int = 128
    """fMRI shard (one file) = this many frames; also the streaming slab (memory bound)."""
    codec: str = "lz4hc"
    """Blosc compressor: lz4hc (default: decodes faster than zstd for a few percent more bytes,
    which the read target needs; docs/data-format.md, "Chunks, shards, codec"), zstd, lz4,
    blosclz, zlib."""
    clevel: int = 5
    """0-9."""
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "bitshuffle"
    levels: int = 1
    """Resolution levels per image: 1 is level 0 only (what training reads); each further
    level halves X, Y, Z (2x2x2 means, per frame) for OME-Zarr viewers."""
    nan: Literal["error", "zero"] = "error"
    """NaN voxels: ``error`` rejects the subject, ``zero`` stores 0 and records the count."""
    require: tuple[str, ...] = ("t1", "fmri")
    """Modalities every subject must have; a subject missing one fails."""
    register: Literal["none", "rigid", "affine", "syn"] = "none"
    """Spatial normalisation (:mod:`masan.convert.registration`): ``none`` stores the file's voxels;
    otherwise each T1 is registered to ``template`` with ANTs and resampled onto the template
    grid of ``t1_shape`` (then a template-grid shape, not a crop/pad; ``canonical`` has no
    effect), each fMRI through its mean's rigid fit to the T1 onto the grid of ``fmri_shape``."""
    template: str = "mni152"
    """Registration template (``registration.TEMPLATES``)."""
    allow_unlabeled: bool = False
    """Store subjects without a diagnosis (label null) for prediction; training leaves them out.
    Not in the fingerprint: it decides which subjects are converted, not their bytes."""
    threads: int | None = None
    """ITK threads per worker when registering (None: the usable cores over the workers). Not
    in the fingerprint: more than one only makes reruns differ by fractions of a millimetre."""

    def __post_init__(self) -> None:
        if self.fmri_shard_frames % self.fmri_chunk_frames:
            raise ConvertError(f"fmri_shard_frames ({self.fmri_shard_frames}) must be a multiple of "
                               f"fmri_chunk_frames ({self.fmri_chunk_frames})")
        if self.levels < 1:
            raise ConvertError(f"levels must be 1 or more (1: full resolution only), got {self.levels}")
        bad = set(self.require) - set(MODALITIES)
        if bad or not self.require:
            raise ConvertError(f"require must name some of {MODALITIES}, got {self.require}")
        for name in ("t1_shape", "fmri_shape", "patch_grid"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or min(v) < 1):
                raise ConvertError(f"{name} must be three positive integers, got {v}")
        if self.register not in registration.TYPES:
            raise ConvertError(f"register must be one of {registration.TYPES}, got {self.register!r}")
        if self.template not in registration.TEMPLATES:
            raise ConvertError(f"template must be one of {registration.TEMPLATES}, got {self.template!r}")
        if self.register != "none" and registration.tool_version() == registration.NOT_INSTALLED:
            raise ConvertError(f"--register {self.register} needs ANTs' Python package: pip install antspyx "
                               "(or convert without --register)")
        if self.spacing is not None and (len(self.spacing) != 2 or min(self.spacing) < 0):
            raise ConvertError(f"spacing must be (T1 mm, fMRI mm), 0 for the cohort's most common, got {self.spacing}")
        if self.spacing is not None and self.register != "none":
            raise ConvertError("--spacing and --register both set the grid; with --register the template grid "
                               "decides (drop --spacing)")
        if self.threads is not None and self.threads < 1:
            raise ConvertError(f"threads must be 1 or more, got {self.threads}")

    def registration_settings(self) -> dict | None:
        """The registration settings (``registration.settings``; the root attribute
        ``registration``), None without registration."""
        if self.register == "none":
            return None
        return registration.settings(self.register, self.template, self.t1_shape, self.fmri_shape)

    def fingerprint(self) -> dict:
        """Options that decide the stored bytes (a subject converted otherwise is redone).
        Without registration it is what it was before registration existed, so such stores
        are not redone."""
        d = asdict(self)
        for key in ("require", "register", "template", "threads", "allow_unlabeled"):
            d.pop(key)
        if self.spacing is None:  # stores from before resampling existed keep their fingerprint
            d.pop("spacing")
        if self.register != "none":
            d["registration"] = self.registration_settings()
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d))


@dataclass
class Report:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Subjects taken out of the store (only with ``prune``)."""
    kept: list[str] = field(default_factory=list)
    """Subjects still in the store from an earlier run although this run did not (re)convert
    them (unlisted, source missing, or failing now); ``prune`` would remove them."""
    failed: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    access: str = ""
    """Permissions the store was given (e.g. ``files 600, folders 700``)."""
    aborted: str | None = None
    """Set when the run stopped early (the error); the report is written anyway."""
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["failed"] = [asdict(f) for f in self.failed]
        return d


# ====================================================================== one subject


def source_record(path: str) -> dict:
    """Path, size, mtime and sha256 of a source file (for skip decisions and provenance)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(SOURCE_HASH_BLOCK):
            h.update(block)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _chunking(modality: str, shape: tuple[int, ...], opts: ConvertOptions) -> tuple[tuple, tuple]:
    if modality == "t1":
        chunks = tuple(max(n // g, 1) for n, g in zip(shape, opts.patch_grid))
        shards = tuple(-(-n // c) * c for n, c in zip(shape, chunks))
        return chunks, shards
    t = shape[0]
    chunk_t = min(opts.fmri_chunk_frames, t)
    shard_t = min(opts.fmri_shard_frames, -(-t // chunk_t) * chunk_t)
    return (chunk_t,) + tuple(shape[1:]), (shard_t,) + tuple(shape[1:])


class _Stats:
    """Streaming count, sum and sum of squares of the nonzero stored values (float64).

    Zeros add nothing to either sum, so no masking is needed. Each block's sums are exact
    for integer voxels (they stay below 2**53); the running totals are float64.
    """

    BLOCK = 1 << 20

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        for i in range(0, flat.size, self.BLOCK):
            part = flat[i:i + self.BLOCK]
            x = part.astype(np.float64)
            self.n += int(np.count_nonzero(part))
            self.s1 += float(x.sum())
            self.s2 += float(x @ x)

    @property
    def mean(self) -> float:
        return self.s1 / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        return max(self.s2 / self.n - self.mean ** 2, 0.0) if self.n else 0.0

    def scaled(self, slope: float, inter: float, path: str, warn: list[str]) -> dict:
        """Mean/std of the scaled values; a blank or constant image (a mask) gets std 1 and a warning."""
        std = abs(slope) * self.var ** 0.5
        if std == 0:
            warn.append(f"{path}: {'every voxel is 0' if not self.n else 'all nonzero voxels have one value'}; "
                        "normalisation uses std 1 (is it the right file?)")
        return {"mean": slope * self.mean + inter if self.n else inter, "std": std or 1.0, "count": self.n,
                "over": "nonzero stored voxels"}


def _check_finite(slab: np.ndarray, nan: str, path: str, t0: int) -> tuple[int, np.ndarray]:
    """Inf is always an error; NaN per policy. Returns the NaN count and the slab (NaN -> 0)."""
    if slab.dtype.kind != "f":
        return 0, slab
    bad = ~np.isfinite(slab)
    if not bad.any():
        return 0, slab
    nans = np.isnan(slab)
    n_nan, n_inf = int(nans.sum()), int(bad.sum() - nans.sum())
    where = f" (from frame {t0})" if slab.shape[3] > 1 or t0 else ""
    if n_inf:
        raise nifti.NiftiError(f"{path}: {n_inf} voxels are +-Inf{where}; the file is corrupt, re-export it")
    if nan == "error":
        raise nifti.NiftiError(f"{path}: {n_nan} of {slab.size} voxels are NaN{where} (usual in the "
                               "background of resampled images); rerun with --nan zero to store them as 0")
    slab = slab.copy() if not slab.flags.writeable else slab
    slab[nans] = 0
    return n_nan, slab


class _Source:
    """A NIfTI file's stored values as ``(t0, (X, Y, Z, n))`` slabs, NaN/Inf checked per ``--nan``
    (:func:`_check_finite`); ``nans`` counts the NaN voxels stored as 0 by the counted passes."""

    def __init__(self, img: Any, path: str, nan: str):
        self.img, self.path, self.nan, self.nans = img, path, nan, 0

    def slabs(self, frames: int, count: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        for t0, slab in nifti.iter_frame_slabs(self.img, frames, self.path):
            nans, slab = _check_finite(slab, self.nan, self.path, t0)
            self.nans += nans if count else 0
            yield t0, slab


@dataclass
class _Placement:
    """Where a source's voxels go in the store: the stored (X, Y, Z) ``space``, its voxel -> world
    (mm) ``affine``, binary NIfTI ``header``, the image's ``transform`` record (and ``registration``
    record when registered), the header facts for the OME metadata, and ``slabs(n)``: the stored
    values ``(t0, (X, Y, Z, n))``, n frames at a time."""

    space: tuple[int, int, int]
    affine: np.ndarray
    header: bytes
    transform: dict
    ome_info: dict
    slabs: Callable[[int], Iterator[tuple[int, np.ndarray]]]
    registration: dict | None = None


def _as_in_file(img: Any, shape: tuple[int, ...], modality: str, info: dict, source: _Source,
                opts: ConvertOptions) -> _Placement:
    """The file's voxels, reoriented (``canonical``) and centre cropped/padded (``t1_shape``/``fmri_shape``)."""
    plan = nifti.SpatialPlan.make(img.affine, shape, opts.canonical, opts.t1_shape if modality == "t1"
                                  else opts.fmri_shape)

    def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
        for t0, slab in source.slabs(frames):
            yield t0, plan.apply(slab)

    header = nifti.stored_header(img, plan, plan.out_shape + tuple(shape[3:]))
    return _Placement(plan.out_shape, plan.affine, header, plan.record(), info, slabs)


def _registered(img: Any, shape: tuple[int, ...], modality: str, info: dict, source: _Source,
                opts: ConvertOptions, reg: registration.SubjectRegistration) -> _Placement:
    """The voxels resampled onto the template grid (:mod:`masan.convert.registration`). The T1 is
    registered here; an fMRI file is read twice: once for its temporal mean (registered to the
    T1), then frame slab by frame slab through the composed transforms."""
    dtype = img.header.get_data_dtype().newbyteorder("=")
    space, affine = reg.grid(modality)
    if modality == "t1":
        (_, volume), = source.slabs(1)
        volume, record = reg.t1(volume[..., 0].astype(np.float32), img.affine, dtype, source.path)

        def slabs(_frames: int) -> Iterator[tuple[int, np.ndarray]]:
            yield 0, volume[..., None]
    else:
        total = np.zeros(shape[:3], dtype=np.float64)
        for _, slab in source.slabs(opts.fmri_shard_frames, count=False):
            total += slab.sum(axis=3, dtype=np.float64)
        record = reg.fmri_prepare((total / shape[3]).astype(np.float32), img.affine, info["tr_seconds"], source.path)

        def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
            for t0, slab in source.slabs(frames):
                yield t0, reg.fmri_frames(slab.astype(np.float32), dtype)

    voxel = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).max())
    ome_info = {**info, "zooms": [voxel] * 3 + info["zooms"][3:], "space_unit": "mm"}
    transform = {"registered_to": reg.template, "in_shape": list(shape[:3]), "out_shape": list(space), "pad_value": 0}
    header = resample.grid_header(img, affine, space + tuple(shape[3:]), "mni")
    return _Placement(space, affine, header, transform, ome_info, slabs, record)


def _resampled(img: Any, shape: tuple[int, ...], modality: str, info: dict, source: _Source,
               opts: ConvertOptions) -> _Placement:
    """The voxels resampled onto the RAS grid of ``opts.spacing`` over the file's field of view
    (:mod:`masan.convert.resample`), centred into ``t1_shape``/``fmri_shape`` when given."""
    mm = opts.spacing[0 if modality == "t1" else 1]
    space, affine = resample.target_grid(img.affine, shape, mm, opts.t1_shape if modality == "t1" else opts.fmri_shape)
    dtype = img.header.get_data_dtype().newbyteorder("=")

    def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
        for t0, slab in source.slabs(frames):
            yield t0, resample.resample(slab, img.affine, space, affine, dtype)

    ome_info = {**info, "zooms": [mm] * 3 + info["zooms"][3:], "space_unit": "mm"}
    transform = {"resampled_to_mm": mm, "reoriented_to": "RAS", "interpolation": "linear",
                 "in_shape": list(shape[:3]), "in_voxel_mm": list(resample.voxel_size(img.affine)),
                 "out_shape": list(space), "pad_value": 0}
    code = "scanner" if int(img.header["sform_code"] or img.header["qform_code"]) == 1 else "aligned"
    header = resample.grid_header(img, affine, space + tuple(shape[3:]), code)
    return _Placement(space, affine, header, transform, ome_info, slabs)


def _codec(opts: ConvertOptions) -> BloscCodec:
    return BloscCodec(cname=opts.codec, clevel=opts.clevel, shuffle=opts.shuffle)


def repetition_time(info: dict, path: str, sidecar: str | None, warn: list[str]) -> tuple[float | None, str | None]:
    """(TR in seconds, where it came from: ``sidecar`` or ``header``) of a BOLD run.

    BIDS makes the sidecar's ``RepetitionTime`` (seconds) authoritative; a header that
    disagrees is a warning. A TR above :data:`TR_SUSPECT_SECONDS` is a unit error (milliseconds
    written as seconds): in a sidecar it fails the subject, in a header the run is stored
    without a TR (None) and a warning names the fix, rather than storing a wrong duration."""
    header = info["tr_seconds"]
    if sidecar is not None:
        try:
            value = json.loads(Path(sidecar).read_text(encoding="utf-8-sig")).get("RepetitionTime")
        except (OSError, ValueError) as e:
            raise nifti.NiftiError(f"{sidecar}: cannot read the BOLD sidecar ({e}); fix or remove it") from None
        if value is not None:
            if not isinstance(value, (int, float)) or not 0 < value <= TR_SUSPECT_SECONDS:
                raise nifti.NiftiError(f"{sidecar}: RepetitionTime {value!r} is not a TR in seconds (BIDS: seconds, "
                                       "e.g. 0.8 for 800 ms); fix the sidecar")
            if header and not math.isclose(header, value, rel_tol=0.01):
                warn.append(f"{path}: header TR {header:g} s, sidecar {sidecar} {value:g} s; used the sidecar's "
                            "(BIDS: the sidecar is authoritative)")
            return float(value), "sidecar"
    if header is not None and header > TR_SUSPECT_SECONDS:
        warn.append(f"{path}: header TR {header:g} s ({info['zooms'][3]:g} {info['time_unit']}) is a unit error "
                    "(milliseconds?); stored without a TR: give RepetitionTime in seconds in the run's JSON "
                    "sidecar (BIDS) and convert again")
        return None, None
    if header is None:
        warn.append(f"{path}: no TR in the header or a JSON sidecar; stored without one (add RepetitionTime, in "
                    "seconds, to the run's sidecar)")
    return header, None if header is None else "header"


def _write_modality(group: Any, modality: str, path: str, opts: ConvertOptions, warn: list[str],
                    reg: registration.SubjectRegistration | None = None, sidecar: str | None = None) -> dict:
    """Stream one NIfTI file into the NIfTI-Zarr image ``group[modality]`` (registered onto the
    template grid when ``reg`` is given); returns its table entry. ``sidecar``: the fMRI run's
    BIDS JSON (its TR wins over the header's)."""
    img = nifti.open_image(path)
    shape = nifti.data_shape(img, 3 if modality == "t1" else 4, path)
    info = nifti.describe(img)
    source = _Source(img, path, opts.nan)
    if reg is not None:
        place = _registered(img, shape, modality, info, source, opts, reg)
    elif opts.spacing is not None:
        place = _resampled(img, shape, modality, info, source, opts)
    else:
        place = _as_in_file(img, shape, modality, info, source, opts)
    frames = 1 if modality == "t1" else shape[3]
    out_shape = place.space if modality == "t1" else (frames,) + place.space
    dtype = img.header.get_data_dtype().newbyteorder("=")
    chunks, shards = _chunking(modality, out_shape, opts)
    image = nifti_zarr.ImageWriter(group, modality, out_shape, dtype, chunks, shards, _codec(opts), opts.levels,
                                   place.header, place.ome_info)
    stats = _Stats()
    for t0, out in place.slabs(shards[0] if modality == "fmri" else 1):  # (X', Y', Z', n)
        out = np.ascontiguousarray(out[..., 0] if modality == "t1" else np.moveaxis(out, 3, 0))
        stats.add(out)
        image.write(t0, out)
    if source.nans:
        warn.append(f"{path}: {source.nans} NaN voxels stored as 0 (--nan zero)")
    if modality == "fmri" and frames == 1:
        warn.append(f"{path}: the fMRI run has a single frame (no time course); stored as is, "
                    "check that the right BOLD file is listed")
    tr, tr_source = repetition_time(info, path, sidecar, warn) if modality == "fmri" else (None, None)
    checksum = image.checksums()
    attrs = {
        "nifti": info,
        "affine": place.affine.tolist(),
        "transform": place.transform,
        "stats": stats.scaled(info["scl_slope"], info["scl_inter"], path, warn),
        "checksum": checksum,
        "nan_replaced": source.nans,
    }
    if modality == "fmri":
        attrs["tr_seconds"], attrs["tr_source"] = tr, tr_source
    if place.registration is not None:
        attrs["registration"] = place.registration
    image.finish(attrs)
    # the stored geometry in the table too, so the training contract reads one JSON, not every image's
    return {"shape": list(out_shape), "dtype": dtype.str, "tr_seconds": tr, "checksum": checksum["crc32"],
            "voxel_mm": list(resample.voxel_size(place.affine)), "axcodes": "".join(nib.aff2axcodes(place.affine))}


def verify_group(group: Any, slab_frames: int = ConvertOptions.fmri_shard_frames) -> list[str]:
    """Re-read every image of a subject group (every level; fMRI ``slab_frames`` at a time);
    list the modalities (and ``registration``, the stored transforms) whose values differ from
    the checksums recorded at conversion."""
    bad = [m for m in MODALITIES if m in group and not nifti_zarr.verify(group[m], slab_frames)]
    return bad + ([] if registration.verify(group) else [registration.GROUP])


def _strict(folder: Path) -> Any:
    """A subject group opened read-only so that a missing chunk file raises (verification)."""
    return zarr.open_group(StrictLocalStore(folder, read_only=True), mode="r")


def convert_subject(job: Job, store: str, opts: ConvertOptions) -> dict:
    """Write, verify and publish one subject. Returns a result dict for :func:`convert_cohort`:
    ``{"subject", "ok": True, "row", "warnings"}`` or ``{"subject", "ok": False, "failure"}``."""
    root = Path(store)
    version = publish.new_version()
    staging = root / STAGING / f"{job.subject}.{version}"
    warn: list[str] = []
    current = None
    reg = None
    try:
        group = zarr.open_group(LocalStore(staging), mode="w")  # writing: a partial shard write reads absent shards
        if opts.register != "none":
            registration.set_threads(opts.threads or 1)
            # ANTs writes its transforms as files: beside the staged subject, under the store's
            # permissions, and removed with it
            reg = registration.SubjectRegistration(opts.register, opts.template, opts.t1_shape, opts.fmri_shape,
                                                   staging.with_name(staging.name + ".ants"), job.subject)
        row: dict[str, Any] = {"subject": job.subject, "label": job.label}
        sources = {}
        for modality in MODALITIES:
            current = job.sources.get(modality)
            row[modality] = None
            if current is None:
                continue
            sources[modality] = source_record(current)
            sidecar = job.sources.get(FMRI_SIDECAR) if modality == "fmri" else None
            if sidecar is not None:
                sources[FMRI_SIDECAR] = source_record(sidecar)
            entry = _write_modality(group, modality, current, opts, warn, reg, sidecar)
            entry["source"], entry["sha256"] = current, sources[modality]["sha256"]
            row[modality] = entry
        current = None
        if reg is not None:
            reg.write(group, _codec(opts))
            warn.extend(reg.warnings)
        bad = verify_group(_strict(staging), opts.fmri_shard_frames)
        if bad:
            raise OSError(f"re-read of {bad} after writing did not match (disk full or failing?); rerun")
        group.update_attributes({"subject": job.subject, "sources": sources, "options": opts.fingerprint(),
                                 "row": row, "complete": True})
        row["group"] = publish.publish_version(root, job.subject, staging, version)
        return {"subject": job.subject, "ok": True, "row": row, "warnings": warn + job.notes}
    except Exception as e:  # noqa: BLE001 - any failure fails this subject only, reported with its file
        shutil.rmtree(staging, ignore_errors=True)
        msg = str(e) if isinstance(e, nifti.NiftiError) else f"{type(e).__name__}: {e}"
        return {"subject": job.subject, "ok": False, "failure": asdict(Failure(job.subject, current, msg))}
    finally:
        if reg is not None:
            shutil.rmtree(reg.workdir, ignore_errors=True)


# ====================================================================== the cohort


def _published(root: Any, subject: str, row: dict | None) -> tuple[str, dict] | None:
    """(group key, attributes) of the version the table row points at, if complete."""
    if row is None:
        return None
    key = row.get("group") or f"{SUBJECTS}/{subject}"
    try:
        attrs = dict(root[key].attrs)
    except (KeyError, FileNotFoundError):
        return None
    return (key, attrs) if attrs.get("complete") else None


def _unchanged(job: Job, attrs: dict, opts: ConvertOptions) -> bool:
    """True when the published subject was made from these very files with these options."""
    if attrs.get("options") != opts.fingerprint():
        return False
    recorded = attrs.get("sources", {})
    if set(recorded) != set(job.sources):
        return False
    for modality, path in job.sources.items():
        rec = recorded[modality]
        st = os.stat(path)
        if (rec["path"], rec["size"], rec["mtime_ns"]) != (path, st.st_size, st.st_mtime_ns):
            if rec["size"] != st.st_size or source_record(path)["sha256"] != rec["sha256"]:
                return False
    return True


def _chosen_spacing(opts: ConvertOptions, jobs: list[Job]) -> tuple[ConvertOptions, list[str]]:
    """``opts`` with a spacing of 0 (a modality's "the cohort's most common") replaced by that
    voxel size, read from the files' headers; and a note saying what was chosen."""
    if opts.spacing is None or min(opts.spacing) > 0:
        return opts, []
    spacing, notes = list(opts.spacing), []
    for i, modality in enumerate(("t1", "fmri")):
        if spacing[i] > 0:
            continue
        sizes = []
        for job in jobs:
            if modality in job.sources:
                try:
                    sizes.append(resample.voxel_size(nifti.open_image(job.sources[modality]).affine))
                except (OSError, ValueError):  # the subject fails with its own message when converted
                    continue
        spacing[i] = resample.common_spacing(sizes) if sizes else 1.0
        notes.append(f"--spacing: {modality} resampled to {spacing[i]:g} mm, the cohort's most common voxel size "
                     f"({len(set(sizes))} different sizes among {len(sizes)} files)")
    return replace(opts, spacing=(spacing[0], spacing[1])), notes


def _check_store_or_empty(path: Path) -> None:
    """ConvertError unless ``path`` is absent, empty (but for lock files) or a Zarr group."""
    if (path.is_dir() and not (path / "zarr.json").is_file()
            and any(p.name not in publish.LOCK_FILES for p in path.iterdir())):
        raise ConvertError(f"{path} exists and is not a cohort store; choose another --out or empty it")


def _open_root(path: Path) -> Any:
    """The store's root group; a new one is created without deleting anything (zarr's
    ``mode="w"`` would delete the lock file just taken)."""
    _check_store_or_empty(path)
    if (path / "zarr.json").is_file():
        root = zarr.open_group(LocalStore(path), mode="r+")
        if dict(root.attrs).get("masan_store", {}).get("format") != FORMAT:
            raise ConvertError(f"{path} is a Zarr group but not a MASAN cohort store; choose another --out")
    else:
        root = zarr.create_group(LocalStore(path), overwrite=False,
                                 attributes={"masan_store": {"format": FORMAT, "version": FORMAT_VERSION}})
    if SUBJECTS not in root:
        root.create_group(SUBJECTS)
    return root


def _check_places(out: Path) -> None:
    """Refuse a store inside a training run directory or holding one: the conversion prunes
    what it does not know, and training writes checkpoints where it runs."""
    run = places.enclosing(out, places.is_run_dir)
    if run is not None:
        raise ConvertError(f"--out {out} is inside the training run directory {run} (it has a MASAN "
                           "config.yaml); put the store outside run directories")
    if out.is_dir():
        inside = places.nested_inside(out, places.is_run_dir)
        if inside:
            raise ConvertError(f"{inside[0]} is a training run directory (config.yaml, checkpoints/) inside the "
                               f"store {out}; move it out of the store (a conversion may remove it) and rerun")


def convert_cohort(sources: list[SubjectSource], out: str | Path, options: ConvertOptions | None = None,
                   classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES, label_map: str | None = None,
                   workers: int = 1, verify: bool = False, extra_attrs: dict | None = None,
                   progress: bool = True, prune: bool = False, share: StoreAccess | None = None) -> Report:
    """Convert a cohort into the store at ``out`` (created or updated in place).

    Subjects already published from unchanged sources with the same options are skipped
    (``verify`` re-reads them and redoes any whose checksum differs). Every failure is per
    subject. Subjects the input no longer lists, whose source is missing or that fail now
    keep their earlier conversion (reported as ``kept``) unless ``prune``. The store gets
    the sources' most restrictive permissions unless ``share`` says otherwise. The report
    is returned, always stored in ``STORE/conversion_report.json`` and summarised in the root
    attrs. Raises ConvertError (nothing changed) for unusable inputs, a locked store, an
    input listing no subject, or a store/run-directory nesting.
    """
    opts = options or ConvertOptions()
    classes = tuple(classes)
    mapping = parse_label_map(label_map, classes)
    out = Path(out)
    if not sources:
        raise ConvertError(f"the input lists no subject; {out} was left as it is (check the manifest rows or "
                           "participants.tsv; to empty a store, delete it)")
    _check_places(out)
    _check_store_or_empty(out)  # before the lock files are created in someone else's folder
    start = time.monotonic()
    jobs, failed = check_sources(sources, mapping, opts.require, opts.allow_unlabeled)
    opts, chosen = _chosen_spacing(opts, jobs)
    mode, gid, chosen_by = permissions.target_access(out, [Path(p) for j in jobs for p in j.sources.values()],
                                                         share or StoreAccess())
    with access.creation_umask(mode):
        out.mkdir(parents=True, exist_ok=True)
        try:
            with publish.StoreLock(out):
                root = _open_root(out)
                report = Report(failed=failed, warnings=chosen)
                try:
                    _convert_locked(root, out, jobs, opts, classes, workers, verify, progress, prune, report,
                                    (mode, gid, chosen_by), extra_attrs)
                except BaseException as e:
                    report.aborted = f"{type(e).__name__}: {e}"
                    raise
                finally:  # the report is written whatever happened (a crash says where it stopped)
                    report.seconds = time.monotonic() - start
                    atomic_write_json(out / REPORT, report.to_json())
        except publish.LockError as e:
            raise ConvertError(str(e)) from None
    return report


def _convert_locked(root: Any, out: Path, jobs: list[Job], opts: ConvertOptions, classes: tuple[str, ...],
                    workers: int, verify: bool, progress: bool, prune: bool, report: Report,
                    perms: tuple[int, int | None, str], extra_attrs: dict | None) -> None:
    """The conversion proper, under the store lock (see :func:`convert_cohort`)."""
    mode, gid, chosen_by = perms
    loose = access.more_open_than(out, mode, gid)
    if loose:
        report.warnings.append(
            f"{out}: {len(loose)} path(s) were more open than the sources allow ({access.describe_mode(mode, gid)}), "
            f"e.g. {', '.join(map(str, loose[:3]))}; tightened (pass --mode/--group to share on purpose)")
    mode, gid = access.apply_access(out, mode, gid)
    report.access = access.describe_mode(mode, gid)
    extra = {**(extra_attrs or {}), "access": {"file_mode": f"{mode:03o}", "gid": gid, "chosen_by": chosen_by}}
    for leftover in (STAGING, TRASH):  # half-written subjects of an interrupted run
        shutil.rmtree(out / leftover, ignore_errors=True)
    # The table keeps every published subject until a new version replaces it: readers never
    # see a subject vanish while it is reconverted.
    rows: dict[str, dict] = {r["subject"]: r for r in dict(root.attrs).get("cohort", [])}
    publish.drop_unreferenced(out, rows)
    todo = []
    for job in jobs:
        found = _published(root, job.subject, rows.get(job.subject))
        redo = not found or not _unchanged(job, found[1], opts)
        if not redo and verify:
            redo = _verify_published(root, found[0], job.subject, opts, report)
        if not redo:
            row = dict(found[1]["row"], label=job.label)
            if rows[job.subject].get("group"):
                row["group"] = found[0]
            for modality in MODALITIES:  # the same files may have moved
                if modality in job.sources:
                    row[modality] = dict(row[modality], source=job.sources[modality])
            rows[job.subject] = row
            report.skipped.append(job.subject)
        else:
            todo.append(job)

    def record(result: dict) -> None:
        if result["ok"]:
            subject = result["subject"]
            rows[subject] = result["row"]
            report.converted.append(subject)
            report.warnings.extend(f"{subject}: {w}" for w in result["warnings"])
            _write_table(root, rows, classes, opts, extra)
            publish.drop_versions(out, subject, keep=result["row"]["group"])  # only now unreferenced
        else:
            report.failed.append(Failure(**result["failure"]))

    def died(job: Job, why: str) -> None:
        report.failed.append(Failure(job.subject, None, f"{why}; rerun to retry it"))

    _write_table(root, rows, classes, opts, extra)
    if opts.register != "none" and opts.threads is None:  # N workers x M ITK threads within the cores we may use
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        opts = replace(opts, threads=max(1, cores // max(1, min(workers, len(todo)))))
    bar = tqdm(total=len(todo), desc=f"to_zarr {out.name}", unit="subject", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            record(convert_subject(job, str(out), opts))
            bar.update()
    else:
        publish.run_pool(todo, convert_subject, (str(out), opts), min(workers, len(todo)), out, record, died,
                         bar.update)
    bar.close()
    _settle_stale(out, root, rows, report, prune, classes, opts, extra)
    publish.drop_unreferenced(out, rows)
    for leftover in (STAGING, TRASH):
        shutil.rmtree(out / leftover, ignore_errors=True)
    _write_table(root, rows, classes, opts, extra, report)
    access.apply_access(out, mode, gid)


def _settle_stale(out: Path, root: Any, rows: dict[str, dict], report: Report, prune: bool,
                  classes: tuple[str, ...], opts: ConvertOptions, extra: dict) -> None:
    """Subjects in the store that this run neither converted nor found unchanged: removed with
    ``prune`` (table first, then folders), else kept and reported."""
    stale = sorted(set(rows) - set(report.converted) - set(report.skipped))
    failing = {f.subject for f in report.failed}
    if prune:
        for subject in stale:
            rows.pop(subject)
        _write_table(root, rows, classes, opts, extra)
        for subject in stale:
            publish.drop_versions(out, subject, keep=None)
        report.removed = stale
        return
    report.kept = stale
    for subject in stale:
        why = "it failed now (see failed)" if subject in failing else "the input does not list it"
        report.warnings.append(f"{subject}: kept its earlier conversion because {why}; --prune removes it")


def _verify_published(root: Any, key: str, subject: str, opts: ConvertOptions, report: Report) -> bool:
    """--verify: True (redo) when a published subject's arrays no longer match their checksums."""
    bad = verify_group(_strict(Path(root.store.root) / key), opts.fmri_shard_frames)
    if bad:
        report.warnings.append(f"{subject}: stored {bad} did not match the recorded checksum; reconverted")
    return bool(bad)


def _write_table(root: Any, rows: dict[str, dict], classes: tuple[str, ...], opts: ConvertOptions,
                 extra: dict | None, report: Report | None = None) -> None:
    attrs: dict[str, Any] = {
        "masan_store": {"format": FORMAT, "version": FORMAT_VERSION},
        "classes": list(classes),
        "cohort": [rows[s] for s in sorted(rows)],
        "options": opts.fingerprint(),
        **(extra or {}),
    }
    if report is not None:
        attrs["last_conversion"] = {"converted": len(report.converted), "skipped": len(report.skipped),
                                    "failed": [asdict(f) for f in report.failed], "report": REPORT}
    settings = opts.registration_settings()
    if settings is not None:
        attrs[registration.GROUP] = {**settings, "antspyx": registration.tool_version()}
    elif registration.GROUP in root.attrs:  # an earlier run registered, this one does not: one atomic rewrite
        root.attrs.put({**{k: v for k, v in root.attrs.asdict().items() if k != registration.GROUP}, **attrs})
        return
    root.update_attributes(attrs)
