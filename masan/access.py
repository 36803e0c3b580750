"""Who may read what we write: stores and run directories never more open than their sources.

Cohort data often come under a data-use agreement (ADNI's forbids sharing). A converted
store, or a run directory naming each subject with its diagnosis, must therefore be no more
readable than the NIfTI files it came from, whatever the user's umask. The policy:

- :func:`restrictive_mode` gives the most restrictive file mode among the sources (and the
  group they share, if any); a directory's bits count only where it can also be entered, and
  a folder on the way to a source (up to /, and to a symbolic link's target) closes what it
  does not let through.
- :func:`creation_umask` keeps every file created while writing at most that open, so no
  file is ever briefly world-readable.
- :func:`tighten` (:func:`apply_access` with a report) sets the mode (directories get
  ``x`` where they have ``r``) and the group on a whole tree in one walk, and lists what was
  more open before; directories get set-gid so files created later inherit the group.
- :func:`more_open_than` lists the paths of an existing tree that are more open (warnings).
- :func:`write_restricted` does all three for a tool writing into an output folder: the
  folders it creates get the mode, an existing folder only the files it wrote.

Where a tool may write at all, asked before it writes anything: :func:`nearest_existing`,
:func:`not_a_folder` (a file in the way of a folder to be) and :func:`write_refusal` (a folder
this user may not write in, or on a read-only file system).

Modes are "file modes": permission bits for regular files (``0o640``); :func:`dir_mode`
derives the directory mode. The owner always keeps read and write (the writer is the owner).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

OWNER_RW = 0o600
"""The writer owns what it writes and must read/write it whatever the sources say."""
_CLASSES = ((0o400, 0o200, 0o100), (0o040, 0o020, 0o010), (0o004, 0o002, 0o001))
"""(r, w, x) bits of owner, group, other."""
T = TypeVar("T")


class AccessError(ValueError):
    """A requested mode or group cannot be used; the message says why and what to pass instead."""


def dir_mode(file_mode: int) -> int:
    """Directory bits for a file mode: ``x`` wherever ``r`` is set (0o640 -> 0o750)."""
    mode = file_mode & 0o666
    for r, _, x in _CLASSES:
        if mode & r:
            mode |= x
    return mode


def _effective_file_bits(st: os.stat_result) -> int:
    """What a path grants, expressed as file bits: a directory grants r/w to a class only
    when that class may also enter it (x); a file's own x bit never matters for data."""
    bits = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return bits & 0o666
    out = 0
    for r, w, x in _CLASSES:
        if bits & x:
            out |= bits & (r | w)
    return out


def _reach_file_bits(st: os.stat_result) -> int:
    """What a folder on the way to a path lets through, as file bits: a class reaches what lies
    below only where it may enter (x) the folder; listing it (r) is not needed to open a name
    that is known (BIDS names are)."""
    bits = stat.S_IMODE(st.st_mode)
    return sum(r | w for r, w, x in _CLASSES if bits & x)


def folders_on_the_way(path: str | os.PathLike) -> set[Path]:
    """Every folder a reader passes through to reach ``path``: those above it up to /, and,
    where a symbolic link lies on the way, those above the file it leads to. (A ``..`` after a
    link names, as text, folders that need not exist: only existing ones count.)"""
    written = {p for p in Path(os.path.abspath(path)).parents if p.is_dir()}
    return written | set(Path(os.path.realpath(path)).parents)


def restrictive_mode(paths: Iterable[str | os.PathLike]) -> tuple[int, int | None]:
    """The most restrictive file mode among ``paths`` (files or directories) and their shared
    group id (None when they do not all share one).

    The mode is the intersection of what every path grants (see :func:`_effective_file_bits`)
    and of what every folder on the way to it lets through (:func:`folders_on_the_way`: a file
    readable by all in a home folder only its owner may enter is its owner's alone), plus owner
    read/write. When the groups that may read differ, group bits are dropped: no single group
    may be given what each source gave only its own group. A folder on the way counts its group
    only when it lets its group through but not the others. No paths: ``(0o600, None)``.
    """
    paths = list(paths)
    return _combine([os.stat(p) for p in paths], [os.stat(f) for f in _on_the_way(paths)])


def _on_the_way(paths: list) -> set[Path]:
    """The folders on the way to any of ``paths`` (:func:`folders_on_the_way`)."""
    return set().union(*map(folders_on_the_way, paths))


def _combine(path_stats: list[os.stat_result], folder_stats: list[os.stat_result]) -> tuple[int, int | None]:
    """:func:`restrictive_mode` from the stats of the paths and of the folders on the way to them."""
    if not path_stats:
        return OWNER_RW, None
    mode, gids = 0o666, set()
    for st in path_stats:
        mode &= _effective_file_bits(st)
        gids.add(st.st_gid)
    for st in folder_stats:
        mode &= _reach_file_bits(st)
        if st.st_mode & 0o011 == 0o010:
            gids.add(st.st_gid)
    gid = gids.pop() if len(gids) == 1 else None
    if gid is None:
        mode &= ~0o070
    # Writing is never shared with every user, whatever the sources allow (files copied from a
    # CIFS share or an archive come as 666): anyone could swap a checkpoint or a label.
    return (mode & ~0o002) | OWNER_RW, gid


def narrowed_by(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The folders on the way to ``paths`` that make :func:`restrictive_mode` more closed than
    the paths alone would be, each as ``FOLDER (mode M, group G)``: why a store of 644 files in
    a 0700 home, or in a folder only another group may pass, is its owner's alone."""
    paths = list(paths)
    path_stats = [os.stat(p) for p in paths]
    folders = {f: os.stat(f) for f in sorted(_on_the_way(paths))}
    alone = _combine(path_stats, [])
    if _combine(path_stats, list(folders.values())) == alone:
        return []
    return [f"{folder} (mode {stat.S_IMODE(st.st_mode):o}, group {_group_name(st.st_gid)})"
            for folder, st in folders.items() if _combine(path_stats, [st]) != alone]


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def owner_name(uid: int) -> str:
    """A user's name, else ``uid N``."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def parse_mode(text: str) -> int:
    """``"640"``/``"0o640"`` -> 0o640 for a ``--mode`` flag; AccessError for anything else,
    including a mode that would keep the owner from reading or writing."""
    s = text.strip().lower().removeprefix("0o")
    try:
        mode = int(s, 8)
    except ValueError:
        raise AccessError(f"--mode {text!r} is not an octal file mode; use e.g. 600 (owner only) "
                          "or 640 (owner and group read)") from None
    if not 0 <= mode <= 0o777 or mode & OWNER_RW != OWNER_RW:
        raise AccessError(f"--mode {text!r} must be 3 octal digits whose first is 6 or 7 (the owner "
                          "reads and writes), e.g. 600 or 640")
    return mode & 0o666


def parse_group(text: str) -> int:
    """``--group`` value (a group name or numeric id) -> gid; AccessError naming the fix."""
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise AccessError(f"--group {text!r}: no such group; list yours with `id -Gn`") from None


@contextlib.contextmanager
def creation_umask(file_mode: int) -> Iterator[None]:
    """Set a umask so that files created inside are at most ``file_mode`` and directories at
    most :func:`dir_mode` of it; the previous umask is restored on exit.

    The umask is process-wide: worker processes started inside inherit it.
    """
    old = os.umask(0o777 & ~dir_mode(file_mode))
    try:
        yield
    finally:
        os.umask(old)


def _walk(root: Path, settled: Iterable[Path] = ()) -> Iterator[tuple[Path, os.stat_result]]:
    """``root`` and everything under it, without following symlinks below it (they are
    skipped: their targets are not ours to change). ``root`` itself is followed when it is a
    link: the user named it (``--out`` a link to the real folder), and skipping it would leave
    the whole tree as open as it was. A directory in ``settled`` is yielded but not entered (a
    tree whose contents are known to be as they should)."""
    root = Path(os.path.realpath(root))
    st = os.lstat(root)
    yield root, st
    if not stat.S_ISDIR(st.st_mode):
        return
    settled = {Path(os.path.realpath(s)) for s in settled}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # removed meanwhile (a reader's view is not ours to freeze)
                continue
            if not stat.S_ISLNK(st.st_mode):
                yield p, st
        if settled:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d not in settled]


def _more_open(st: os.stat_result, file_mode: int, gid: int | None) -> bool:
    """Whether a path (its lstat) grants group or others more than ``file_mode`` allows (a
    directory: more than :func:`dir_mode`), or, with ``gid``, group bits to another group."""
    bits = stat.S_IMODE(st.st_mode) & 0o077
    if stat.S_ISDIR(st.st_mode):
        allowed = dir_mode(file_mode) & 0o077
    else:
        allowed, bits = file_mode & 0o066, bits & 0o066  # a file's x bit shares nothing
    return bool(bits & ~allowed or (gid is not None and bits & 0o070 and st.st_gid != gid))


def tighten(root: str | os.PathLike, file_mode: int, gid: int | None = None,
            settled: Iterable[Path] = ()) -> tuple[int, int | None, list[Path]]:
    """Give every file under ``root`` ``file_mode`` and every directory :func:`dir_mode` of it
    (plus set-gid when ``gid`` is given, so later files inherit the group); chown to ``gid``.
    One walk of the tree (a store of thousands of subjects on a parallel file system pays for
    every ``lstat``); directories in ``settled`` keep their contents unvisited.

    When the group cannot be set (the user is not a member), group bits are dropped instead
    of leaving the data readable by whatever group it has. Returns the (mode, gid) applied and
    the paths that were more open than that before (sorted, for a warning).
    """
    file_mode = (file_mode & 0o666) | OWNER_RW
    root = Path(root)
    try:
        return _tighten(root, file_mode, gid, settled)
    except _NotMember:
        return _tighten(root, file_mode & ~0o070, None, settled)


class _NotMember(Exception):
    """chown to the requested group was refused: this user is not a member of it."""


def _tighten(root: Path, file_mode: int, gid: int | None, settled: Iterable[Path]
             ) -> tuple[int, int | None, list[Path]]:
    dmode = dir_mode(file_mode) | (stat.S_ISGID if gid is not None else 0)
    loose = []
    me = os.geteuid()
    for p, st in _walk(root, settled):
        more = _more_open(st, file_mode, gid)
        if more:
            loose.append(p)
        if st.st_uid != me and me != 0:  # a group member's file (a shared run or store): not ours to chmod
            if more:
                wanted = dir_mode(file_mode) if stat.S_ISDIR(st.st_mode) else file_mode
                raise AccessError(f"{p} belongs to {owner_name(st.st_uid)} and is more open than "
                                  f"{os.path.realpath(root)} may be (mode {stat.S_IMODE(st.st_mode):o}, at most "
                                  f"{wanted:o} wanted); ask them to close it (chmod {wanted:o} {p}), then run "
                                  "the same command again")
            continue
        if gid is not None and st.st_gid != gid:
            try:
                os.chown(p, -1, gid, follow_symlinks=False)
            except PermissionError:  # only this means "not a member": a refused chmod is raised as it is
                raise _NotMember from None
        want = dmode if stat.S_ISDIR(st.st_mode) else file_mode
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)  # after chown, which clears a directory's set-gid for non-members
    return file_mode, gid, sorted(loose)


def apply_access(root: str | os.PathLike, file_mode: int, gid: int | None = None,
                 settled: Iterable[Path] = ()) -> tuple[int, int | None]:
    """:func:`tighten` without the list: the (mode, gid) applied."""
    return tighten(root, file_mode, gid, settled)[:2]


def more_open_than(path: str | os.PathLike, file_mode: int, gid: int | None = None) -> list[Path]:
    """Paths under ``path`` granting group or others more than ``file_mode`` allows (for a
    directory: more than :func:`dir_mode`); with ``gid``, also any path with group bits that
    belongs to another group. Sorted; empty when the tree is as closed as asked."""
    return sorted(p for p, st in _walk(Path(path)) if _more_open(st, file_mode, gid))


def outermost_missing(path: str | os.PathLike) -> Path | None:
    """The outermost folder of ``path`` (resolved: absolute, symlinks followed) that does not
    exist yet, i.e. what ``mkdir(parents=True)`` would create; None when ``path`` exists."""
    created, parent = None, Path(path).resolve()
    while not parent.exists():
        created, parent = parent, parent.parent
    return created


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) or its nearest ancestor that exists: the folder a new ``path``
    would be created in, or the file in the way of it."""
    p = Path(os.path.abspath(path))
    return next(q for q in (p, *p.parents) if q.exists())


def not_a_folder(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a folder (``"is a file, not a folder"``, ``"lies below F, which is
    a file, not a folder"``), or None when it is one or can be created as one."""
    found = nearest_existing(path)
    if found.is_dir():
        return None
    return ("is a file, not a folder" if found == Path(os.path.abspath(path)) else
            f"lies below {found}, which is a file, not a folder")


def on_read_only_mount(path: str | os.PathLike) -> bool:
    """Whether the existing ``path`` lies on a file system mounted read-only (no mode change helps)."""
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def write_refusal(folder: str | os.PathLike) -> str | None:
    """Why this user cannot create files in the existing ``folder`` now, or None. Asks the
    kernel (``os.access``: mode bits, ACLs; a read-only mount refuses even root) and writes
    nothing."""
    if not Path(folder).is_dir():
        return f"{folder} is a file, not a folder"
    if on_read_only_mount(folder):
        return f"{folder} is on a read-only file system"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"you may not write in {folder}"
    return None


def write_restricted(
    sources: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    written: Iterable[str | os.PathLike],
    write: Callable[[], T],
) -> tuple[T, tuple[int, int | None]]:
    """Run ``write()``, which creates the folder ``out`` when needed and writes ``written``
    (files or folders) into it, so that nothing it writes is more open than ``sources``.

    Files are created under :func:`creation_umask` of :func:`restrictive_mode` of the sources;
    then :func:`apply_access` gives that mode and group to the outermost folder ``write()``
    created, or, when ``out`` existed (a user's folder that may hold files not ours to
    change), to each of ``written`` that exists: a file overwritten there keeps its old mode
    otherwise. The mode is given also when ``write()`` raises, to what it wrote so far.

    Returns (what ``write()`` returned, (file mode, gid) applied: see :func:`apply_access`).
    """
    mode, gid = restrictive_mode(sources)
    created = outermost_missing(out)
    applied = (mode, gid)
    with creation_umask(mode):
        try:
            result = write()
        finally:
            for p in [created] if created is not None else written:
                if os.path.lexists(p):
                    applied = apply_access(p, mode, gid)
    return result, applied


def describe_mode(file_mode: int, gid: int | None) -> str:
    """``0o640`` + gid -> ``"files 640, folders 750, group staff"`` for messages."""
    group = "" if gid is None else f", group {_group_name(gid)}"
    return f"files {file_mode:03o}, folders {dir_mode(file_mode):03o}{group}"


def denied(e: PermissionError) -> str:
    """One line for a path this user may not reach (``e``): the path, the first folder on the
    way that stops this user, with its owner, group and mode, and what to do. A shared project
    folder is often open to its group only."""
    if not e.filename:
        return f"permission denied ({e.strerror or e}); ask the owner of the files for access"
    path = Path(os.path.abspath(e.filename))
    # from / down: the first folder this user may not enter, else the path itself
    stop = next((f for f in reversed(path.parents) if not os.access(f, os.X_OK)), path)
    try:
        st = os.stat(stop)
        where = (f"{stop} (owner {owner_name(st.st_uid)}, group {_group_name(st.st_gid)}, mode "
                 f"{stat.S_IMODE(st.st_mode):o})")
    except OSError:
        where = str(stop)
    return (f"{path}: permission denied ({e.strerror}): {where} is not open to you; ask its owner for access "
            "(e.g. to add you to its group), or work on a copy you may read")


def reports_denied(prog: str) -> Callable:
    """Decorator of a tool's ``main``: a path this user may not reach (PermissionError) ends it
    in one line (:func:`denied`) with exit status 2, not a traceback."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except PermissionError as e:
                print(f"{prog}: {denied(e)}", file=sys.stderr)
                return 2
        return run
    return wrap
