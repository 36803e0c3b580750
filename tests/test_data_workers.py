"""DataLoader workers start clean (masan/data/workers.py): a worker must not inherit what
another thread of the training process holds at the instant it starts, or it can hang in its
own start-up (a rank always has such threads: gloo, the launcher's watchdog, TensorBoard)."""

import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from masan.config import DataConfig
from masan.data.workers import WorkerTimeout, data_loader

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
