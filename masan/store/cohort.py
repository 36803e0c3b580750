"""Read API of the cohort store written by ``data_tools/to_zarr.py`` (layout: docs/data-format.md).

A store is one Zarr v3 hierarchy: every folder on the way to an image is a group::

    STORE/zarr.json                  root attrs: masan_store (format), classes, cohort (table)
    STORE/subjects/zarr.json         group of all subjects
    STORE/subjects/<id>/zarr.json    the subject's group; attrs ``masan.current``: its current version
    STORE/subjects/<id>/current      relative symlink to ``<v>``: the version-free path for tools
    STORE/subjects/<id>/<v>/t1/      NIfTI-Zarr image: level 0 ``0`` (X, Y, Z), ``nifti`` header
    STORE/subjects/<id>/<v>/fmri/    NIfTI-Zarr image: level 0 ``0`` (T, X, Y, Z), ``nifti`` header
    STORE/conversion_report.json     the last conversion's failures and warnings

Each image is a NIfTI-Zarr 1.0 / OME-Zarr 0.5 group (:mod:`masan.store.nifti_zarr`) whose
level 0 holds the stored values of the NIfTI file; lower levels (``--levels``) are for
viewers and are never read here. ``<v>`` is the subject's current version folder, named by
its cohort-table row (``group``); a reconversion writes a new version, points the table at
it, then ``current`` and the subject's group, then removes the old one. This reader follows
the table, never ``current``: a read that resolved ``current`` before a reconversion and
read chunks after it could mix two versions (:meth:`CohortStore.image_path` gives the
version-free path for other tools). Zarr walks the symlink like a folder, so a tree walk
(``zarr.open_group(STORE).tree()``) lists each image twice: under ``current`` and under
``<v>``. Stores of format 1 hold each modality as a bare array
(``<v>/t1`` with our attributes on it, or ``subjects/<id>/t1`` for rows without ``group``):
they read the same; rerunning to_zarr on them rewrites every subject as NIfTI-Zarr.

Each image's ``masan`` attributes hold ``nifti`` (header facts,
:func:`masan.convert.nifti.describe`), ``transform`` (reorientation/crop-pad), ``stats``
(mean/std of the scaled values over the nonzero stored voxels, computed at conversion) and
``checksum``; :meth:`CohortStore.meta` returns them.

Values: readers return ``stored * scl_slope + scl_inter`` as float32, i.e. what
``np.asarray(nibabel.load(f).dataobj)`` gives, then optionally z-scored with the subject's
stored statistics. ``read_raw`` returns the stored values exactly.

:class:`CohortStore` is picklable and opens Zarr lazily once per process, so it can be
handed to DataLoader workers (fork or spawn) and used by many ranks at once (read only).

Reads are strict: a chunk file that is missing raises :class:`StoreError` naming the subject
and array (zarr would return the fill value, i.e. silent zeros). When the missing data are a
version that a reconversion has just replaced, the reader reloads the cohort table and
redoes the whole read from the new version, so it never mixes or loses a subject.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from masan.store import nifti_zarr

FORMAT = "masan-cohort-store"
FORMAT_VERSION = 2
"""2: each modality a NIfTI-Zarr image group; 1: a bare array (still read)."""
SUBJECTS = "subjects"
CURRENT = "current"
"""``subjects/<id>/current``: relative symlink to the subject's current version folder."""
STAGING = ".staging"
TRASH = ".trash"
REPORT = "conversion_report.json"
MODALITIES = ("t1", "fmri")
CHUNK_DIR = "c"
"""Zarr v3 default chunk-key prefix: ``<array>/c/0/0/0``."""
OPEN_ARRAYS = 64
"""Opened image arrays a :class:`CohortStore` keeps (the most recently read): each holds its
metadata, so keeping every one grew a process by tens of KiB per subject of a large cohort."""
FIX = "run `python data_tools/to_zarr.py --bids DIR --out STORE` (or --manifest CSV) to (re)build it"
ROOT_META = "zarr.json"
INPUTS = "inputs"
"""Root attribute: the label tables (participants.tsv, manifests) the store was converted from,
each ``{"path", "sha256"}``: a conversion from other tables would mix two cohorts in one store."""
LAST_CONVERSION = "last_conversion"
"""Root attribute: the latest conversion's counts and failures, and whether it finished
(rewritten with the table as it goes, so a killed or interrupted run leaves ``finished`` false)."""

Region = tuple[slice, slice, slice]


class StoreError(RuntimeError):
    """The store is missing, not a cohort store, or damaged; the message names path and fix."""


def damaged_root(path: str | os.PathLike, error: BaseException) -> str:
    """What to do when a store's root ``zarr.json`` cannot be read: it holds the cohort table,
    the only record of which version of each subject is current, so no tool can rebuild it
    from what is left (a rerun into the same store would have to guess)."""
    path = Path(path)
    return (f"{path / ROOT_META} cannot be read ({type(error).__name__}: {error}): the root metadata of the cohort "
            f"store {path}, which holds its cohort table, is damaged. The subjects' data may be intact, but no tool "
            f"can tell which of their versions are current: restore that file from a backup, or move the store "
            f"aside (mv {path} {path}.damaged) and convert again with data_tools/to_zarr.py and the same inputs")


SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A subject id (``fullmatch``): it names the subject's folder of the store and files of reports,
so nothing that would leave those folders (``..``, ``/``, ``.``) is one."""


def table_rows(path: str | os.PathLike, attrs: dict) -> dict[str, dict]:
    """Subject -> row of a store's cohort table (root attributes ``attrs``). ValueError when a row
    names no safe subject id (:data:`SAFE_ID`): the table is written only by to_zarr, so such a
    row was edited in, and ``subjects/<id>`` would reach outside the store (a prune would delete
    there, a report write there)."""
    rows = {}
    for r in attrs.get("cohort") or []:
        subject = r.get("subject") if isinstance(r, dict) else None
        if not isinstance(subject, str) or not SAFE_ID.fullmatch(subject):
            raise ValueError(f"{Path(path) / ROOT_META}: its cohort table has a row whose subject is "
                             f"{subject!r}, not a subject id (letters, digits, '-' and '_'): the table was edited "
                             "or damaged; no tool reads or changes a store through it. Restore that file from a "
                             "backup, or convert the cohort again into a new store with data_tools/to_zarr.py")
        rows[subject] = r
    return rows


class MissingChunkError(FileNotFoundError):
    """A chunk (shard) file of an array is absent: the store is damaged or was replaced."""


class StrictLocalStore(LocalStore):
    """LocalStore that raises on a missing chunk file instead of letting zarr use the fill value.

    Conversion writes every chunk (``write_empty_chunks``), so a missing one is never a
    legitimate zero block. Metadata keys (``zarr.json``) keep LocalStore's None-when-absent.
    """

    @staticmethod
    def _is_chunk(key: str) -> bool:
        return f"/{CHUNK_DIR}/" in f"/{key}"

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        value = await super().get(key, prototype, byte_range)
        if value is None and self._is_chunk(key):
            raise MissingChunkError(f"chunk file {self.root / key} is missing")
        return value

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        value = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        if value is None and self._is_chunk(key):
            raise MissingChunkError(f"chunk file {self.root / key} is missing")
        return value


def modality_path(subject: str, modality: str, group: str | None = None) -> str:
    """Key of a subject's array inside the store: ``<group>/<modality>`` where ``group`` is the
    row's version folder (e.g. ``subjects/sub-01/v1732...``), ``subjects/<id>`` in format 1."""
    return f"{group or f'{SUBJECTS}/{subject}'}/{modality}"


NORMALIZE_BLOCK = 1 << 16
"""Voxels per step of the fused normalisation: small enough that both passes stay in cache."""


def scaled_float32(raw: np.ndarray, slope: float, inter: float, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> float32 data values (NIfTI scaling applied in float64, then rounded),
    i.e. ``np.asarray(nibabel.load(f).dataobj).astype(np.float32)``."""
    out = np.empty(raw.shape, dtype=np.float32) if out is None else out
    if slope == 1.0 and inter == 0.0:
        out[...] = raw
    else:
        out[...] = raw * np.float64(slope) + np.float64(inter)
    return out


def normalized_float32(raw: np.ndarray, slope: float, inter: float, mean: float, std: float,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> z-scored float32: ``(raw * slope + inter - mean) / std``.

    Scaling and z-score fold into one multiply-add, done block by block so that the second
    pass reads from cache: a full-resolution run costs about one pass over memory.
    """
    a = np.float32(slope / std)
    b = np.float32((inter - mean) / std)
    out = np.empty(raw.shape, dtype=np.float32) if out is None else out
    src, dst = raw.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, NORMALIZE_BLOCK):
        block = dst[i:i + NORMALIZE_BLOCK]
        np.multiply(src[i:i + NORMALIZE_BLOCK], a, out=block, dtype=np.float32)
        block += b
    return out


def _scaling(meta: dict) -> tuple[float, float, float, float]:
    """(scl_slope, scl_inter, mean, std) from an image's attributes (:meth:`CohortStore.meta`)."""
    return meta["nifti"]["scl_slope"], meta["nifti"]["scl_inter"], meta["stats"]["mean"], meta["stats"]["std"]


class CohortStore:
    """Read-only view of a cohort store (see module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pid: int | None = None
        self._root: Any = None
        self._attrs: dict | None = None
        self._arrays: dict[str, Any] = {}
        self._rowmap: dict[str, dict] = {}
        self._check_exists()

    # ------------------------------------------------------------------ process-local handles
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _check_exists(self) -> None:
        if not self.path.exists():
            raise StoreError(f"cohort store {self.path} does not exist; {FIX}")
        if not (self.path / ROOT_META).is_file():
            raise StoreError(f"{self.path} is not a Zarr v3 cohort store (no {ROOT_META}); {FIX}")

    def _open(self) -> Any:
        if self._root is None or self._pid != os.getpid():
            try:
                root = zarr.open_group(StrictLocalStore(self.path, read_only=True), mode="r")
                attrs = dict(root.attrs)
            except OSError as e:  # e.g. permissions: the file may be fine
                raise StoreError(f"cannot open cohort store {self.path} ({type(e).__name__}: {e})") from e
            except Exception as e:  # whatever zarr makes of unreadable metadata
                raise StoreError(damaged_root(self.path, e)) from e
            if attrs.get("masan_store", {}).get("format") != FORMAT:
                raise StoreError(f"{self.path} is a Zarr group but not a MASAN cohort store; {FIX}")
            try:
                rowmap = table_rows(self.path, attrs)
            except ValueError as e:
                raise StoreError(str(e)) from None
            self._root, self._attrs, self._arrays, self._pid = root, attrs, {}, os.getpid()
            self._rowmap = rowmap
        return self._root

    @property
    def attrs(self) -> dict:
        """Root attributes (format, classes, cohort table, conversion options, ...)."""
        self._open()
        return self._attrs

    def _refresh(self) -> None:
        """Forget the cached table and arrays: the next access rereads the root zarr.json."""
        self._root = None

    def _retrying(self, subject: str, read: Callable[[], Any]) -> Any:
        """Run ``read()``; when it fails because a reconversion replaced the subject's version
        meanwhile (the table now points elsewhere), reload the table and run it once more,
        whole, so a result never mixes two versions."""
        self._open()
        before = self.group_path(subject) if subject in self._rows else None
        try:
            return read()
        except StoreError:
            self._refresh()
            self._open()
            if before is None or subject not in self._rows or self.group_path(subject) == before:
                raise
            return read()

    def group_path(self, subject: str) -> str:
        """Store key of the subject's current version folder (from its cohort-table row)."""
        return self.row(subject).get("group") or f"{SUBJECTS}/{subject}"

    def image_path(self, subject: str, modality: str) -> Path:
        """Version-free folder of a subject's image for other tools (``niizarr.zarr2nii``,
        OME-Zarr viewers): ``STORE/subjects/<id>/current/<modality>``, or
        ``STORE/subjects/<id>/<modality>`` for a subject stored before versions. It always
        shows the current version; pin one with ``os.path.realpath`` to read it over a
        reconversion. A store written before ``current`` existed gets it from any rerun of
        to_zarr (until then the path is absent)."""
        if not self.has(subject, modality):
            self._array(subject, modality)  # raises the explanatory KeyError
        folder = self.path / SUBJECTS / subject
        return folder / CURRENT / modality if self.row(subject).get("group") else folder / modality

    def _array(self, subject: str, modality: str) -> Any:
        self._open()
        key = modality_path(subject, modality, self._rows.get(subject, {}).get("group"))
        arr = self._arrays.pop(key, None)  # put back last: the most recently read are kept
        if arr is None:
            if not self.has(subject, modality):
                have = [m for m in MODALITIES if self.has(subject, m)] if subject in self._rows else None
                what = f"has only {have}" if have is not None else "is not in the store"
                raise KeyError(f"subject {subject!r} {what}; cannot read {modality!r} from {self.path}")
            self._check_inside(key)
            try:
                arr = nifti_zarr.open_image(self._root[key])
            except Exception as e:
                raise StoreError(f"{self.path}: array {key} is missing or damaged ({type(e).__name__}: {e}); "
                                 f"{FIX}") from e
        self._arrays[key] = arr
        if len(self._arrays) > OPEN_ARRAYS:
            # another thread reading the store may evict the same one: the loser just skips it
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self._arrays[next(iter(self._arrays))]
        return arr

    def _check_inside(self, key: str) -> None:
        """StoreError when the array ``key`` lies outside the store, reached through a link: what
        the tools write from a store is as open as the store (its root's access), so data linked
        in from a closed store would be shown in files more readable than it is."""
        real, root = os.path.realpath(self.path / key), os.path.realpath(self.path)
        if os.path.commonpath([real, root]) != root:
            raise StoreError(f"{self.path}: array {key} is a link to {real}, outside the store: the tools read a "
                             f"subject only from inside its store, whose access their outputs follow; {FIX}")

    # ------------------------------------------------------------------ cohort table
    @property
    def table(self) -> list[dict]:
        """Cohort rows: subject, label, and per modality shape, dtype, source, sha256."""
        return list(self.attrs.get("cohort", []))

    @property
    def _rows(self) -> dict[str, dict]:
        self._open()
        return self._rowmap

    @property
    def subjects(self) -> list[str]:
        return sorted(self._rows)

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes", []))

    def label(self, subject: str) -> str:
        return self.row(subject)["label"]

    def row(self, subject: str) -> dict:
        """The subject's cohort-table row."""
        row = self._rows.get(subject)
        if row is None:
            raise KeyError(f"subject {subject!r} is not in cohort store {self.path} "
                           f"({len(self._rows)} subjects; see data_tools/inspect_store.py)")
        return row

    def has(self, subject: str, modality: str) -> bool:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return self._rows.get(subject, {}).get(modality) is not None

    def shape(self, subject: str, modality: str) -> tuple[int, ...]:
        """Stored shape: (X, Y, Z) for t1, (T, X, Y, Z) for fmri (from the table, no I/O)."""
        if not self.has(subject, modality):
            self._array(subject, modality)  # raises the explanatory KeyError
        return tuple(self.row(subject)[modality]["shape"])

    def meta(self, subject: str, modality: str) -> dict:
        """Our attributes of one image: nifti, transform, stats, checksum (and levels)."""
        return self._retrying(subject, lambda: self._array(subject, modality)[1])

    def scaling(self, subject: str, modality: str) -> tuple[float, float, float, float]:
        """(scl_slope, scl_inter, mean, std): data value = stored * slope + inter; the z-score
        uses the subject's mean/std of the data values (computed at conversion)."""
        return _scaling(self.meta(subject, modality))

    def affine(self, subject: str, modality: str) -> np.ndarray:
        """(4, 4) float64 voxel -> world (mm) affine of the stored array (true after transforms)."""
        return np.asarray(self.meta(subject, modality)["affine"], dtype=np.float64)

    # ------------------------------------------------------------------ voxels
    def read_raw(self, subject: str, modality: str, frames: slice | None = None,
                 region: Region | None = None) -> np.ndarray:
        """Stored values exactly (the file's dtype, native order): t1 (X,Y,Z), fmri (T,X,Y,Z)."""
        return self._retrying(subject, lambda: self._read_raw(subject, modality, frames, region))

    def _read_raw(self, subject: str, modality: str, frames: slice | None, region: Region | None) -> np.ndarray:
        arr, _ = self._array(subject, modality)
        index: tuple = tuple(region) if region is not None else (slice(None),) * 3
        if modality == "fmri":
            index = (frames if frames is not None else slice(None),) + index
        elif frames is not None:
            raise ValueError("frames= only applies to fmri")
        try:
            return arr[index]
        except Exception as e:
            raise StoreError(f"{self.path}: cannot read {modality} of subject {subject} "
                             f"({modality_path(subject, modality, self._rows[subject].get('group'))}: "
                             f"{type(e).__name__}: {e}); the store is damaged; {FIX}") from e

    def _read(self, subject: str, modality: str, frames: slice | None, region: Region | None,
              normalize: bool) -> np.ndarray:
        """float32 values; fMRI is read and converted one shard of frames at a time, so the
        stored values never exist as a whole-run intermediate (half the memory traffic)."""
        return self._retrying(subject, lambda: self._read_once(subject, modality, frames, region, normalize))

    def _read_once(self, subject: str, modality: str, frames: slice | None, region: Region | None,
                   normalize: bool) -> np.ndarray:
        arr, meta = self._array(subject, modality)
        slope, inter, mean, std = _scaling(meta)

        def convert(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            if normalize:
                return normalized_float32(raw, slope, inter, mean, std, out)
            return scaled_float32(raw, slope, inter, out)

        if modality == "t1" or (frames is not None and frames.step not in (None, 1)):
            return convert(self._read_raw(subject, modality, frames, region))
        start, stop, _ = (frames if frames is not None else slice(None)).indices(arr.shape[0])
        step = (arr.shards or arr.chunks)[0]
        out = None
        for t0 in range(start, stop, step):
            raw = self._read_raw(subject, modality, slice(t0, min(t0 + step, stop)), region)
            if out is None:
                out = np.empty((stop - start,) + raw.shape[1:], dtype=np.float32)
            convert(raw, out[t0 - start:t0 - start + raw.shape[0]])
        return out if out is not None else convert(self._read_raw(subject, modality, frames, region))

    def read_t1(self, subject: str, region: Region | None = None, normalize: bool = True) -> np.ndarray:
        """T1 as float32 (X, Y, Z) (or the ``region`` box); z-scored when ``normalize``."""
        return self._read(subject, "t1", None, region, normalize)

    def read_fmri(self, subject: str, frames: slice | None = None, region: Region | None = None,
                  normalize: bool = True) -> np.ndarray:
        """fMRI as float32 (T, X, Y, Z); ``frames`` selects a time range, ``region`` a box."""
        return self._read(subject, "fmri", frames, region, normalize)

    # ------------------------------------------------------------------ conversion record
    def unfinished_conversion(self) -> str | None:
        """A warning when the store's last conversion did not finish (interrupted, killed, or
        running now), else None. Such a store is consistent but may hold only part of the
        cohort, and the subjects it lacks are not reported as failures."""
        last = self.attrs.get(LAST_CONVERSION) or {}
        if last.get("finished", True):  # stores converted before it was recorded finished or said nothing
            return None
        why = last.get("aborted") or "killed, or running now"
        return (f"the last conversion of {self.path} did not finish ({why}) after converting "
                f"{last.get('converted', 0)} of {last.get('to_convert', '?')} subjects, so it may hold only part of "
                "the cohort; rerun data_tools/to_zarr.py with the same inputs and --out to finish it")

    def report(self) -> dict:
        """The last conversion's report (failures, warnings); {} when none was written."""
        p = self.path / REPORT
        return json.loads(p.read_text()) if p.is_file() else {}

    def __repr__(self) -> str:
        return f"CohortStore({str(self.path)!r})"
