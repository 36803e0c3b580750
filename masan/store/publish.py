"""How a conversion owns and changes a cohort store without ever losing or half-showing a subject.

- :class:`StoreLock`: ``STORE/.lock`` (flock, exclusive) is held by the converting process
  for the whole run. The file is never deleted (zarr's ``mode="w"`` used to delete it right
  after it was locked, so a second converter locked a new file). Its workers hold
  ``STORE/.lock.workers`` shared for their lives; a new run takes that one exclusively
  (briefly) before writing, so workers left by a killed converter can never race it.
- :func:`worker_init`: a worker dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a
  parent-pid watchdog everywhere), so kill -9 of the converter leaves no orphan publishing.
- :func:`publish_version`: a subject is written as a new version folder
  ``subjects/<id>/v<ns>`` (one rename from staging, nothing replaced); the cohort table in
  the root ``zarr.json`` (replaced atomically by zarr's LocalStore) then points at it, and
  only after that are older versions removed (:func:`drop_versions`). A reader sees the
  old version or the new one, never a gap.
- :func:`point_current`: the subject's own group ``subjects/<id>/zarr.json`` names its
  current version, and ``subjects/<id>/current`` is a relative symlink to it, so tools open
  ``subjects/<id>/current/t1`` without knowing the version. Both are replaced atomically
  (temporary name + ``os.replace``) once the table points at the version and before older
  versions go, so the link never names a removed or half-written version.
- :func:`run_pool`: subjects over worker processes; a worker that dies (OOM killer,
  kill -9) fails only the subject it held, the pool is rebuilt and the others go on.
- :func:`stop_signals`: SIGINT and SIGTERM stop a conversion as an :class:`Interrupted`
  exception in the converting process, which stops its workers (they ignore both signals) and
  writes its report; what was published stays, and a rerun resumes. :func:`settle_io` first
  lets the zarr writes the signal cut short end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import multiprocessing.util
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

from masan import access
from masan.files import atomic_writer
from masan.store.cohort import CURRENT, SAFE_ID, SUBJECTS

LOCK = ".lock"
WORKERS_LOCK = ".lock.workers"
LOCK_FILES = (LOCK, WORKERS_LOCK)
VERSION = re.compile(r"^v\d+$")
"""Name of a subject's version folder (``v`` + nanoseconds since the epoch at publication)."""
GROUP_FILE = "zarr.json"
SUBJECT_ATTRS = "masan"
"""Attribute of a subject's group: ``{"subject": id, "current": "v<ns>" or None}``."""
_TEMP = re.compile(r"^\.(zarr\.json|current)\..+\.tmp$")
"""Temporary names of :func:`point_current` (left only by a process killed mid-replace)."""
ORPHAN_WAIT_S = 10.0
"""How long a new run waits for workers of a killed run to notice and exit (they poll each 0.5 s)."""
_PR_SET_PDEATHSIG = 1
_WATCHDOG_S = 0.5
ORPHAN_EXIT = 70
"""A worker's exit status when its converter is gone (EX_SOFTWARE): it stops before publishing,
which would race whoever holds the store's lock next."""


class LockError(ValueError):
    """Another conversion (or its workers) is writing the store; exit code 2."""


def _flock(f: IO, how: int) -> bool:
    try:
        fcntl.flock(f, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class StoreLock:
    """Exclusive lock on ``STORE/.lock`` for one conversion, released on exit or kill.

    After locking, the file must still be the one at ``STORE/.lock`` (same inode): a lock
    on a file someone deleted would exclude nobody. Workers of an earlier, killed run are
    waited for (they die within a second) before the lock is granted.
    """

    def __init__(self, root: Path):
        self.root = root
        self.file: IO | None = None

    def __enter__(self) -> "StoreLock":
        path = self.root / LOCK
        for _ in range(3):
            f = path.open("a+")  # "a+": a refused process must not truncate the holder's pid
            if not _flock(f, fcntl.LOCK_EX):
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise LockError(f"another conversion (pid {holder}) is writing {self.root}; wait for it "
                                "to finish (or stop it) and rerun")
            if os.path.exists(path) and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
            f.close()  # locked a file that was replaced meanwhile: lock the current one
        else:
            raise LockError(f"{path} keeps being replaced; is another tool deleting files in {self.root}?")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        try:
            self._wait_for_orphans()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_orphans(self) -> None:
        """Take the workers' lock exclusively once: no worker of an earlier run still lives."""
        with (self.root / WORKERS_LOCK).open("a+") as w:
            deadline = time.monotonic() + ORPHAN_WAIT_S
            while not _flock(w, fcntl.LOCK_EX):
                if time.monotonic() > deadline:
                    raise LockError(f"worker processes of an earlier conversion still hold {w.name}; "
                                    f"stop them (`fuser -k {w.name}`) and rerun")
                time.sleep(0.2)
            fcntl.flock(w, fcntl.LOCK_UN)

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


# ====================================================================== stopping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and what ``kill``, SLURM's time limit and preemption send."""
LEAVE = signal.SIGUSR1
"""What a stopping converter sends its own workers: leave now (:func:`_leave`)."""
LEAVE_WAIT_S = 5.0
"""How long stopped workers get to leave before they are killed: one inside a long C call
(an ANTs registration) notices the signal only when the call returns."""


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the conversion (:func:`stop_signals`). Not an ``Exception``: the
    per-subject ``except Exception`` must not record it as that subject's failure."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.report: Any = None
        """The conversion's report (:class:`masan.convert.cohort.Report`), set when the
        signal came during :func:`masan.convert.cohort.convert_cohort`."""


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so a
    conversion stops as on an error: workers killed, report written, what was published kept.
    The first signal gives both back their default action, so a second one ends the process at
    once (as safe for the store as kill -9). Whatever ends the block first lets zarr's writes
    and reads in flight end (:func:`settle_io`). Python sets handlers only in the main thread:
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum)

    before = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    except BaseException:
        settle_io()
        raise
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


SETTLE_S = 10.0
"""How long a stopped tool waits for the zarr reads and writes a signal cut short to end."""


def settle_io(timeout_s: float = SETTLE_S) -> None:
    """Wait (at most ``timeout_s``) for zarr's background I/O to end. A signal that stops the
    main thread inside a zarr call stops only the waiting: the writes go on in zarr's event-loop
    thread, into staging that the next run removes. Waiting for them lets the store's own record
    of the stop be written after them, and lets the interpreter exit without zarr reporting every
    task it cut short."""
    zarr_sync = sys.modules.get("zarr.core.sync")  # zarr's I/O loop is module state there, made on first use
    loop = getattr(zarr_sync, "loop", [None])[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def drain() -> None:
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=timeout_s)

    with contextlib.suppress(Exception):  # a loop that stopped meanwhile has nothing left to wait for
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s + 1)


# ====================================================================== workers

_PARENT: int | None = None
_WORKER_LOCK: IO | None = None  # kept open: the shared lock lives as long as the worker


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; a watchdog thread covers other
    systems and the moment before the prctl call (the parent may already be gone)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCHDOG_S)
        os._exit(ORPHAN_EXIT)

    if os.getppid() != parent:
        os._exit(ORPHAN_EXIT)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def worker_init(parent: int, store: str) -> None:
    """Initializer of every conversion worker: die with the parent, hold the workers' lock,
    and leave SIGINT and SIGTERM to the parent, which kills its workers when it stops
    (:func:`stop_signals`): Ctrl-C reaches the whole process group and SLURM signals every
    process of the job, and a worker dying of it would look like a subject that killed it."""
    global _PARENT, _WORKER_LOCK
    _PARENT = parent
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(LEAVE, _leave)
    _die_with_parent(parent)
    _WORKER_LOCK = open(Path(store) / WORKERS_LOCK, "a+")
    fcntl.flock(_WORKER_LOCK, fcntl.LOCK_SH)  # granted at once: the parent released its check


def _leave(_signum: int, _frame: Any) -> None:
    """A worker's exit on :data:`LEAVE`. It first releases the process-shared locks it made
    (blosc makes one): a killed worker leaves them to multiprocessing's resource tracker, which
    warns of leaked semaphores. Not through the interpreter's own exit, which would report
    every zarr write it cut short."""
    multiprocessing.util._run_finalizers(0)  # what a normal exit runs first
    os._exit(0)


def parent_alive() -> bool:
    """In a worker: whether the converter that started it still runs (always True in-process)."""
    return _PARENT is None or os.getppid() == _PARENT


# ====================================================================== versions


def new_version() -> str:
    return f"v{time.time_ns()}"


def version_group(subject: str, version: str) -> str:
    """Store key of one version of a subject, e.g. ``subjects/sub-01/v1732590000000000000``."""
    return f"{SUBJECTS}/{subject}/{version}"


def publish_version(root: Path, subject: str, staging: Path, version: str) -> str:
    """Move a verified staged group to its version folder (one rename; nothing is replaced,
    so readers of the current version are untouched). Returns the group key.

    A new subject's folder gets its group file at once (``current`` None until the table
    lists it), so a tree walk never meets a subject folder that is not a Zarr group."""
    if not parent_alive():
        os._exit(ORPHAN_EXIT)
    key = version_group(subject, version)
    folder = root / SUBJECTS / subject
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / GROUP_FILE).exists():  # an existing one is the subject's group, or a pre-version subject
        _write_subject_group(root, subject, None)
    os.rename(staging, root / key)
    return key


def _store_file_mode(root: Path) -> int:
    """Permission bits of the store's files (those of the root ``zarr.json``, which every
    conversion sets from the sources or ``--mode``); 0o600 when it cannot be read."""
    try:
        return stat.S_IMODE(os.stat(root / GROUP_FILE).st_mode) & 0o666
    except OSError:
        return 0o600


def _write_subject_group(root: Path, subject: str, version: str | None) -> None:
    """Replace ``subjects/<id>/zarr.json`` atomically by the subject's group naming ``version``.

    The temporary file is created under a umask no looser than the store's files and given
    exactly their mode before any byte is written (a reader may keep a file it opened while
    it was more open), so it is never readable by more users than the rest of the store."""
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {SUBJECT_ATTRS: {"subject": subject, "current": version}}}
    mode = _store_file_mode(root)
    with access.creation_umask(mode), atomic_writer(root / SUBJECTS / subject / GROUP_FILE) as f:
        os.fchmod(f.fileno(), mode)
        json.dump(meta, f, indent=2)


def _named_version(folder: Path) -> str | None:
    """The version a subject's group file names (None: absent, unreadable, or a pre-version
    subject's own group)."""
    try:
        attrs = json.loads((folder / GROUP_FILE).read_text())["attributes"]
        return attrs[SUBJECT_ATTRS]["current"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def point_current(root: Path, subject: str, version: str) -> None:
    """Make ``subjects/<id>/current`` a relative symlink to ``version`` and name it in the
    subject's group attributes; both replaced atomically, the link last.

    Call only for a complete version the table already points at (:func:`drop_versions`
    does). A real folder at ``current`` is a copy of the store that followed the link
    (``shutil.copytree``, ``cp -rL``): nothing reads it, so it is removed first."""
    folder = root / SUBJECTS / subject
    link = folder / CURRENT
    if _named_version(folder) != version:  # a rerun that changes nothing rewrites nothing
        _write_subject_group(root, subject, version)
    if link.is_symlink() and os.readlink(link) == version:
        return
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = folder / f".{CURRENT}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.symlink(version, tmp)  # relative: the store can be moved or copied with its links (cp -a, rsync -a)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def drop_versions(root: Path, subject: str, keep: str | None) -> None:
    """Point ``current`` at the group key ``keep`` (:func:`point_current`), then remove every
    other version of ``subject`` (None: the subject's folder goes). Call only once the cohort
    table points at ``keep``, so no reader following the table loses its version. A folder of
    the old, unversioned layout (``subjects/<id>/t1`` directly) counts as one old version;
    its ``zarr.json`` becomes the subject's group. Reruns call this for every subject, which
    also gives stores written before subject groups their ``zarr.json`` and ``current``."""
    if not SAFE_ID.fullmatch(subject):  # the callers check the table; a deletion is checked again here
        raise ValueError(f"{subject!r} is not a subject id: nothing of {root / SUBJECTS} is named so")
    folder = root / SUBJECTS / subject
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    keep_name = keep.rsplit("/", 1)[-1]
    if not VERSION.match(keep_name) or not (folder / keep_name).is_dir():
        return  # the table names a version that is gone (a damaged store): change nothing, verify reports it
    point_current(root, subject, keep_name)
    for child in folder.iterdir():
        if child.name in (keep_name, GROUP_FILE, CURRENT):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _ours(name: str) -> bool:
    """A name a versioned subject folder may hold: versions, its group file, the link, temporaries."""
    return bool(VERSION.match(name) or _TEMP.match(name)) or name in (GROUP_FILE, CURRENT)


def is_subject_folder(folder: Path) -> bool:
    """A folder of ``subjects/`` holding only subject data (versions, or the old layout)."""
    return folder.is_dir() and all(_ours(c.name) or c.name in ("t1", "fmri") for c in folder.iterdir())


def drop_unreferenced(out: Path, rows: dict[str, dict]) -> None:
    """Remove subject versions no table row points at (left by a killed run or worker; no
    reader can know them), and point each listed subject's ``current`` at its row's version.
    Folders that are not subject data are left alone."""
    for folder in sorted((out / SUBJECTS).iterdir()) if (out / SUBJECTS).is_dir() else ():
        if not folder.is_dir() or folder.is_symlink() or not SAFE_ID.fullmatch(folder.name):
            continue
        row = rows.get(folder.name)
        if row is None:
            if is_subject_folder(folder) and all(_ours(c.name) for c in folder.iterdir()):
                drop_versions(out, folder.name, keep=None)
        elif row.get("group"):
            drop_versions(out, folder.name, keep=row["group"])


# ====================================================================== worker pool


def run_pool(jobs: list, fn: Callable, args: tuple, workers: int, store: Path,
             record: Callable[[dict], None], died: Callable[[Any, str], None],
             tick: Callable[[], None] = lambda: None) -> None:
    """Run ``fn(job, *args)`` for every job over ``workers`` processes, passing each result to
    ``record`` in the parent; ``died(job, why)`` for a job whose worker process died.

    At most ``workers`` jobs are in flight, so when the pool breaks the suspects are exactly
    the jobs in flight. A lone suspect is the culprit; several are rerun one at a time (alone
    in flight) in the rebuilt pool, so only a subject that kills its worker again is failed
    (an OOM subject), while those merely in flight beside it are converted.
    """
    queue, solo = deque(jobs), deque()
    while queue or solo:
        lost = _drain(queue, solo, workers, fn, args, store, record, tick)
        if len(lost) == 1:
            died(lost[0], "the worker process converting it died (killed, e.g. by the out-of-memory killer "
                          "or kill -9); the other subjects went on")
            tick()
        else:
            solo.extend(lost)


def _drain(queue: deque, solo: deque, n: int, fn: Callable, args: tuple, store: Path,
           record: Callable[[dict], None], tick: Callable[[], None]) -> list:
    """Run ``solo`` jobs one at a time, then ``queue`` jobs ``n`` at a time, in one pool, until
    both are empty or the pool breaks; returns the jobs in flight when it broke (else [])."""
    ctx = get_context("spawn")  # no inherited locks, threads or zarr state
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(), str(store))) as pool:
        inflight: dict = {}
        suspects: set = set()  # futures of solo jobs: nothing else runs beside them
        try:
            while queue or solo or inflight:
                while not suspects:
                    # a worker that died while results were recorded breaks the pool for submit() too:
                    # the job stays where it was, and those in flight are the suspects
                    if solo:
                        if inflight:
                            break  # let the others finish, then the suspect runs alone
                        try:
                            fut = pool.submit(fn, solo[0], *args)
                        except BrokenProcessPool:
                            return _suspects(pool, inflight, record, tick)
                        inflight[fut] = solo.popleft()
                        suspects.add(fut)
                    elif queue and len(inflight) < n:
                        try:
                            fut = pool.submit(fn, queue[0], *args)
                        except BrokenProcessPool:
                            return _suspects(pool, inflight, record, tick)
                        inflight[fut] = queue.popleft()
                    else:
                        break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        return _suspects(pool, inflight, record, tick)
                    inflight.pop(fut)
                    suspects.discard(fut)
                    record(result)
                    tick()
        except BaseException:
            _stop_workers(pool)
            raise
    return []


def _suspects(pool: ProcessPoolExecutor, inflight: dict, record: Callable[[dict], None],
              tick: Callable[[], None]) -> list:
    """The jobs in flight when the broken ``pool`` broke that may have broken it: a job whose
    result came before the break is recorded, not rerun or failed (alone in flight, it would be
    taken for the culprit). The pool's other workers are ended here: the executor would end them
    with SIGTERM, which they ignore (:func:`worker_init`), and one waiting for a task behind the
    queue's lock that the killed worker held would wait for good, and the pool's shutdown with it."""
    _stop_workers(pool)
    left = []
    for fut, job in inflight.items():
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            record(fut.result())
            tick()
        else:
            left.append(job)
    return left


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool now, its workers' subjects unfinished: leaving the pool would wait for them
    (minutes each under registration), and a stopped run records none of them. What they leave
    is staging or a version no table names, which the next run removes."""
    workers = list((pool._processes or {}).values())  # the executor has no public way to reach them
    for proc in workers:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, LEAVE)
    deadline = time.monotonic() + LEAVE_WAIT_S
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)
