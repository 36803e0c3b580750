"""NIfTI/BIDS cohort -> Zarr v3 cohort store (the library behind ``data_tools/to_zarr.py``).

Steps, each a function:

1. :func:`discover_bids` / :func:`read_manifest` list :class:`SubjectSource` rows.
2. :func:`check_sources` maps labels to classes and rejects duplicate or unsafe ids,
   unknown/missing labels and missing modalities (per subject, never the whole run).
3. :func:`convert_subject` writes one subject into ``STORE/.staging/<id>`` (T1 whole, fMRI in
   frame slabs of one shard each), re-reads and checksums it, then publishes it with one
   directory rename: a subject under ``STORE/subjects/`` is always complete and verified.
4. :func:`convert_cohort` runs 3 over worker processes with a progress bar, skips subjects
   whose sources and options are unchanged, redoes half-written or changed ones, keeps the
   cohort table in the root attributes and writes ``conversion_report.json``.

Layout and fidelity choices: docs/data-format.md.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from masan.data import nifti
from masan.data.synth import PLANTED_EFFECT_FILE
from masan.data.store import FORMAT, FORMAT_VERSION, MODALITIES, REPORT, STAGING, SUBJECTS, TRASH

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
    failed: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
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
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"subject", "t1", "fmri", "label"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ConvertError(f"manifest {path} lacks column(s) {sorted(missing)} "
                               f"(has {reader.fieldnames}); it needs subject,t1,fmri,label")
        rows = list(reader)
    out = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        def p(key: str) -> Path | None:
            v = (r.get(key) or "").strip()
            return None if not v else (Path(v) if Path(v).is_absolute() else path.parent / v)
        out.append(SubjectSource((r.get("subject") or "").strip(), (r.get("label") or "").strip() or None,
                                 p("t1"), p("fmri"), f"{path.name} row {i}"))
    return out


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
    with table.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        if "participant_id" not in cols or label_column not in cols:
            raise ConvertError(f"{table} has columns {cols}; it needs participant_id and {label_column!r} "
                               "(pick the label column with --label-column)")
        rows = list(reader)
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
        jobs.append(Job(s.subject, cls, {m: str(f.resolve()) for m, f in files.items() if f is not None}, s.notes))
    return jobs, failures


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
        dimension_names=("x", "y", "z") if modality == "t1" else ("t", "x", "y", "z"), overwrite=True)
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


def convert_subject(job: Job, store: str, opts: ConvertOptions) -> dict:
    """Write, verify and publish one subject. Returns a result dict for :func:`convert_cohort`:
    ``{"subject", "ok": True, "row", "warnings"}`` or ``{"subject", "ok": False, "failure"}``."""
    root = Path(store)
    staging = root / STAGING / job.subject
    shutil.rmtree(staging, ignore_errors=True)
    warn: list[str] = []
    current = None
    try:
        group = zarr.open_group(LocalStore(staging), mode="w")
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
        bad = verify_group(group, opts.fmri_shard_frames)
        if bad:
            raise OSError(f"re-read of {bad} after writing did not match (disk full or failing?); rerun")
        group.update_attributes({"subject": job.subject, "sources": sources, "options": opts.fingerprint(),
                                 "row": row, "complete": True})
        _publish(root, job.subject, staging)
        return {"subject": job.subject, "ok": True, "row": row, "warnings": warn + job.notes}
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        msg = str(e) if isinstance(e, nifti.NiftiError) else f"{type(e).__name__}: {e}"
        return {"subject": job.subject, "ok": False, "failure": asdict(Failure(job.subject, current, msg))}


def _publish(root: Path, subject: str, staging: Path) -> None:
    """Swap the staged group in with renames (same filesystem: atomic per rename)."""
    final = root / SUBJECTS / subject
    if final.exists():
        trash = root / TRASH / f"{subject}.{os.getpid()}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)


# ====================================================================== the cohort


def _published(root: Any, subject: str) -> dict | None:
    try:
        attrs = dict(root[f"{SUBJECTS}/{subject}"].attrs)
    except (KeyError, FileNotFoundError):
        return None
    return attrs if attrs.get("complete") else None


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


class _StoreLock:
    """Exclusive lock on STORE/.lock: one conversion writes a store at a time (freed on kill)."""

    def __init__(self, root: Path):
        self.file = (root / ".lock").open("w")

    def __enter__(self) -> "_StoreLock":
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvertError(f"another conversion is writing {Path(self.file.name).parent}; "
                               "wait for it to finish (or stop it) and rerun") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _open_root(path: Path) -> Any:
    if any(p.name != ".lock" for p in path.iterdir()) and not (path / "zarr.json").is_file():
        raise ConvertError(f"{path} exists and is not a cohort store; choose another --out or empty it")
    if (path / "zarr.json").is_file():
        root = zarr.open_group(LocalStore(path), mode="r+")
        if dict(root.attrs).get("masan_store", {}).get("format") != FORMAT:
            raise ConvertError(f"{path} is a Zarr group but not a MASAN cohort store; choose another --out")
    else:
        root = zarr.open_group(LocalStore(path), mode="w",
                               attributes={"masan_store": {"format": FORMAT, "version": FORMAT_VERSION}})
    if SUBJECTS not in root:
        root.create_group(SUBJECTS)
    return root


def convert_cohort(sources: list[SubjectSource], out: str | Path, options: ConvertOptions | None = None,
                   classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES, label_map: str | None = None,
                   workers: int = 1, verify: bool = False, extra_attrs: dict | None = None,
                   progress: bool = True) -> Report:
    """Convert a cohort into the store at ``out`` (created or updated in place).

    Subjects already published from unchanged sources with the same options are skipped
    (``verify`` re-reads them and redoes any whose checksum differs); subjects no longer
    in the input or failing now are removed. Every failure is per subject. The report is
    returned, stored in ``STORE/conversion_report.json`` and summarised in the root attrs.
    """
    opts = options or ConvertOptions()
    classes = tuple(classes)
    mapping = parse_label_map(label_map, classes)
    out = Path(out)
    start = time.monotonic()
    report = Report()
    with _StoreLock(_ensure_dir(out)):
        root = _open_root(out)
        for leftover in (STAGING, TRASH):  # half-written subjects of an interrupted run
            shutil.rmtree(out / leftover, ignore_errors=True)
        jobs, report.failed = check_sources(sources, mapping, opts.require)
        rows: dict[str, dict] = {}
        todo = []
        for job in jobs:
            attrs = _published(root, job.subject)
            if attrs and _unchanged(job, attrs, opts) and not (verify and _verify_published(out, job.subject, opts, report)):
                row = dict(attrs["row"], label=job.label)
                for modality, path in job.sources.items():  # the same files may have moved
                    row[modality] = dict(row[modality], source=path)
                rows[job.subject] = row
                report.skipped.append(job.subject)
            else:
                todo.append(job)

        def record(result: dict) -> None:
            if result["ok"]:
                rows[result["subject"]] = result["row"]
                report.converted.append(result["subject"])
                report.warnings.extend(f"{result['subject']}: {w}" for w in result["warnings"])
            else:
                report.failed.append(Failure(**result["failure"]))
            _write_table(root, rows, classes, opts, extra_attrs)

        _write_table(root, rows, classes, opts, extra_attrs)
        bar = tqdm(total=len(todo), desc=f"to_zarr {out.name}", unit="subject", disable=not progress)
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                record(convert_subject(job, str(out), opts))
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(convert_subject, job, str(out), opts) for job in todo]
                for fut in as_completed(futures):
                    record(fut.result())
                    bar.update()
        bar.close()
        report.removed = _remove_unlisted(out, set(rows))
        for leftover in (STAGING, TRASH):
            shutil.rmtree(out / leftover, ignore_errors=True)
        report.seconds = time.monotonic() - start
        _write_table(root, rows, classes, opts, extra_attrs, report)
        tmp = out / f"{REPORT}.tmp"
        tmp.write_text(json.dumps(report.to_json(), indent=1))
        os.replace(tmp, out / REPORT)
    return report


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verify_published(out: Path, subject: str, opts: ConvertOptions, report: Report) -> bool:
    """--verify: True (redo) when a published subject's arrays no longer match their checksums."""
    group = zarr.open_group(LocalStore(out / SUBJECTS / subject, read_only=True), mode="r")
    bad = verify_group(group, opts.fmri_shard_frames)
    if bad:
        report.warnings.append(f"{subject}: stored {bad} did not match the recorded checksum; reconverted")
    return bool(bad)


def _remove_unlisted(out: Path, keep: set[str]) -> list[str]:
    removed = []
    for folder in sorted((out / SUBJECTS).iterdir()):
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


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
