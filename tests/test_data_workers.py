"""DataLoader workers start clean (masan/data/workers.py): a worker must not inherit what
another thread of the training process holds at the instant it starts, or it can hang in its
own start-up (a rank always has such threads: gloo, the launcher's watchdog, TensorBoard)."""

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from masan.config import DataConfig
from masan.data.workers import WorkerTimeout, data_loader

REPO = Path(__file__).resolve().parents[1]
HELD = threading.Lock()
"""Stands in for a lock of the interpreter or a library, held by a thread of the rank."""


class LockProbe(Dataset):
    """Item i: 1 when the worker reading it can take :data:`HELD`, 0 when it finds it held."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        free = HELD.acquire(blocking=False)
        if free:
            HELD.release()
        return int(free)


@pytest.mark.parametrize("start, inherits", [("forkserver", False), ("spawn", False), ("fork", True)])
def test_workers_do_not_inherit_a_lock_another_thread_holds(start, inherits):
    taken, done = threading.Event(), threading.Event()

    def hold():
        with HELD:
            taken.set()
            done.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    try:
        loader = data_loader(LockProbe(), DataConfig(num_workers=2, worker_start=start), batch_size=1)
        seen = torch.cat(list(loader)).tolist()
    finally:
        done.set()
        holder.join()
    # fork copies the lock as held, and no thread of the worker will ever release it
    assert seen == ([0, 0] if inherits else [1, 1])


def test_training_starts_workers_from_a_fork_server_by_default():
    loader = data_loader(LockProbe(), DataConfig(num_workers=1), batch_size=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert data_loader(LockProbe(), DataConfig(num_workers=0), batch_size=1).num_workers == 0


def test_workers_start_from_a_fork_server_under_a_long_job_tmpdir(tmp_path):
    """The fork server's socket lies in TMPDIR; a cluster job's per-job scratch path is often
    long, and every loader failed with "AF_UNIX path too long"."""
    long = tmp_path / ("scratch-of-job-" + "7" * 90)
    long.mkdir()
    code = ("from masan.config import DataConfig; from masan.data.workers import data_loader; "
            "import tempfile; print(sum(int(b) for b in data_loader(list(range(4)), DataConfig(num_workers=1), "
            "batch_size=1)), tempfile.gettempdir())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "TMPDIR": str(long), "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["6", str(long)]  # the rest of the run keeps its TMPDIR


class Stuck(Dataset):
    """Item 0 arrives; item 1 takes far longer than any timeout of the test."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if i:
            time.sleep(60)
        return i


def test_a_stuck_worker_stops_the_rank_with_an_error_that_says_so():
    loader = data_loader(Stuck(), DataConfig(num_workers=1, worker_timeout_minutes=2 / 60), batch_size=1)
    batches = iter(loader)
    assert next(batches).tolist() == [0]
    t = time.monotonic()
    with pytest.raises(WorkerTimeout) as e:
        next(batches)
    assert time.monotonic() - t < 30
    for frag in ("no batch came from the 1 DataLoader worker(s) in 0.0333333 min", "data.worker_timeout_minutes",
                 "stalled file system", "restarts the run from its last checkpoint"):
        assert frag in str(e.value), (frag, str(e.value))
    assert data_loader(Stuck(), DataConfig(num_workers=1, worker_timeout_minutes=0), batch_size=1).timeout == 0


RANK = """
import time
import torch
from torch.utils.data import TensorDataset
from masan.config import DataConfig
from masan.data.workers import data_loader
batches = iter(data_loader(TensorDataset(torch.arange(64)), DataConfig(num_workers=2), batch_size=1))
next(batches)
print("ready", flush=True)
time.sleep(600)
"""


def _live() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process, from /proc."""
    parents = {}
    for d in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{d}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parents[int(d)] = int(ppid)
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, frontier = _live(), set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_rank_leaves_no_fork_server_or_worker_behind():
    """kill -9 of a rank (or a second Ctrl-C, or the OOM killer) closes nothing: its fork server
    and the workers forked from it, each holding prefetched batches in shared memory, must end
    with it rather than live on for good."""
    rank = subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert rank.stdout.readline().strip() == "ready"
        below = _descendants(rank.pid)
        assert len(below) >= 3, "a fork server and two workers (and a resource tracker)"
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and below & set(_live()):
        time.sleep(0.2)
    assert not below & set(_live()), "left behind by the killed rank"
