"""One subject -> a published version folder of the cohort store (a conversion worker's job).

:func:`convert_subject` writes each modality into ``STORE/.staging/<id>.<v>`` as a NIfTI-Zarr
image (:mod:`masan.store.nifti_zarr`; T1 whole, fMRI in frame slabs of one shard each), as the
file has it, resampled onto one voxel size (:mod:`masan.convert.resample`) or registered onto
the template's grids (:mod:`masan.convert.registration`, transforms kept beside), re-reads
and checksums it, then publishes it as ``STORE/subjects/<id>/<v>`` with one rename
(:mod:`masan.store.publish`). Runs in worker processes: imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from masan.convert import nifti, registration, resample
from masan.convert.options import ConvertOptions
from masan.convert.sources import FMRI_SIDECAR, Failure, Job
from masan.files import disk_refusal
from masan.store import nifti_zarr, publish
from masan.store.cohort import MODALITIES, STAGING, StrictLocalStore

SOURCE_HASH_BLOCK = 1 << 22
EXTREME_Z = 50.0
"""Standard deviations from the mean beyond which a voxel is named in a warning: in whole brain
images the brightest voxels (vessels, fat) lie a few std out, while one corrupt voxel at ~1e30
widens the std until the z-scored brain is flat."""
TR_SUSPECT_SECONDS = 20.0
"""A TR above this is a unit error (headers often hold ms with the unit 'sec'): not stored as a TR."""
TR_MIN_SECONDS = 0.1
"""A TR below this is faster than any fMRI protocol (multiband EPI reaches about 0.3 s, MREG and
inverse imaging 0.1 s): a unit error too (seconds with the unit 'msec'), not stored as a TR."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
TR_FIX = "give RepetitionTime in seconds in the run's JSON sidecar (BIDS) and convert again"
"""The fix every warning about a run stored without a TR ends with (the sidecar's TR wins)."""


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
    """Streaming count, sum and sum of squares of the nonzero stored values (float64), and the
    stored values' range.

    Zeros add nothing to either sum, so no masking is needed. Each block's sums are exact
    for integer voxels (they stay below 2**53); the running totals are float64.
    """

    BLOCK = 1 << 20

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        if flat.size:
            self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if max(abs(self.lo), abs(self.hi)) > FLOAT32_MAX:
            return  # refused by scaled(); its squares would overflow float64
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
        """Mean/std of the scaled values; a blank or constant image (a mask) gets std 1 and a warning,
        one whose extreme voxels lie more than :data:`EXTREME_Z` std from the mean a warning. Raises
        NiftiError when a scaled value is beyond float32's range (training reads float32: it
        would be Inf, and every prediction of the subject NaN)."""
        ends = [slope * v + inter for v in (self.lo, self.hi) if math.isfinite(v)]
        if any(abs(v) > FLOAT32_MAX for v in ends) or max(abs(self.lo), abs(self.hi), 0.0) > FLOAT32_MAX:
            raise nifti.NiftiError(f"{path}: values reach {max(ends, key=abs):.3g} (after the header's scaling), "
                                   f"beyond float32's range ({FLOAT32_MAX:.3g}) that training reads; the file is "
                                   "corrupt or its scl_slope wrong: re-export it")
        std = abs(slope) * self.var ** 0.5
        mean = slope * self.mean + inter if self.n else inter
        if std == 0:
            warn.append(f"{path}: {'every voxel is 0' if not self.n else 'all nonzero voxels have one value'}; "
                        "normalisation uses std 1 (is it the right file?)")
        elif (far := max(abs(v - mean) for v in ends) / std) > EXTREME_Z:
            warn.append(f"{path}: a voxel of {max(ends, key=lambda v: abs(v - mean)):.4g} lies {far:.0f} standard "
                        f"deviations from the image's mean ({mean:.4g}): one corrupt voxel widens the std until the "
                        "normalised image is flat; look at it (data_tools/qc_report.py) and re-export the file")
        return {"mean": mean, "std": std or 1.0, "count": self.n, "over": "nonzero stored voxels"}


def _check_finite(slab: np.ndarray, nan: str, path: str, t0: int) -> tuple[int, np.ndarray]:
    """Inf is always an error; NaN per policy. Returns the NaN count and the slab (NaN -> 0)."""
    if slab.dtype.kind != "f":
        return 0, slab
    bad = ~np.isfinite(slab)
    if not bad.any():
        return 0, slab
    nans = np.isnan(slab)
    n_nan, n_inf = int(nans.sum()), int(bad.sum() - nans.sum())

    def where(mask: np.ndarray) -> str:  # a 4D file: the first frame (from 0) that holds one; slabs go in order
        if slab.shape[3] == 1 and not t0:
            return ""
        return f" (the first in frame {t0 + int(np.flatnonzero(mask.reshape(-1, slab.shape[3]).any(axis=0))[0])})"

    if n_inf:
        raise nifti.NiftiError(f"{path}: {n_inf} voxels are +-Inf{where(bad & ~nans)}; the file is corrupt, "
                               "re-export it")
    if nan == "error":
        raise nifti.NiftiError(f"{path}: {n_nan} of {slab.size} voxels are NaN{where(nans)} (usual in the "
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
    record when registered), the NIfTI ``space_unit`` of the affine (for the OME metadata), and
    ``slabs(n)``: the stored values ``(t0, (X, Y, Z, n))``, n frames at a time."""

    space: tuple[int, int, int]
    affine: np.ndarray
    header: bytes
    transform: dict
    space_unit: str
    slabs: Callable[[int], Iterator[tuple[int, np.ndarray]]]
    registration: dict | None = None


def _as_in_file(img: Any, shape: tuple[int, ...], modality: str, tr: float | None, source: _Source,
                opts: ConvertOptions) -> _Placement:
    """The file's voxels, reoriented (``canonical``) and centre cropped/padded (``t1_shape``/``fmri_shape``);
    ``tr``: the run's TR in seconds, for the stored header (None: none, or a T1)."""
    plan = nifti.SpatialPlan.make(img.affine, shape, opts.canonical, opts.t1_shape if modality == "t1"
                                  else opts.fmri_shape)

    def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
        for t0, slab in source.slabs(frames):
            yield t0, plan.apply(slab)

    header = nifti.stored_header(img, plan, plan.out_shape + tuple(shape[3:]), tr)
    return _Placement(plan.out_shape, plan.affine, header, plan.record(), img.header.get_xyzt_units()[0], slabs)


def _registered(img: Any, shape: tuple[int, ...], modality: str, tr: float | None, source: _Source,
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
        record = reg.fmri_prepare((total / shape[3]).astype(np.float32), img.affine, tr, source.path)

        def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
            for t0, slab in source.slabs(frames):
                yield t0, reg.fmri_frames(slab.astype(np.float32), dtype)

    transform = {"registered_to": reg.template, "in_shape": list(shape[:3]), "out_shape": list(space), "pad_value": 0}
    header = resample.grid_header(img, affine, space + tuple(shape[3:]), "mni", tr)
    return _Placement(space, affine, header, transform, "mm", slabs, record)


def _resampled(img: Any, shape: tuple[int, ...], modality: str, tr: float | None, source: _Source,
               opts: ConvertOptions) -> _Placement:
    """The voxels resampled onto the RAS grid of ``opts.spacing`` over the file's field of view
    (:mod:`masan.convert.resample`), centred into ``t1_shape``/``fmri_shape`` when given."""
    mm = opts.spacing[0 if modality == "t1" else 1]
    space, affine = resample.target_grid(img.affine, shape, mm, source.path,
                                         opts.t1_shape if modality == "t1" else opts.fmri_shape)
    dtype = img.header.get_data_dtype().newbyteorder("=")

    def slabs(frames: int) -> Iterator[tuple[int, np.ndarray]]:
        for t0, slab in source.slabs(frames):
            yield t0, resample.resample(slab, img.affine, space, affine, dtype)

    transform = {"resampled_to_mm": mm, "reoriented_to": "RAS", "interpolation": "linear",
                 "in_shape": list(shape[:3]), "in_voxel_mm": list(resample.voxel_size(img.affine)),
                 "out_shape": list(space), "pad_value": 0}
    code = "scanner" if int(img.header["sform_code"] or img.header["qform_code"]) == 1 else "aligned"
    header = resample.grid_header(img, affine, space + tuple(shape[3:]), code, tr)
    return _Placement(space, affine, header, transform, "mm", slabs)


def _codec(opts: ConvertOptions) -> BloscCodec:
    return BloscCodec(cname=opts.codec, clevel=opts.clevel, shuffle=opts.shuffle)


def _plausible_tr(seconds: float) -> bool:
    """Whether a TR in seconds lies in [:data:`TR_MIN_SECONDS`, :data:`TR_SUSPECT_SECONDS`]."""
    return TR_MIN_SECONDS <= seconds <= TR_SUSPECT_SECONDS


def repetition_time(info: dict, path: str, sidecar: str | None, warn: list[str]) -> tuple[float | None, str | None]:
    """(TR in seconds, where it came from: ``sidecar`` or ``header``) of a BOLD run.

    BIDS makes the sidecar's ``RepetitionTime`` (seconds) authoritative; a header that
    disagrees is a warning. A TR outside [:data:`TR_MIN_SECONDS`, :data:`TR_SUSPECT_SECONDS`]
    is a unit error (milliseconds written as seconds, or seconds with the unit 'msec'): in a
    sidecar it fails the subject (so does a value that is not a number, e.g. ``true``), in a
    header the run is stored without a TR (None) and a warning names the fix, rather than
    storing a wrong duration. A sidecar with ``VolumeTiming`` and no ``RepetitionTime`` (BIDS:
    frames at uneven times, a sparse acquisition) gives no TR either, with a warning: no single
    TR describes such a run, whatever its header's pixdim[4] says."""
    header = info["tr_seconds"]
    if sidecar is not None:
        try:
            meta = json.loads(Path(sidecar).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as e:
            raise nifti.NiftiError(f"{sidecar}: cannot read the BOLD sidecar ({e}); fix or remove it") from None
        if not isinstance(meta, dict):
            raise nifti.NiftiError(f"{sidecar}: the BOLD sidecar is a JSON {type(meta).__name__}, not an object of "
                                   'keys (BIDS: {"RepetitionTime": 2.0, ...}); fix or remove it')
        value = meta.get("RepetitionTime")
        if value is not None:
            # bool is an int in Python: JSON's true would pass as 1 s
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _plausible_tr(value):
                raise nifti.NiftiError(f"{sidecar}: RepetitionTime {json.dumps(value)} is not a TR in seconds (BIDS: "
                                       f"a number of seconds, {TR_MIN_SECONDS:g} to {TR_SUSPECT_SECONDS:g}, e.g. 0.8 "
                                       "for 800 ms); fix the sidecar")
            if header and not math.isclose(header, value, rel_tol=nifti.SAME_VALUE_RTOL):
                warn.append(f"{path}: header TR {header:g} s, sidecar {sidecar} {value:g} s; used the sidecar's "
                            "(BIDS: the sidecar is authoritative)")
            return float(value), "sidecar"
        if meta.get("VolumeTiming") is not None:
            warn.append(f"{path}: its sidecar {sidecar} gives VolumeTiming and no RepetitionTime (BIDS: frames at "
                        "uneven times, a sparse or clustered acquisition); stored without a TR, since no single TR "
                        "spaces its frames (the header's pixdim[4] is not used); training needs one TR for the "
                        "cohort: leave such runs out of it")
            return None, None
    if header is not None and not _plausible_tr(header):
        unit = ("milliseconds?" if header > TR_SUSPECT_SECONDS else
                f"under {TR_MIN_SECONDS:g} s, faster than any fMRI protocol: seconds, not {info['time_unit']}?")
        warn.append(f"{path}: header TR {header:g} s ({info['zooms'][3]:g} {info['time_unit']}) is a unit error "
                    f"({unit}); stored without a TR: {TR_FIX}")
        return None, None
    if header is None and info["time_unit"] not in nifti.TIME_UNIT_SECONDS:
        warn.append(f"{path}: the header's time unit is '{info['time_unit']}', not a time, so its pixdim[4] "
                    f"{info['zooms'][3]:g} is no TR; stored without one: {TR_FIX}")
    elif header is None:
        warn.append(f"{path}: no TR in the header or a JSON sidecar; stored without one: {TR_FIX}")
    return header, None if header is None else "header"


def _write_modality(group: Any, modality: str, path: str, opts: ConvertOptions, warn: list[str],
                    reg: registration.SubjectRegistration | None = None, sidecar: str | None = None) -> dict:
    """Stream one NIfTI file into the NIfTI-Zarr image ``group[modality]`` (registered onto the
    template grid when ``reg`` is given); returns its table entry. ``sidecar``: the fMRI run's
    BIDS JSON (its TR wins over the header's)."""
    img = nifti.open_image(path, warn)
    if nifti.unoriented(img):
        if opts.unoriented == "refuse":
            raise nifti.NiftiError(nifti.unoriented_refusal(path))
        warn.append(f"{path}: the header states no orientation (sform/qform codes 0); assumed LAS "
                    "(--unoriented assume-las): check left and right")
    warn.extend(nifti.form_disagreement(img, path))
    shape = nifti.data_shape(img, 3 if modality == "t1" else 4, path)
    nifti.check_data_size(img, path)  # before any array of that shape is made (a registered run's mean)
    info = nifti.describe(img)
    # before the stored header and OME metadata are made: they carry the TR the store uses
    tr, tr_source = repetition_time(info, path, sidecar, warn) if modality == "fmri" else (None, None)
    source = _Source(img, path, opts.nan)
    if reg is not None:
        place = _registered(img, shape, modality, tr, source, opts, reg)
    elif opts.spacing is not None:
        place = _resampled(img, shape, modality, tr, source, opts)
    else:
        place = _as_in_file(img, shape, modality, tr, source, opts)
    frames = 1 if modality == "t1" else shape[3]
    out_shape = place.space if modality == "t1" else (frames,) + place.space
    dtype = img.header.get_data_dtype().newbyteorder("=")
    chunks, shards = _chunking(modality, out_shape, opts)
    # the OME scale is the stored voxel's (the affine's column norms: a reoriented image's axes
    # are permuted from the file's zooms)
    ome_info = {"zooms": resample.voxel_edges(place.affine), "space_unit": place.space_unit, "tr_seconds": tr}
    image = nifti_zarr.ImageWriter(group, modality, out_shape, dtype, chunks, shards, _codec(opts), opts.levels,
                                   place.header, ome_info)
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


def open_strict(folder: Path) -> Any:
    """A subject group opened read-only so that a missing chunk file raises (verification)."""
    return zarr.open_group(StrictLocalStore(folder, read_only=True), mode="r")


def convert_subject(job: Job, store: str, opts: ConvertOptions) -> dict:
    """Write, verify and publish one subject. Returns a result dict for :func:`masan.convert.cohort.convert_cohort`:
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
        bad = verify_group(open_strict(staging), opts.fmri_shard_frames)
        if bad:
            raise OSError(f"re-read of {bad} after writing did not match (disk full or failing?); rerun")
        # its warnings too: a rerun that skips the subject reports them again
        group.update_attributes({"subject": job.subject, "sources": sources, "options": opts.fingerprint(),
                                 "row": row, "warnings": warn, "complete": True})
        row["group"] = publish.publish_version(root, job.subject, staging, version)
        return {"subject": job.subject, "ok": True, "row": row, "warnings": warn + job.notes}
    except Exception as e:  # noqa: BLE001 - any failure fails this subject only, reported with its file
        shutil.rmtree(staging, ignore_errors=True)
        disk = disk_refusal(e)
        if disk is not None:  # the store's file system, not this subject: the conversion stops (cohort.py)
            return {"subject": job.subject, "ok": False, "disk": disk,
                    "failure": asdict(Failure(job.subject, e.filename, disk))}
        msg = str(e) if isinstance(e, nifti.NiftiError) else f"{type(e).__name__}: {e}"
        return {"subject": job.subject, "ok": False, "failure": asdict(Failure(job.subject, current, msg))}
    finally:
        if reg is not None:
            shutil.rmtree(reg.workdir, ignore_errors=True)
