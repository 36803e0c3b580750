"""NIfTI reading for the cohort store: header facts, exact voxels, bounded-memory streaming.

Everything here works on the *stored* (unscaled) values of a NIfTI-1/-2 file, in the file's
own integer or float type made native-endian; ``scl_slope``/``scl_inter`` are recorded and
applied by the reader (:mod:`masan.store.cohort`), so no float64 copy of a volume is ever made
and the stored values are exactly the file's.

- :func:`open_image` loads a header (clear errors for missing, non-NIfTI, misnamed or corrupt
  files, or a singular affine; a header in meters or microns is read in mm);
  :func:`check_data_size` refuses a header promising more voxels than the file can hold;
  :func:`form_disagreement` warns when sform and qform say different things.
- :func:`describe` gives the NIfTI-Zarr-like attribute block (affine, sform/qform and codes,
  zooms, units, TR in seconds, orientation, scaling, the raw header bytes).
- :class:`SpatialPlan` is the optional reorientation to RAS (``--canonical``) followed by a
  centre crop/pad to a fixed shape, with the affine kept true; :func:`stored_header` is the
  binary NIfTI header of the array so stored (the NIfTI-Zarr ``nifti`` array), carrying the
  TR the store uses.
- :func:`iter_frame_slabs` streams a 4D run in frame slabs through one sequential pass over
  the (possibly gzipped) file: memory is one slab, and a .nii.gz is decompressed once.
- :func:`write_nifti_slabs` writes a 3D/4D NIfTI from frame slabs (synthetic cohorts).
"""

from __future__ import annotations

import base64
import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

# Voxel types a model can consume; NIfTI's complex and RGB types are refused.
SUPPORTED_KINDS = "iuf"
TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6, "unknown": 1.0}
"""Seconds per NIfTI time unit ('unknown': NIfTI readers conventionally take seconds); the other
units of the t field (hz, ppm, rads) are no time, so their pixdim[4] is no TR."""
MM_PER_SPACE_UNIT = {"meter": 1000.0, "micron": 1e-3}
"""Millimetres per NIfTI space unit that :func:`open_image` rescales to mm ('mm' and 'unknown'
are taken as mm), so that every later step (orientation, --spacing, registration, the stored
header) sees one unit."""
SAME_VALUE_RTOL = 0.01
"""Voxel sizes (mm) or TRs (s) within this relative difference are one value: headers round
them differently (1 vs 0.9999 mm). The converter, the training contract and the QC report all
compare by it."""
FORM_TOLERANCE_MM = 0.01
"""Largest entry-wise difference (mm, or mm per voxel for the axes) between a header's sform
and qform still taken as one affine: the qform's float32 quaternion rounds the sform's matrix
by about 1e-5 mm; more is another placement of the head (or a shear, which a qform cannot hold)."""
MAX_DEFLATE_RATIO = 1032
"""Deflate's largest expansion (zlib's technical notes: about 1032:1, long runs of one byte): a
gzip stream of C bytes decompresses to at most C times this."""
CORRUPT_FIX = "the file is truncated or corrupt: re-export or re-download it"
"""What to do about a file whose voxel data cannot be read (every such message ends with it)."""


class NiftiError(ValueError):
    """A NIfTI file cannot be used; the message names the file and what to do."""


def open_image(path: str | Path, warn: list[str] | None = None) -> nib.Nifti1Pair:
    """Load a NIfTI-1/-2 header (data stay on disk). Raises NiftiError naming the file.

    A header whose space unit is meter or micron is rescaled to mm here (affine, sform, qform,
    zooms, xyzt_units), with a warning appended to ``warn`` when given."""
    p = Path(path)
    if not p.is_file():
        raise NiftiError(f"{p}: file not found; fix the path in the manifest/BIDS folder")
    misnamed = _misnamed_compression(p)
    if misnamed:
        raise NiftiError(misnamed)
    try:
        img = nib.load(p)
    except Exception as e:  # nibabel raises many types for unreadable headers
        raise NiftiError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e}); "
                         "re-export it from the scanner data (e.g. dcm2niix) or re-download it") from e
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):
        raise NiftiError(f"{p}: is a {type(img).__name__}, not NIfTI; convert it to .nii/.nii.gz first")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in SUPPORTED_KINDS or dtype.fields is not None:
        raise NiftiError(f"{p}: voxel type {dtype} is not supported (need integer or float voxels); "
                         "convert it to int16 or float32")
    _check_affine(img, p)
    note = _to_millimetres(img, p)
    if note and warn is not None:
        warn.append(note)
    return img


def _misnamed_compression(path: Path) -> str | None:
    """The fix when a file's compression contradicts its name (nibabel picks its reader by the
    name, and its error then reads like a corrupt file): gzip bytes in a ``.nii``, or an
    uncompressed NIfTI header (sizeof_hdr 348 or 540, either byte order) in a ``.nii.gz``."""
    with open(path, "rb") as f:
        head = f.read(4)
    name = path.name.lower()
    if name.endswith(".nii") and head[:2] == GZIP_MAGIC:
        return f"{path}: is gzip-compressed but named .nii: rename it to .nii.gz"
    sizes = {int.from_bytes(head, order) for order in ("little", "big")} if len(head) == 4 else set()
    if name.endswith(".nii.gz") and head[:2] != GZIP_MAGIC and sizes & {348, 540}:
        return f"{path}: is uncompressed but named .nii.gz: rename it to .nii or gzip it"
    return None


def _to_millimetres(img: nib.Nifti1Pair, path: Path) -> str | None:
    """Rescale a header in meters or microns (:data:`MM_PER_SPACE_UNIT`) to mm in place:
    ``img.affine``, sform, qform (their codes kept), the voxel sizes and the unit. Returns the
    warning for it (None: the header was in mm or unknown units already)."""
    hdr = img.header
    unit, time_unit = hdr.get_xyzt_units()
    mm = MM_PER_SPACE_UNIT.get(unit)
    if mm is None:
        return None
    to_mm = np.diag([mm, mm, mm, 1.0])
    zooms = [float(z) for z in hdr.get_zooms()]
    sform, sform_code = hdr.get_sform(coded=True)
    qform, qform_code = hdr.get_qform(coded=True)
    # the voxel sizes first: with both codes 0 they are the affine (set_qform then re-reads them)
    hdr.set_zooms([z * mm for z in zooms[:3]] + zooms[3:])
    hdr.set_xyzt_units("mm", time_unit)
    img.set_qform(None if qform is None else to_mm @ qform, code=int(qform_code))
    img.set_sform(None if sform is None else to_mm @ sform, code=int(sform_code))
    sizes = "x".join(f"{z:g}" for z in zooms[:3])
    return (f"{path}: the header gives voxel sizes and positions in {unit}s (xyzt_units), not mm: read as "
            f"{mm:g} mm per {unit} ({sizes} {unit} voxels are {'x'.join(f'{z * mm:g}' for z in zooms[:3])} mm)")


def unoriented(img: nib.Nifti1Pair) -> bool:
    """Whether the header states no orientation: sform_code and qform_code both 0. nibabel then
    builds the affine from the voxel sizes alone with x flipped (LAS, ANALYZE's radiological
    convention, as FSL assumes too), while other tools assume other orders: left and right are
    a guess."""
    hdr = img.header
    return not int(hdr["sform_code"]) and not int(hdr["qform_code"])


def unoriented_refusal(path: str | Path) -> str:
    """Why a file without orientation is refused, and the two ways on."""
    return (f"{path}: the header states no orientation (sform_code and qform_code are 0), so which side of the "
            "image is the head's left is a guess (nibabel and FSL assume LAS, other tools other orders); set the "
            "right affine in the header if you know it (nibabel: img.set_sform(affine, code=1); nib.save(img, "
            "path)) or re-export from the scanner data (dcm2niix), or pass --unoriented assume-las to accept LAS "
            "for such files")


def _check_affine(img: nib.Nifti1Pair, path: Path) -> None:
    """NiftiError when the voxel -> world affine nibabel takes from the header (sform, else
    qform, else the voxel sizes) cannot be inverted: such an image has no orientation and no
    voxel size, and nibabel's own error ("cannot invert orientation transform") names neither
    the file nor the fix."""
    linear = np.asarray(img.affine, dtype=float)[:3, :3]
    if np.all(np.isfinite(linear)) and np.linalg.matrix_rank(linear) == 3:
        return
    hdr = img.header
    used = ("sform" if int(hdr["sform_code"]) else "qform" if int(hdr["qform_code"]) else
            "pixdim (no sform/qform code)")
    rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in linear)
    raise NiftiError(f"{path}: the header's affine (from its {used}) is singular or not finite ([{rows}]): its voxel "
                     "axes do not span 3D space, so the image has no orientation or voxel size; fix the header's "
                     "sform/qform (e.g. `fslorient -copyqform2sform` if the qform is right, or set it with nibabel: "
                     "img.set_sform(affine, code=1); nib.save(img, path)) or re-export it from the scanner data "
                     "(dcm2niix)")


def form_disagreement(img: nib.Nifti1Pair, path: str | Path) -> list[str]:
    """A warning (empty list: none) when the header sets both sform and qform (codes > 0) and
    they disagree: other orientations (``aff2axcodes``, e.g. RAS and LAS: left and right
    swapped) or entries more than :data:`FORM_TOLERANCE_MM` apart. The sform is used (nibabel's
    ``img.affine``, as the NIfTI standard's readers), but FSL and ITK-based tools may read the
    qform, so the same file would mean another head position (or side) there."""
    hdr = img.header
    sform, sform_code = hdr.get_sform(coded=True)
    qform, qform_code = hdr.get_qform(coded=True)
    if not sform_code or not qform_code:
        return []
    axes = ["".join(c or "?" for c in aff2axcodes(a)) for a in (sform, qform)]
    apart = float(np.abs(np.asarray(sform, dtype=float) - np.asarray(qform, dtype=float)).max())
    if axes[0] == axes[1] and apart <= FORM_TOLERANCE_MM:
        return []
    how = (f"orientation {axes[0]} in the sform, {axes[1]} in the qform" if axes[0] != axes[1] else
           f"their affines differ by up to {apart:.3g} mm")
    name = Path(path).name
    return [f"{path}: the header's sform (code {int(sform_code)}) and qform (code {int(qform_code)}) disagree ({how}); "
            "used the sform, as nibabel does, but FSL and ITK-based tools may read the qform: make them agree, "
            f"e.g. `fslorient -copysform2qform {name}` if the sform is right (`-copyqform2sform` if the qform is), "
            f"or with nibabel: img.set_qform(img.get_sform(), code={int(sform_code)}); nib.save(img, path)"]


def check_data_size(img: nib.Nifti1Pair, path: str | Path | None = None) -> None:
    """NiftiError (naming the file, :data:`CORRUPT_FIX`) when the file cannot hold the voxel
    data its header promises, checked before any read asks for that many bytes (a corrupt
    header, e.g. dims of 30000^3 in a 300 KB file, would otherwise end in a bare MemoryError).

    An uncompressed file must hold the header's offset plus shape x voxel bytes. A gzip
    stream's trailer holds its uncompressed size modulo 2**32 (ISIZE); the smallest size
    congruent to it that holds the data must fit :data:`MAX_DEFLATE_RATIO` times the file.
    Otherwise (a corrupt header, a cut file, or a file of several gzip members, whose trailer
    is the last member's) the stream is decompressed and counted, memory one block: the
    verdict is exact.
    """
    path = path if path is not None else img.get_filename()
    data = img.dataobj.file_like
    offset = int(img.dataobj.offset)
    shape = tuple(int(n) for n in img.shape)
    dtype = img.header.get_data_dtype()
    need = offset + math.prod(shape) * dtype.itemsize  # Python ints: NIfTI-2 dims overflow int64 products
    size = os.path.getsize(data)
    isize = 0
    with open(data, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
        if gzipped and size >= 4:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    # with a gzip file: the smallest uncompressed size its trailer allows that holds the data
    fits = isize + -(-max(need - isize, 0) // 2**32) * 2**32
    if not gzipped:
        has = size
    elif size >= 4 and fits <= size * MAX_DEFLATE_RATIO:
        return
    else:
        has = _stream_length(data, path)
    if has < need:
        raise _data_end(path, max(has - offset, 0), shape, dtype)


def _stream_length(data: str | Path, path: str | Path) -> int:
    """Bytes of a (gzip) file once decompressed, counted a block at a time."""
    n = 0
    try:
        with _open_stream(data) as f:
            while block := f.read(_DRAIN_BLOCK):
                n += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise NiftiError(f"{path}: cannot read voxel data ({type(e).__name__}: {e}); {CORRUPT_FIX}") from e
    return n


def _data_end(path: str | Path, got: int, shape: tuple[int, ...], dtype: np.dtype) -> NiftiError:
    """The error for voxel data that end after ``got`` bytes, short of what ``shape`` needs."""
    frames = math.prod(shape[3:])
    frame_bytes = math.prod(shape[:3]) * dtype.itemsize
    return NiftiError(f"{path}: voxel data end after {got} of the {frames * frame_bytes} bytes its header's shape "
                      f"{shape} of {dtype} needs (frame {got // frame_bytes if frame_bytes else 0} of {frames}); "
                      f"{CORRUPT_FIX}")


def data_shape(img: nib.Nifti1Pair, rank: int, path: str | Path) -> tuple[int, ...]:
    """The image's shape as a rank-3 (volume) or rank-4 (run) shape; NiftiError otherwise.

    Trailing singleton axes are dropped (a T1 stored as X,Y,Z,1 is a volume). A volume's
    axes must have at least 2 voxels; a run needs at least 1 frame.
    """
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > rank and shape[-1] == 1:
        shape = shape[:-1]
    if rank == 4 and len(shape) == 3:
        raise NiftiError(f"{path}: has shape {shape}, a single 3D volume, but an fMRI run must be 4D "
                         "(X, Y, Z, T); pass the 4D BOLD series, not one frame")
    if len(shape) != rank:
        what = "a 3D volume (X, Y, Z)" if rank == 3 else "a 4D run (X, Y, Z, T)"
        raise NiftiError(f"{path}: has shape {shape} (rank {len(shape)}) but must be {what}; "
                         "check that the right file is given for this modality")
    if min(shape[:3]) < 2:
        raise NiftiError(f"{path}: spatial shape {shape[:3]} has an axis under 2 voxels; "
                         "this is not a 3D image (a single slice?); pass the full volume")
    return shape


def describe(img: nib.Nifti1Pair) -> dict:
    """NIfTI facts recorded beside each stored array (JSON-ready).

    Keys: format, shape, dtype (as on disk), affine (4x4 world mm, nibabel's ``img.affine``),
    sform/qform with their codes, zooms, space_unit, time_unit, tr_seconds (the header's TR in
    seconds; None when pixdim[4] is 0 or its unit is no time: hz, ppm, rads), axcodes,
    scl_slope, scl_inter (as nibabel applies them), header_b64 (the raw header bytes, to
    rebuild the file). A header in meters or microns reads in mm here (:func:`open_image`).
    """
    hdr = img.header
    space_unit, time_unit = hdr.get_xyzt_units()
    zooms = [float(z) for z in hdr.get_zooms()]
    factor = TIME_UNIT_SECONDS.get(time_unit)
    tr = None
    if len(img.shape) >= 4 and len(zooms) >= 4 and zooms[3] > 0 and factor is not None:
        tr = zooms[3] * factor
    sform, sform_code = hdr.get_sform(coded=True)
    qform, qform_code = hdr.get_qform(coded=True)
    return {
        "format": "nifti2" if isinstance(hdr, nib.Nifti2Header) else "nifti1",
        "shape": [int(n) for n in img.shape],
        "dtype": hdr.get_data_dtype().str,
        "affine": np.asarray(img.affine, dtype=float).tolist(),
        "sform": None if sform is None else np.asarray(sform, dtype=float).tolist(),
        "sform_code": int(sform_code),
        "qform": None if qform is None else np.asarray(qform, dtype=float).tolist(),
        "qform_code": int(qform_code),
        "zooms": zooms,
        "space_unit": space_unit,
        "time_unit": time_unit,
        "tr_seconds": tr,
        "axcodes": list(aff2axcodes(img.affine)),
        "scl_slope": float(img.dataobj.slope),
        "scl_inter": float(img.dataobj.inter),
        "header_b64": base64.b64encode(hdr.binaryblock).decode("ascii"),
    }


@dataclass(frozen=True)
class SpatialPlan:
    """Reorientation + centre crop/pad applied to the first three (spatial) axes.

    ``ornt`` is nibabel's orientation transform to RAS (identity when not canonical);
    ``offset[i]`` says that output voxel j along axis i is voxel ``j + offset[i]`` of the
    reoriented input (negative: padding before, positive: cropping). Padding uses the
    stored value 0. ``affine`` is the output's voxel-to-world affine, so world coordinates
    of every kept voxel are unchanged.
    """

    in_shape: tuple[int, int, int]
    ornt: np.ndarray
    out_shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def make(cls, affine: np.ndarray, in_shape: tuple[int, ...], canonical: bool,
             shape: tuple[int, int, int] | None) -> "SpatialPlan":
        in_shape = tuple(int(n) for n in in_shape[:3])
        ornt = io_orientation(affine) if canonical else np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        aff = np.asarray(affine, dtype=float) @ inv_ornt_aff(ornt, in_shape)
        oriented = tuple(int(in_shape[int(ax)]) for ax in ornt[:, 0].argsort())
        out_shape = tuple(int(n) for n in shape) if shape is not None else oriented
        offset = tuple((n - m) // 2 for n, m in zip(oriented, out_shape))
        shift = np.eye(4)
        shift[:3, 3] = offset
        return cls(in_shape, ornt, out_shape, offset, aff @ shift)

    @property
    def is_identity(self) -> bool:
        return self.in_shape == self.out_shape and not any(self.offset) and np.array_equal(
            self.ornt, [[0, 1], [1, 1], [2, 1]])

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """(X, Y, Z, ...) input array -> (X', Y', Z', ...) output; trailing axes untouched."""
        if self.is_identity:
            return arr
        arr = apply_orientation(arr, self.ornt)
        out = np.zeros(self.out_shape + arr.shape[3:], dtype=arr.dtype)
        src, dst = [], []
        for n_in, n_out, o in zip(arr.shape[:3], self.out_shape, self.offset):
            s0, d0 = max(o, 0), max(-o, 0)
            n = max(min(n_in - s0, n_out - d0), 0)
            src.append(slice(s0, s0 + n))
            dst.append(slice(d0, d0 + n))
        out[tuple(dst)] = arr[tuple(src)]
        return out

    def record(self) -> dict:
        """JSON-ready description of the transform (stored beside the array)."""
        return {
            "reoriented_to": "RAS" if not np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]) else None,
            "ornt": self.ornt.astype(int).tolist(),
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "crop_pad_offset": list(self.offset),
            "pad_value": 0,
        }


def stored_header(img: nib.Nifti1Pair, plan: SpatialPlan, shape: tuple[int, ...], tr: float | None) -> bytes:
    """Binary NIfTI-1/-2 header (348 or 540 bytes, the file's byte order, no extensions) of
    the array as stored: :func:`header_base` (``shape`` (X, Y, Z[, T]), scaling, a run's TR
    ``tr``) and the plan's affine.

    With an identity plan the rest is the file's own header; a reoriented or cropped array gets
    ``plan.affine`` in both sform and qform, keeping their codes (``aligned`` when the file
    had neither, so readers do not fall back to the zooms), and no acquisition axes
    (:func:`clear_acquisition_axes`)."""
    hdr = header_base(img, shape, tr)
    if not plan.is_identity:
        sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
        if not sform_code and not qform_code:
            sform_code = 2
        hdr.set_sform(plan.affine, code=sform_code)
        hdr.set_qform(plan.affine, code=qform_code)
        clear_acquisition_axes(hdr)
    return hdr.binaryblock


def header_base(img: nib.Nifti1Pair, shape: tuple[int, ...], tr: float | None) -> nib.Nifti1Header:
    """A copy of the file's header (its byte order, type and space unit) made the base of a
    stored array's: ``shape`` (X, Y, Z[, T]), the scaling nibabel took out of the loaded header
    put back (``scl_slope``/``scl_inter``) and, for a run, the TR the store uses: pixdim[4]
    ``tr`` seconds (0 when None, NIfTI's "no TR") with the time unit ``sec``, so that the
    header, the OME metadata and ``tr_seconds`` say one thing."""
    hdr = img.header.copy()
    hdr.set_slope_inter(float(img.dataobj.slope), float(img.dataobj.inter))
    if tuple(int(n) for n in hdr.get_data_shape()) != tuple(shape):
        hdr.set_data_shape(shape)
    if len(shape) > 3:
        zooms = list(hdr.get_zooms())
        zooms[3] = tr or 0.0
        hdr.set_zooms(zooms)
        hdr.set_xyzt_units(hdr.get_xyzt_units()[0], "sec")
    return hdr


def clear_acquisition_axes(hdr: nib.Nifti1Header) -> None:
    """Clear the frequency, phase and slice axes (dim_info) and the slice timing fields
    (slice_code, slice_start, slice_end, slice_duration) of a header whose voxels no longer
    follow the acquisition's (reoriented, cropped or resampled): kept, they would name the
    wrong axis and slice range to slice-timing tools."""
    hdr.set_dim_info(None, None, None)
    for field in ("slice_code", "slice_start", "slice_end", "slice_duration"):
        hdr[field] = 0


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=")


def iter_frame_slabs(img: nib.Nifti1Pair, frames_per_slab: int, path: str | Path | None = None
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """Stream the stored (unscaled) voxels as ``(t0, slab)`` with slab (X, Y, Z, n), native dtype.

    A 3D image is one slab of one frame (shape (X, Y, Z, 1)). The file is read once,
    front to back (NIfTI keeps time as the slowest axis), so a .nii.gz is decompressed in
    one pass and memory is one slab. A gzip stream is read to its end, and its CRC-32 and
    length checked, before the last slab is yielded. Raises NiftiError naming the file when
    it is truncated or its compressed stream is corrupt, or its header promises more data
    than it can hold (:func:`check_data_size`, before the first read; a caller must not
    publish the slabs before the iteration ends).
    """
    path = path if path is not None else img.get_filename()
    check_data_size(img, path)
    shape = tuple(int(n) for n in img.shape)
    spatial = shape[:3]
    frames = math.prod(shape[3:])
    dtype = img.header.get_data_dtype()
    frame_bytes = math.prod(spatial) * dtype.itemsize
    try:
        with _open_stream(img.dataobj.file_like) as f:
            f.seek(img.dataobj.offset)
            for t0 in range(0, frames, frames_per_slab):
                n = min(frames_per_slab, frames - t0)
                buf = f.read(frame_bytes * n)
                if len(buf) < frame_bytes * n:
                    raise _data_end(path, t0 * frame_bytes + len(buf), shape, dtype)
                if t0 + n >= frames:
                    _check_stream_end(f)  # before the last slab leaves: nothing is trusted unchecked
                slab = np.frombuffer(buf, dtype=dtype).reshape(spatial + (n,), order="F")
                yield t0, slab.astype(_native(dtype), copy=not dtype.isnative)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise NiftiError(f"{path}: cannot read voxel data ({type(e).__name__}: {e}); {CORRUPT_FIX}") from e


GZIP_MAGIC = b"\x1f\x8b"
_DRAIN_BLOCK = 1 << 20


def _open_stream(path: str | Path) -> gzip.GzipFile | BinaryIO:
    """The file's bytes, decompressed when it is gzip (by its magic bytes, whatever its name).

    Python's own gzip reader is used on purpose (not nibabel's opener, which may pick
    indexed_gzip): it checks each member's CRC-32 and length (ISIZE) when the stream ends.
    """
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def _check_stream_end(f: gzip.GzipFile | BinaryIO) -> None:
    """Read a gzip stream to its end so that its CRC-32 and ISIZE trailer is checked.

    Reading stops at the end of the voxel data otherwise, and a stream whose bytes
    decompress but whose checksum does not match (damage that deflate does not notice)
    would be accepted with wrong voxels. Raises gzip.BadGzipFile / EOFError on mismatch.
    """
    if isinstance(f, gzip.GzipFile):
        while f.read(_DRAIN_BLOCK):
            pass


def write_nifti_slabs(path: str | Path, affine: np.ndarray, shape: tuple[int, ...], dtype: np.dtype,
                      slabs: Iterator[np.ndarray], zooms: tuple[float, ...], compresslevel: int = 6,
                      scl_slope: float | None = None, scl_inter: float = 0.0) -> Path:
    """Write a 3D or 4D NIfTI-1 file from (X, Y, Z, n) slabs given in time order.

    ``zooms`` are voxel sizes in mm (and the TR in seconds for 4D). Memory is one slab:
    the header is written first, then each slab in NIfTI's Fortran order (gzip when the
    name ends .gz, at ``compresslevel``; 6 is gzip's and dcm2niix's usual level).
    The slabs hold *stored* values; ``scl_slope``/``scl_inter`` (when a slope is given)
    go into the header, so readers see ``stored * scl_slope + scl_inter``.
    """
    path = Path(path)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms(zooms)
    if scl_slope is not None:
        hdr.set_slope_inter(float(scl_slope), float(scl_inter))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_data_offset(352)
    frames = shape[3] if len(shape) > 3 else 1
    written = 0
    with ImageOpener(path, "wb", compresslevel=compresslevel) as f:
        hdr.write_to(f)  # 348 header bytes + 4 extension bytes = vox_offset 352
        for slab in slabs:
            f.write(np.asarray(slab, dtype=dtype).tobytes(order="F"))
            written += slab.shape[3]
    if written != frames:
        raise ValueError(f"{path}: wrote {written} frames but the header says {frames}")
    return path
