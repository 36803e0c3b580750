"""One run, one writer: the run-directory lock, and ranks that die with their launcher.

Two runs in one run directory would write the same ``checkpoints/step_*`` folders and
discard each other's work, so rank 0 holds an exclusive ``flock`` on ``RUN_DIR/run.lock``
for the whole run (:func:`masan.train.run.run_training` takes and releases it). The lock
lives on an open file descriptor: the kernel releases it when the holder exits in any way,
kill -9 included, so a restart never finds a stale lock to clean up. Inside the file, the
holder's record (pid, host, since when, its launcher and SLURM job) names it to a refused
second start, which exits 2 (:class:`RunLockedError` is a config error).

How a refused start leaves the run directory byte for byte as it was (the invariant at the
top of :mod:`masan.train.run`):

1. :meth:`RunLock.take_existing`, before any check: if ``run.lock`` exists it is opened
   (never created, never written) and locked; held by another process -> refused. Taking a
   lock changes no byte, mode or mtime.
2. :meth:`RunLock.take`, once every check passed (the first change of a start): the file is
   created when missing (a new run directory, or one of an older version) and locked, then
   the holder's record is written into it. Two such starts racing on a directory without
   ``run.lock`` both create the same file (``O_CREAT`` without truncation); one of them gets
   the lock, the other is refused, having created at most what the winner writes anyway.

The file is never deleted or replaced (a lock on a replaced file would exclude nobody), and
forked children (DataLoader workers) close their inherited copy at once, so only rank 0
itself holds it: its death frees the run directory even while its workers linger.

Limits: ``flock`` is advisory (it stops masan runs, not a hand-run ``rm``), and only as good
as the file system's locking. Local disks: exact. NFS: Linux maps ``flock`` to NFS byte-range
locks, seen by every client, unless the mount uses ``local_lock=flock|all`` (then only this
node sees it); after a node *crash* the server frees its locks only when the client's lease
expires (about 90 s for NFSv4), so a SLURM restart (``SLURM_JOB_ID`` set) waits up to
:data:`SLURM_WAIT_S` for the lock instead of refusing at once. Lustre: mounted with ``flock``,
cluster-wide; with ``localflock``, this node only; with neither, ``flock`` fails and the run
goes on unlocked with a warning saying so (as on any file system that cannot lock).

:func:`die_with_launcher`: ranks started by ``launch/train_local.py`` ask Linux to SIGKILL
them when the launcher dies (``PR_SET_PDEATHSIG``), plus a parent-pid watchdog thread for
other systems; kill -9 of the launcher then leaves no rank training on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from datetime import datetime
from pathlib import Path

from masan.config import ConfigError
from masan.host import FLOCK_UNSUPPORTED
from masan.rundir import RunDir

log = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "MASAN_LAUNCHER_PID"
"""Set by launch/train_local.py for its ranks: the pid they die with, recorded in the lock."""
SLURM_WAIT_S = 180.0
"""How long a start inside a SLURM job waits for a held lock: the processes of a requeued or
preempted job may still be ending, and an NFS server frees a crashed node's locks only when
its lease expires."""
POLL_S = 1.0
_PR_SET_PDEATHSIG = 1
_held_fds: set[int] = set()


class RunLockedError(ConfigError):
    """Another run holds the run directory; launchers exit 2 and never restart it."""


def _close_in_child() -> None:
    # a forked child keeping the descriptor would keep the run directory locked after rank 0 died
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


def default_wait_s() -> float:
    """Seconds to wait for a held lock before refusing: 0 by hand, :data:`SLURM_WAIT_S` in a job."""
    return SLURM_WAIT_S if os.environ.get("SLURM_JOB_ID") else 0.0


class RunLock:
    """The lock on ``run_dir/run.lock`` (see the module text for the protocol).

    Args:
        run_dir: the run directory.
        wait_s: how long to wait for a lock held by another process before refusing.
    """

    def __init__(self, run_dir: str | os.PathLike, wait_s: float = 0.0):
        self.run_dir = Path(run_dir)
        self.path = RunDir(self.run_dir).lock
        self.wait_s = wait_s
        self.fd: int | None = None
        self.unsupported = False

    @property
    def held(self) -> bool:
        return self.fd is not None

    def take_existing(self) -> bool:
        """Lock ``run.lock`` if it exists, creating and writing nothing; raises RunLockedError
        when another process holds it. Returns whether this process now holds it."""
        if self.held or self.unsupported:
            return self.held
        try:
            # write access: NFS grants exclusive locks only to writers
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except PermissionError:
            return False  # the start's writability check refuses it, naming the folder
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._not_a_file() from None
            if e.errno != errno.EROFS:
                raise
            return False  # a read-only file system: the same check names it
        self._lock(self._plain(fd))
        return self.held

    def take(self) -> None:
        """Create ``run.lock`` when missing, lock it and write this process's record into it."""
        if not self.held and not self.unsupported:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:  # the start's writability check passes some such paths (/proc, for root)
                if e.errno == errno.ELOOP:
                    raise self._not_a_file() from None
                raise ConfigError(f"run_dir={self.run_dir}: cannot create {e.filename or self.path} ({e.strerror}); "
                                  "choose a run_dir in a folder you may write, e.g. run_dir=runs/NAME") from None
            self._lock(self._plain(fd))
        if self.held:
            since = datetime.now().astimezone().isoformat(timespec="seconds")  # with its offset: users' zones differ
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                      "launcher_pid": os.environ.get(LAUNCHER_PID_ENV),
                "slurm_job": os.environ.get("SLURM_JOB_ID")}
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(self.fd, 0)  # in place: a new file would not be the one locked
            os.pwrite(self.fd, data, 0)

    def _not_a_file(self) -> ConfigError:
        """A run.lock that is a symbolic link (or another kind of file): the lock record is written
        into it, so following it would overwrite whatever it points at."""
        return ConfigError(f"{self.path} is not a plain file (a symbolic link, a pipe...): a run's lock file is its "
                           "own; nothing was written through it. Remove it if the run is yours, then start again")

    def _plain(self, fd: int) -> int:
        """``fd`` when it is a regular file; else closed, and the refusal raised."""
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._not_a_file()
        return fd

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = describe_holder(self.path)
                    os.close(fd)
                    raise RunLockedError(
                        f"{self.run_dir} is in use by another run: {holder}. One run directory takes one run at a "
                        f"time (two would write the same checkpoints); wait until it ends, stop it (touch "
                        f"{self.run_dir / 'STOP'}, or end the process or job named above), or choose another "
                        f"run_dir=...") from None
                if not waited:
                    log.warning("%s is locked by %s; waiting up to %.0f s for it to end", self.path,
                                describe_holder(self.path), self.wait_s)
                    waited = True
                time.sleep(POLL_S)
            except OSError as e:
                os.close(fd)
                if e.errno not in FLOCK_UNSUPPORTED:
                    raise
                self.unsupported = True
                log.warning("the file system of %s cannot lock files (flock: %s): this run goes on WITHOUT the "
                            "run-directory lock, so nothing stops a second run in the same directory; start "
                            "each run directory once (or mount Lustre with -o flock)", self.run_dir, e.strerror)
                return
        self.fd = fd
        _held_fds.add(fd)

    def release(self) -> None:
        """Give the run directory back (the record stays: it names the last holder)."""
        if self.fd is not None:
            _held_fds.discard(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the last descriptor of the file releases the flock
            self.fd = None


def holder_record(path: Path) -> dict:
    """The record its holder wrote into the lock file ``path`` ({} when none can be read): pid,
    host, since, and launcher_pid or slurm_job. It may name the previous holder while a start
    is still before its checks: compare its pid with :func:`local_holders`."""
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(path: Path) -> str:
    """Who holds ``path``, from the record in it, checked against this host's lock table."""
    record = holder_record(path)
    locally = local_holders(path)
    if record.get("host") == socket.gethostname() and locally and record.get("pid") not in locally:
        # a start still checking its config holds it, before it writes its own record
        return (f"pid {', '.join(map(str, sorted(locally)))} on this host (a start not yet past its checks; "
                f"{path.name} still names the previous holder, pid {record.get('pid')})")
    if not record.get("pid"):
        where = f"pid {', '.join(map(str, sorted(locally)))} on this host" if locally else "an unknown process"
        return f"{where} ({path} holds no record yet)"
    text = f"pid {record['pid']}"
    if record.get("launcher_pid"):
        # submit.py --local or train_local.py: its launcher is the process to stop, the ranks die with it
        text += f" (rank 0 of a local run whose launcher is pid {record['launcher_pid']})"
    text += f" on host {record.get('host', '?')} since {record.get('since', '?')}"
    if record.get("slurm_job"):
        text += f", SLURM job {record['slurm_job']} (scancel {record['slurm_job']})"
    return text


def local_holders(path: Path) -> set[int]:
    """Pids holding a lock on ``path`` according to Linux's /proc/locks (this host only; read
    only, so ``launch/status.py`` can tell a live local run from a killed one)."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return set()
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in table.splitlines():
        fields = line.split()
        if "->" in fields:  # a process waiting for the lock, not holding it
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            pids.add(int(fields[4]))
    return pids


def die_with_launcher(launcher_pid: int) -> None:
    """In a rank: end when the launcher that started it is gone (kill -9 included)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != launcher_pid:  # it died before the prctl call: nobody would signal this rank
        os._exit(1)

    def watch() -> None:  # systems without PR_SET_PDEATHSIG
        while os.getppid() == launcher_pid:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
