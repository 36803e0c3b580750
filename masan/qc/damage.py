"""Why a subject's arrays could not be read, in words a reader can act on.

The store wraps every failed read in :class:`~masan.store.cohort.StoreError` ("damaged"); the
true cause sits in its exception chain and needs a different fix: a folder or file this user
may not read (permissions: run as the owner or fix the modes; the data are fine), a chunk file
that is gone, or one whose bytes no longer match their checksum (reconvert the subject).
:func:`reading` turns any of them into :class:`Unreadable`, which ``qc_report.py`` shows as
one flagged subject instead of stopping.

A corrupt chunk can also still decode, to other values: the codec's own check misses it when
the chunk has none or the damage keeps it valid. The checks read every stored value of level
0 anyway, so they take its CRC-32 on the way (:func:`crc32`) and :func:`check_values` compares
it with the one the conversion recorded (``checksum.crc32``, :mod:`masan.store.nifti_zarr`).
"""

from __future__ import annotations

import os
import pwd
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from masan.store.cohort import CohortStore, MissingChunkError, StoreError

RECONVERT = ("rerun data_tools/to_zarr.py with the same inputs and --verify (it reconverts subjects whose "
             "arrays no longer match their checksums)")


class Unreadable(Exception):
    """A subject's ``modality`` (``t1``/``fmri``) could not be read; the message says why and the fix."""

    def __init__(self, modality: str, message: str):
        super().__init__(message)
        self.modality = modality


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _blocking(path: Path, store: Path) -> Path | None:
    """The outermost folder or file on the way from ``store`` to ``path`` that this user may not
    read (a folder also needs search permission); None when none is found (e.g. an ACL)."""
    try:
        parts = path.relative_to(store).parts
    except ValueError:
        parts = ()
    here = store
    for part in ("", *parts):
        here = here / part if part else here
        try:
            is_dir = stat.S_ISDIR(here.stat().st_mode)
        except OSError:
            return None  # its parent already blocked it, or it is gone
        if not os.access(here, os.R_OK | (os.X_OK if is_dir else 0)):
            return here
    return None


def permission_message(err: PermissionError, store: Path) -> str:
    """``permission denied reading <file> (<the folder that blocks it>, its mode and owner): <fix>``."""
    path = Path(err.filename) if err.filename else store
    blocker = _blocking(path, store)
    if blocker is None:
        return (f"permission denied reading {path}: run qc_report.py as the store's owner or fix the "
                f"permissions (ls -l {path.parent})")
    mode = stat.filemode(blocker.stat().st_mode)
    return (f"permission denied reading {path} ({blocker} is {mode}, owned by {_owner(blocker)}): run "
            f"qc_report.py as the store's owner or fix the permissions (e.g. chmod -R u+rX,g+rX {blocker}, "
            "as its owner)")


def cause(exc: BaseException, store: CohortStore, subject: str, modality: str) -> str:
    """The true cause of a failed read of ``subject``'s ``modality`` and its fix, as one sentence."""
    for e in _chain(exc):
        if isinstance(e, PermissionError):
            return permission_message(e, store.path)
    for e in _chain(exc):
        if isinstance(e, MissingChunkError):
            return f"missing chunk of the {modality}: {e}; the store is damaged: {RECONVERT}"
    root = list(_chain(exc))[-1]
    where = f"{store.path / store.group_path(subject) / modality}"
    return (f"cannot read the {modality} under {where} ({type(root).__name__}: {root}): a chunk is corrupt "
            f"or the store damaged; {RECONVERT}")


def crc32(raw: np.ndarray, crc: int = 0) -> int:
    """``crc`` continued over the stored values ``raw``, the way the conversion recorded them
    (:func:`masan.store.nifti_zarr.array_checksum`: C order, native dtype): the blocks of a run,
    first frames first, give the whole array's."""
    return zlib.crc32(memoryview(np.ascontiguousarray(raw)).cast("B"), crc)


def check_values(store: CohortStore, subject: str, modality: str, recorded: str | None, crc: int) -> None:
    """Raise :class:`Unreadable` when ``crc`` (:func:`crc32` of every stored value of the
    ``modality``'s level 0) differs from the ``recorded`` one; stores without one pass."""
    if recorded is not None and f"{crc:08x}" != recorded:
        where = store.path / store.group_path(subject) / modality
        raise Unreadable(modality, f"{subject}: the {modality} under {where} does not match the checksum recorded "
                                   f"at conversion (CRC-32 {crc:08x}, recorded {recorded}): a chunk is corrupt but "
                                   f"still decodes, to other values; {RECONVERT}")


@contextmanager
def reading(store: CohortStore, subject: str, modality: str) -> Iterator[None]:
    """Raise :class:`Unreadable` (with :func:`cause`) for a read in the block that fails because of
    the data or their permissions; anything else (a bug) propagates unchanged."""
    try:
        yield
    except (StoreError, OSError) as e:
        raise Unreadable(modality, f"{subject}: {cause(e, store, subject, modality)}") from e
