"""NIfTI/BIDS cohort -> Zarr v3 cohort store (the library behind ``data_tools/to_zarr.py``).

Steps, each a function:

1. :func:`discover_bids` / :func:`read_manifest` list :class:`SubjectSource` rows.
2. :func:`check_sources` maps labels to classes and rejects duplicate or unsafe ids,
   unknown/missing labels and missing modalities (per subject, never the whole run).
3. :func:`convert_subject` writes one subject into ``STORE/.staging/<id>.<v>`` (T1 whole, fMRI
   in frame slabs of one shard each), re-reads and checksums it, then publishes it as a new
   version folder ``STORE/subjects/<id>/<v>`` with one rename (:mod:`masan.data.publish`).
4. :func:`convert_cohort` runs 3 over worker processes with a progress bar, skips subjects
   whose sources and options are unchanged, redoes half-written or changed ones, points the
   cohort table (root attributes) at each new version before the old one is removed, and
   always writes ``conversion_report.json``. Subjects leave the store only with ``prune``.

Store safety (locking, versions, permissions) and layout: docs/data-format.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from masan import access
from masan.data import nifti, places, publish, store_access
from masan.data.store_access import StoreAccess
from masan.data.synth import PLANTED_EFFECT_FILE
from masan.data.store import (FORMAT, FORMAT_VERSION, MODALITIES, REPORT, STAGING, SUBJECTS, TRASH,
                              StrictLocalStore)

DEFAULT_CLASSES = ("NC", "EMCI", "LMCI", "AD")
ADNI_ALIASES = {"CN": "NC"}
"""Diagnosis spellings of ADNI tables mapped to the class names by default."""
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SOURCE_HASH_BLOCK = 1 << 22
TR_SUSPECT_SECONDS = 20.0
"""A TR above this is reported as a warning (headers often hold ms with the unit 'sec')."""


class ConvertError(ValueError):
    """The conversion as a whole cannot start (bad inputs or options); exit code 2."""


@dataclass
class ConvertOptions:
    """How voxels are laid out in the store. Changing any of these reconverts every subject."""

    canonical: bool = False
    """Reorient every image to RAS+ (voxels permuted/flipped, affine adjusted)."""
    t1_shape: tuple[int, int, int] | None = None
    """Centre crop/pad T1 to this (X, Y, Z) (the paper: 240 256 176); None keeps it."""
    fmri_shape: tuple[int, int, int] | None = None
    """Centre crop/pad each fMRI frame to this (the paper: 60 64 44); None keeps it."""
    patch_grid: tuple[int, int, int] = (4, 4, 4)
    """T1 chunk = one cell of this grid (shape // grid), so a patch read touches one chunk."""
    fmri_chunk_frames: int = 16
    """fMRI chunk = this many whole frames."""
    fmri_shard_frames: int = 128
    """fMRI shard (one file) = this many frames; also the streaming slab (memory bound)."""
    codec: str = "lz4hc"
    """Blosc compressor: lz4hc (default: decodes ~1.5x faster than zstd at ~4% more bytes,
    see bench/io.py), zstd, lz4, blosclz, zlib."""
    clevel: int = 5
    """0-9."""
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "bitshuffle"
    nan: Literal["error", "zero"] = "error"
    """NaN voxels: ``error`` rejects the subject, ``zero`` stores 0 and records the count."""
    require: tuple[str, ...] = ("t1", "fmri")
    """Modalities every subject must have; a subject missing one fails."""

    def __post_init__(self) -> None:
        if self.fmri_shard_frames % self.fmri_chunk_frames:
            raise ConvertError(f"fmri_shard_frames ({self.fmri_shard_frames}) must be a multiple of "
                               f"fmri_chunk_frames ({self.fmri_chunk_frames})")
        bad = set(self.require) - set(MODALITIES)
        if bad or not self.require:
            raise ConvertError(f"require must name some of {MODALITIES}, got {self.require}")
        for name in ("t1_shape", "fmri_shape", "patch_grid"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or min(v) < 1):
                raise ConvertError(f"{name} must be three positive integers, got {v}")

    def fingerprint(self) -> dict:
        """Options that decide the stored bytes (a subject converted otherwise is redone)."""
        d = asdict(self)
        d.pop("require")
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d))


@dataclass
class SubjectSource:
    """One subject as found in the input: id, raw label, files, where it came from."""

    subject: str
    label: str | None
    t1: Path | None
    fmri: Path | None
    origin: str
    """E.g. ``manifest.csv row 4`` (for error messages)."""
    notes: list[str] = field(default_factory=list)


@dataclass
class Failure:
    subject: str
    file: str | None
    error: str
    """What was wrong and what to do."""


@dataclass
class Job:
    """A checked subject: class label and sources."""

    subject: str
    label: str
    sources: dict[str, str]
    """modality -> absolute path (only modalities present)."""
    notes: list[str] = field(default_factory=list)


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


# ====================================================================== discovery


def read_manifest(path: str | Path) -> list[SubjectSource]:
    """CSV with columns subject, t1, fmri, label (paths relative to the CSV's folder; t1 or
    fmri may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"manifest {path} not found; pass a CSV with columns subject,t1,fmri,label")
    cols, rows = _read_table(path, ",")
    missing = {"subject", "t1", "fmri", "label"} - set(cols)
    if missing:
        raise ConvertError(f"manifest {path} lacks column(s) {sorted(missing)} "
                           f"(has {cols}); it needs subject,t1,fmri,label")
    out = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        def p(key: str) -> Path | None:
            v = (r.get(key) or "").strip()
            return None if not v else (Path(v) if Path(v).is_absolute() else path.parent / v)
        out.append(SubjectSource((r.get("subject") or "").strip(), (r.get("label") or "").strip() or None,
                                 p("t1"), p("fmri"), f"{path.name} row {i}"))
    return out


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[dict]]:
    """Header and rows of a UTF-8 CSV/TSV. A byte-order mark (Excel's "UTF-8 CSV") is dropped,
    otherwise it would glue itself to the first column's name; another encoding is refused
    with the fix, not guessed (a Latin-1 'é' read wrongly would change a subject id)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed` "
                           "and use the fixed file") from None


def _pick(files: list[Path], kind: str, prefer: str | None = None) -> tuple[Path | None, list[str]]:
    if prefer:
        preferred = [f for f in files if prefer in f.name]
        files = preferred or files
    files = sorted(files)
    notes = [f"{len(files)} {kind} files; used {files[0].name}"] if len(files) > 1 else []
    return (files[0] if files else None), notes


def _bids_files(folder: Path) -> tuple[Path | None, Path | None, list[str]]:
    t1, n1 = _pick(list(folder.glob("anat/*_T1w.nii*")), "T1w")
    bold, n2 = _pick(list(folder.glob("func/*_bold.nii*")), "BOLD", prefer="task-rest")
    return t1, bold, n1 + n2


def discover_bids(bids: str | Path, label_column: str = "diagnosis", session: str | None = None
                  ) -> list[SubjectSource]:
    """Subjects of a BIDS folder: participants.tsv (participant_id + ``label_column``) and
    ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, ``func/*_bold.nii[.gz]``.

    With sessions, ``session`` (e.g. ``bl`` or ``ses-bl``) picks one; otherwise the first
    session (sorted) holding both modalities is used, else the first session. With several
    runs, a ``task-rest`` BOLD is preferred, then the first by name; the choice is noted.
    """
    bids = Path(bids)
    table = bids / "participants.tsv"
    if not table.is_file():
        raise ConvertError(f"{table} not found; a BIDS folder needs participants.tsv with "
                           f"participant_id and a {label_column!r} column")
    cols, rows = _read_table(table, "\t")
    if "participant_id" not in cols or label_column not in cols:
        raise ConvertError(f"{table} has columns {cols}; it needs participant_id and {label_column!r} "
                           "(pick the label column with --label-column)")
    sources = []
    listed = set()
    for i, r in enumerate(rows, start=2):
        sid = (r["participant_id"] or "").strip()
        listed.add(sid)
        folder = bids / sid
        notes: list[str] = []
        sessions = sorted(p for p in folder.glob("ses-*") if p.is_dir()) if sid else []
        if sessions:
            if session:
                want = session if session.startswith("ses-") else f"ses-{session}"
                sessions = [p for p in sessions if p.name == want]
                folder = sessions[0] if sessions else folder / want
            else:
                found = [(p, _bids_files(p)) for p in sessions]
                full = [p for p, (a, b, _) in found if a and b]
                folder = (full or sessions)[0]
                if len(sessions) > 1:
                    notes.append(f"{len(sessions)} sessions; used {folder.name} (choose with --session)")
        t1, bold, more = _bids_files(folder) if sid else (None, None, [])
        label = (r.get(label_column) or "").strip()
        sources.append(SubjectSource(sid, None if label.lower() in ("", "n/a", "na", "nan") else label,
                                     t1, bold, f"participants.tsv row {i}", notes + more))
    for folder in sorted(bids.glob("sub-*")):
        if folder.is_dir() and folder.name not in listed:
            t1, bold, _ = _bids_files(folder)
            sources.append(SubjectSource(folder.name, None, t1, bold, f"folder {folder} (not in participants.tsv)"))
    return sources


def planted_effect(bids: str | Path) -> dict | None:
    """The synthetic cohort's planted-effect record (``planted_effect.json``), if any."""
    p = Path(bids) / PLANTED_EFFECT_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def parse_label_map(text: str | None, classes: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``"CN=NC,Dementia=AD"`` -> mapping (upper-cased keys); classes and ADNI aliases included."""
    mapping = {c.upper(): c for c in classes}
    mapping.update({k: v for k, v in ADNI_ALIASES.items() if v in classes})
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ConvertError(f"label map entry {item!r} must look like RAW=CLASS (e.g. CN=NC)")
        raw, cls = (s.strip() for s in item.split("=", 1))
        if cls not in classes:
            raise ConvertError(f"label map {item!r}: {cls!r} is not one of the classes {list(classes)}")
        mapping[raw.upper()] = cls
    return mapping


def check_sources(sources: list[SubjectSource], label_map: dict[str, str], require: tuple[str, ...]
                  ) -> tuple[list[Job], list[Failure]]:
    """Per-subject checks before any voxel is read; every bad subject becomes a Failure."""
    jobs, failures = [], []
    counts = Counter(s.subject for s in sources)
    shared = _shared_files(sources)
    for s in sources:
        def fail(msg: str, file: Path | None = None) -> None:
            failures.append(Failure(s.subject or f"<{s.origin}>", str(file) if file else None, f"{s.origin}: {msg}"))
        if counts[s.subject] > 1:
            where = [o.origin for o in sources if o.subject == s.subject]
            fail(f"subject id {s.subject!r} appears {counts[s.subject]} times ({', '.join(where)}); "
                 "give each subject exactly one row")
            continue
        if not SAFE_ID.match(s.subject):
            fail(f"subject id {s.subject!r} is not a safe name; use 1-64 letters, digits, '-' or '_' "
                 "(starting with a letter or digit)")
            continue
        if s.label is None:
            fail("has no label; fill in its diagnosis (a row in participants.tsv / the manifest)")
            continue
        cls = label_map.get(s.label.upper())
        if cls is None:
            fail(f"label {s.label!r} is not a known class; known labels {sorted(label_map)}; "
                 "map it with --label-map RAW=CLASS or fix the table")
            continue
        files = {"t1": s.t1, "fmri": s.fmri}
        missing = [m for m in require if files[m] is None]
        absent = [(m, f) for m, f in files.items() if f is not None and not f.is_file()]
        if missing:
            fail(f"has no {' and no '.join(missing)} file; add it, or convert with --require "
                 f"{' '.join(m for m in MODALITIES if m not in missing) or 't1'} to allow this")
            continue
        if absent:
            m, f = absent[0]
            fail(f"{m} file {f} does not exist; fix the path", f)
            continue
        clash = [(f, shared[_file_id(f)]) for f in files.values() if f is not None and len(shared[_file_id(f)]) > 1]
        if clash:
            f, owners = clash[0]
            fail(f"{f} is listed for subjects {', '.join(sorted(owners))}; one scan in two subjects would "
                 "leak between train and test splits: give each subject its own file", f)
            continue
        # The path as listed (BIDS path), not a symlink's target: provenance names the subject's file.
        jobs.append(Job(s.subject, cls, {m: os.path.abspath(f) for m, f in files.items() if f is not None}, s.notes))
    return jobs, failures


def _file_id(path: Path) -> tuple[int, int]:
    """Identity of the file behind a path (symlinks and hard links included)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _shared_files(sources: list[SubjectSource]) -> dict[tuple[int, int], set[str]]:
    """File identity -> subjects listing it (existing files only)."""
    owners: dict[tuple[int, int], set[str]] = {}
    for s in sources:
        for f in (s.t1, s.fmri):
            if f is not None and f.is_file():
                owners.setdefault(_file_id(f), set()).add(s.subject)
    return owners


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


def _write_modality(group: Any, modality: str, path: str, opts: ConvertOptions, warn: list[str]) -> dict:
    """Stream one NIfTI file into ``group[modality]``; returns its table entry."""
    img = nifti.open_image(path)
    shape = nifti.data_shape(img, 3 if modality == "t1" else 4, path)
    info = nifti.describe(img)
    target = opts.t1_shape if modality == "t1" else opts.fmri_shape
    plan = nifti.SpatialPlan.make(img.affine, shape, opts.canonical, target)
    frames = 1 if modality == "t1" else shape[3]
    out_shape = plan.out_shape if modality == "t1" else (frames,) + plan.out_shape
    dtype = img.header.get_data_dtype().newbyteorder("=")
    chunks, shards = _chunking(modality, out_shape, opts)
    arr = zarr.create_array(
        group.store, name=modality, shape=out_shape, dtype=dtype, chunks=chunks, shards=shards,
        compressors=BloscCodec(cname=opts.codec, clevel=opts.clevel, shuffle=opts.shuffle), fill_value=0,
        dimension_names=("x", "y", "z") if modality == "t1" else ("t", "x", "y", "z"), overwrite=True,
        # Every chunk is written, even all-zero ones: readers then treat a missing chunk file
        # as damage (StrictLocalStore) instead of silently reading zeros.
        config={"write_empty_chunks": True})
    stats, crc, nan_count = _Stats(), 0, 0
    slab_frames = shards[0] if modality == "fmri" else 1
    for t0, slab in nifti.iter_frame_slabs(img, slab_frames, path):
        nans, slab = _check_finite(slab, opts.nan, path, t0)
        nan_count += nans
        out = plan.apply(slab)  # (X', Y', Z', n)
        out = np.ascontiguousarray(out[..., 0] if modality == "t1" else np.moveaxis(out, 3, 0))
        stats.add(out)
        crc = zlib.crc32(memoryview(out).cast("B"), crc)
        if modality == "t1":
            arr[...] = out
        else:
            arr[t0:t0 + out.shape[0]] = out
    if nan_count:
        warn.append(f"{path}: {nan_count} NaN voxels stored as 0 (--nan zero)")
    if modality == "fmri" and frames == 1:
        warn.append(f"{path}: the fMRI run has a single frame (no time course); stored as is, "
                    "check that the right BOLD file is listed")
    tr = info["tr_seconds"]
    if tr is not None and tr > TR_SUSPECT_SECONDS:
        warn.append(f"{path}: header TR is {tr:g} s ({info['zooms'][3]:g} {info['time_unit']}); "
                    "the unit is probably wrong (ms?), recorded as is")
    attrs = {
        "nifti": info,
        "affine": plan.affine.tolist(),
        "transform": plan.record(),
        "stats": stats.scaled(info["scl_slope"], info["scl_inter"], path, warn),
        "checksum": {"crc32": f"{crc:08x}", "of": "stored values, C order, native dtype"},
        "nan_replaced": nan_count,
    }
    arr.update_attributes(attrs)
    return {"shape": list(out_shape), "dtype": dtype.str, "tr_seconds": tr, "checksum": attrs["checksum"]["crc32"]}


def array_checksum(arr: Any, slab_frames: int) -> str:
    """CRC-32 of a stored array's values (C order), read a slab of leading-axis entries at a time."""
    crc = 0
    step = arr.shape[0] if arr.ndim == 3 else slab_frames
    for i in range(0, arr.shape[0], step):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[i:i + step])).cast("B"), crc)
    return f"{crc:08x}"


def verify_group(group: Any, slab_frames: int = ConvertOptions.fmri_shard_frames) -> list[str]:
    """Re-read every array of a subject group (fMRI ``slab_frames`` at a time); list the arrays
    whose checksum differs from the one recorded at conversion."""
    bad = []
    for modality in MODALITIES:
        if modality in group:
            arr = group[modality]
            want = dict(arr.attrs).get("checksum", {}).get("crc32")
            try:
                got = array_checksum(arr, slab_frames)
            except Exception as e:  # damaged chunk files raise codec errors
                got = f"unreadable ({type(e).__name__})"
            if got != want:
                bad.append(modality)
    return bad


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
    try:
        group = zarr.open_group(LocalStore(staging), mode="w")  # writing: a partial shard write reads absent shards
        row: dict[str, Any] = {"subject": job.subject, "label": job.label}
        sources = {}
        for modality in MODALITIES:
            current = job.sources.get(modality)
            row[modality] = None
            if current is None:
                continue
            sources[modality] = source_record(current)
            entry = _write_modality(group, modality, current, opts, warn)
            entry["source"], entry["sha256"] = current, sources[modality]["sha256"]
            row[modality] = entry
        current = None
        bad = verify_group(_strict(staging), opts.fmri_shard_frames)
        if bad:
            raise OSError(f"re-read of {bad} after writing did not match (disk full or failing?); rerun")
        group.update_attributes({"subject": job.subject, "sources": sources, "options": opts.fingerprint(),
                                 "row": row, "complete": True})
        row["group"] = publish.publish_version(root, job.subject, staging, version)
        return {"subject": job.subject, "ok": True, "row": row, "warnings": warn + job.notes}
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        msg = str(e) if isinstance(e, nifti.NiftiError) else f"{type(e).__name__}: {e}"
        return {"subject": job.subject, "ok": False, "failure": asdict(Failure(job.subject, current, msg))}


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
    """Refuse a store inside a training run directory or holding one (item 7 of issue 12):
    the conversion prunes what it does not know, training writes checkpoints where it runs."""
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
    jobs, failed = check_sources(sources, mapping, opts.require)
    mode, gid, chosen_by = store_access.target_access(out, [Path(p) for j in jobs for p in j.sources.values()],
                                                         share or StoreAccess())
    with access.creation_umask(mode):
        out.mkdir(parents=True, exist_ok=True)
        try:
            with publish.StoreLock(out):
                root = _open_root(out)
                report = Report(failed=failed)
                try:
                    _convert_locked(root, out, jobs, opts, classes, workers, verify, progress, prune, report,
                                    (mode, gid, chosen_by), extra_attrs)
                except BaseException as e:
                    report.aborted = f"{type(e).__name__}: {e}"
                    raise
                finally:  # the report is written whatever happened (a crash says where it stopped)
                    report.seconds = time.monotonic() - start
                    _write_json(out / REPORT, report.to_json())
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
            for modality, path in job.sources.items():  # the same files may have moved
                row[modality] = dict(row[modality], source=path)
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


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
    root.update_attributes(attrs)
