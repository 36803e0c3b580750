"""What the tests ask /proc about the processes they start and kill (Linux)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

GONE_S = 30.0
"""How long a killed process may take to stop running code on a loaded machine."""


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (zombies included)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def runs(pid: int) -> bool:
    """Process ``pid`` may still run code: it exists, is no zombie, and has no SIGKILL pending."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        pending = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("ShdPnd:"))
    except (OSError, IndexError, StopIteration):
        return False
    return state not in ("Z", "X") and not int(pending, 16) & (1 << (signal.SIGKILL - 1))


def gone(pid: int, timeout_s: float = GONE_S) -> bool:
    """Whether process ``pid`` ended within ``timeout_s``: it runs no more code, its main
    thread having exited or a SIGKILL being pending for it. (Tearing down its other threads can
    take minutes on some virtual machines: seen here, threads with SIGKILL pending left
    runnable but unscheduled, until a later signal woke them.)"""
    deadline = time.monotonic() + timeout_s
    while runs(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not runs(pid)
