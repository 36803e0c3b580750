"""How DataLoader workers start (``data.worker_start``): from a fork server by default, never
by forking a training rank.

A rank has threads by the time an epoch's loader starts its workers (gloo and NCCL, the
launcher's watchdog, TensorBoard's writer). ``fork`` copies the rank as it is at that instant,
including any lock one of those threads holds: Python 3.11's interpreter can then hang the new
worker inside its own start-up, and the whole run waits until its time limit (see
docs/architecture.md, "DataLoader workers"). A fork server is a new interpreter (exec'd, so it
inherits no lock), started once per rank by its first loader, that imports the modules a worker
needs and has no other thread; each worker is forked from it: clean, and after the server's own
start (about a second, once) nearly as quick as ``fork``. ``spawn`` starts each worker as a new
interpreter (imports everything, every epoch).

The dataset travels to a worker pickled: :class:`~masan.data.dataset.CohortDataset` holds only
its store path and a cache only its paths, so this is cheap.

A worker that never delivers its batch (stuck on a stalled file system, or hung however it
started) would leave the rank, and every rank waiting for it, idle until the job's time limit:
past ``data.worker_timeout_minutes`` the loader raises :class:`WorkerTimeout` instead, so the
run stops and its launcher restarts it from the last checkpoint.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import tempfile
from multiprocessing.context import BaseContext

from torch.utils.data import DataLoader, Dataset

from masan.config import ConfigError, DataConfig
from masan.data import forkserver

TORCH_TIMEOUT = "DataLoader timed out"
"""How torch's own timeout error begins (the one the loader's ``timeout`` raises)."""

WORKER_IMPORTS = ("masan.data.forkserver", "torch", "masan.data.dataset")
"""Modules the fork server imports once, so that workers forked from it start without importing
them (the dataset's module brings torch, numpy, zarr and the store); the first ends the server
with its rank (:mod:`masan.data.forkserver`)."""


def worker_context(start: str) -> BaseContext:
    """The multiprocessing context that starts workers the ``start`` way (``forkserver``,
    ``spawn`` or ``fork``); a fork server is told to import :data:`WORKER_IMPORTS` (effective
    when it starts, i.e. for the first loader of a process)."""
    context = multiprocessing.get_context(start)
    if start == "forkserver":
        _short_socket_folder()
        forkserver.mark_parent()
        context.set_forkserver_preload(list(WORKER_IMPORTS))
    return context


SOCKET_PATH_MAX = 107
"""Characters of a Unix socket's path (``sun_path`` holds 108 bytes with the closing NUL)."""
SHORT_TEMP_FOLDERS = ("/tmp", "/dev/shm", "/var/tmp")
"""Where the fork server's socket goes when ``TMPDIR`` is too long for it."""


def _short_socket_folder() -> None:
    """The fork server listens on a socket in multiprocessing's temporary folder
    (``TMPDIR/pymp-*/listener-*``); a job's ``TMPDIR`` on a cluster is often a long per-job
    scratch path, past :data:`SOCKET_PATH_MAX`, and every loader then failed with "AF_UNIX path
    too long". That folder alone is then made in a short place (the rest of the run keeps
    ``TMPDIR``): multiprocessing creates it once per process, on first use."""
    probe = os.path.join(tempfile.gettempdir(), "pymp-xxxxxxxx", "listener-xxxxxxxx")
    if len(probe) <= SOCKET_PATH_MAX:
        return
    short = next((d for d in SHORT_TEMP_FOLDERS if os.access(d, os.W_OK | os.X_OK)), None)
    if short is None:
        raise ConfigError(f"TMPDIR={tempfile.gettempdir()} is too long for the DataLoader fork server's socket "
                          f"(its path would pass {SOCKET_PATH_MAX} characters) and none of "
                          f"{', '.join(SHORT_TEMP_FOLDERS)} may be written; set a shorter TMPDIR for the job, or "
                          "data.worker_start=spawn")
    before = tempfile.tempdir
    tempfile.tempdir = short
    try:
        multiprocessing.util.get_temp_dir()
    finally:
        tempfile.tempdir = before


class WorkerTimeout(RuntimeError):
    """No batch came from the DataLoader workers within ``data.worker_timeout_minutes``."""


class WatchedLoader(DataLoader):
    """A DataLoader whose wait for a worker's batch ends in a :class:`WorkerTimeout` that says
    what happened and what the run does about it (torch's own error names neither). Its
    iterator starts the workers at once, as a DataLoader's does."""

    def __iter__(self):
        return _Watched(super().__iter__(), self)


class _Watched:
    def __init__(self, batches, loader: DataLoader):
        self.batches, self.loader = batches, loader

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except RuntimeError as e:
            if not str(e).startswith(TORCH_TIMEOUT):
                raise
            raise WorkerTimeout(
                f"no batch came from the {self.loader.num_workers} DataLoader worker(s) in "
                f"{self.loader.timeout / 60:g} min (data.worker_timeout_minutes): a worker is stuck, e.g. reading "
                "from a stalled file system (check the store's mount); this rank stops so that the launcher "
                "restarts the run from its last checkpoint") from None


def data_loader(dataset: Dataset, data: DataConfig, **kwargs) -> DataLoader:
    """``DataLoader(dataset, **kwargs)`` with ``data.num_workers`` worker processes (0: items are
    read in this process), each preparing ``data.prefetch_factor`` batches ahead, started the
    ``data.worker_start`` way, a batch awaited at most ``data.worker_timeout_minutes``."""
    if data.num_workers == 0:
        return DataLoader(dataset, num_workers=0, **kwargs)
    return WatchedLoader(dataset, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
                         multiprocessing_context=worker_context(data.worker_start),
                         timeout=60 * data.worker_timeout_minutes, **kwargs)
