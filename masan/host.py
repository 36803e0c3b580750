"""This host as Linux reports it to this process: the cores it may run on, the memory the kernel
can still give, what this process holds now and at its peak (bytes), whether a process runs, and
how a file system that cannot lock files answers. One owner for the reads that the converter and
the launchers (how many threads?), the cohort cache (is there room?), the training log (peak per
interval) and the benchmarks (growth per step) all need; off Linux each falls back to what
:mod:`os` and :mod:`resource` know."""

from __future__ import annotations

import errno
import os
import resource

GIB = 2**30
"""Bytes in a GiB, the unit of every memory setting and report."""

FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
"""What ``flock`` fails with on a file system that cannot lock files (NFS without its lock
daemon, Lustre mounted without ``-o flock``), as opposed to a lock another process holds."""


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (a SLURM job's or ``taskset``'s
    share), not the node's count that :func:`os.cpu_count` gives."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CLEAR_REFS = "/proc/self/clear_refs"
"""Writing ``5`` here resets the process's peak resident set (VmHWM; Linux >= 4.0)."""


def available_bytes() -> int:
    """RAM the kernel can give without swapping (MemAvailable of /proc/meminfo; where there is
    none, the free physical pages)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(reset: bool = False) -> int:
    """This process's peak resident set (VmHWM), then, with ``reset``, start a new peak from
    now. Where /proc cannot say or reset it, the lifetime peak from getrusage."""
    peak = None
    try:
        with open("/proc/self/status") as f:
            peak = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if reset:
        try:
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            pass  # not Linux, or no permission: later peaks are lifetime peaks
    return peak


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts: signalling it is refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
