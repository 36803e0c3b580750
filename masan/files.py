"""Atomic file replacement: a reader sees the old file or the new one, never half of either.

Run directories (``config.yaml``, ``split.json``, ``DONE``, checkpoint manifests, ``jobs.json``),
QC reports and stores are read while they are written (``launch/status.py``, a resubmission,
another rank), and a crash or a full disk must not leave a truncated file that a later start
trusts. Every such write goes through :func:`atomic_writer` (or its ``atomic_write_*`` forms):

1. the data go to a hidden temporary file in the same folder (``.NAME.PID@HOST.RANDOM.tmp``: the
   same file system, so the rename is atomic; hidden and unique, so concurrent writers and
   folder listings never see it as the real file);
2. the file is flushed and fsync'ed, so the rename never publishes data still in the page
   cache (after a power loss the name would otherwise point at an empty file);
3. ``os.replace`` swaps it in, and the folder is fsync'ed so the new name itself survives.

Permissions: the temporary file is created with mode ``0o666`` filtered by the process umask,
exactly as ``open(path, "w")`` would, so :func:`masan.access.creation_umask` (run directories
and stores never more open than their sources) applies to it unchanged. ``tempfile.mkstemp``
is not used because it forces ``0o600``, which would close files a group may read.
A failed write removes its temporary file and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from masan.host import pid_alive


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (best effort: some file systems refuse fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file to write ``path`` through; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text; ``open_kwargs`` such as ``newline=""`` pass on) or ``"wb"``.
    For writers that want a file object (``csv.writer``, ``np.save``)::

        with atomic_writer(run_dir / "predictions.csv", newline="") as f:
            csv.writer(f).writerows(rows)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode {mode!r}: use 'w' (text) or 'wb' (bytes)")
    final = Path(path)
    tmp = final.with_name(temporary_name(final.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for open()
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


_TEMPORARY = re.compile(r"^\..+\.(\d+)@(.+)\.[0-9a-f]{8}\.tmp$")
"""How :func:`temporary_name` names a temporary file: its writer's pid and host are in it."""


def temporary_name(name: str) -> str:
    """The hidden, unique name of a temporary file to write ``name`` through
    (``.NAME.PID@HOST.RANDOM.tmp``, :data:`_TEMPORARY`): the writer is named, so a later write
    can tell a dead writer's file from a live one's, on this host or another that shares the
    folder."""
    return f".{name}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}.tmp"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_writer` in ``folder`` that a writer of this host
    left and that no longer runs (a write killed before its rename: hidden, they would stay for
    good); those of a live writer, or of another host's (it alone can tell), are left. Returns the
    files removed."""
    removed, host = [], socket.gethostname()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            m = _TEMPORARY.match(entry.name)
            if m and m.group(2) == host and entry.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; returns the path."""
    with atomic_writer(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically; returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent))


DISK_REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only"}
"""Errors of the file system, not of the data: every later write there fails alike until the
user frees space, raises the quota or remounts; a retry or the next subject cannot help."""


def disk_refusal(e: BaseException) -> str | None:
    """What a write met when the file system refused it (full, over quota, read-only), with the
    file when the error names one; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in DISK_REFUSALS:
        return None
    return DISK_REFUSALS[e.errno] + (f" writing {e.filename}" if e.filename else "")

