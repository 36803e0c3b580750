"""Cohort cache (``data.cache``): decode each subject once per node, scale it on the device.

Without a cache (``none``) every training step decodes its subjects from the Zarr store
(LZ4 + bitshuffle) and z-scores them in float32 on the CPU: the memory traffic of every
full-resolution sample sets the pace of a GPU step (docs/performance.md, "Sizes and costs behind
the code"). With a cache:

* ``host``: the ranks of a node split the subjects, each decodes its share from the store once
  into ``data.cache_dir`` (a tmpfs such as /dev/shm, i.e. shared RAM) as the *stored integers*
  (int16 for ADNI: half the bytes of float32), one ``.npy`` file per subject and modality; every
  rank of the node then maps all of them (one copy per node, whatever the number of ranks).
  A background thread gathers the next batch into pinned memory and copies it to the GPU on a
  side stream (``non_blocking``), where the NIfTI scaling and z-score are applied, while the
  current step computes (:mod:`masan.data.batches`).
* ``device``: the same, then each rank copies the whole cohort's stored integers into its GPU
  memory once; a batch is then a device-to-device gather plus the scaling.

On the CPU both work unchanged ("device" memory is then the process's own memory). Samples are
numerically identical to ``none``: the same float32 operations in the same order as
:func:`masan.store.cohort.normalized_float32` / :func:`masan.store.cohort.scaled_float32`, then the
same cast to the model's dtype. ``data.fmri_temporal`` other than ``none`` is applied on the CPU
(:func:`masan.data.temporal.fluctuations`) from the cached integers, so only the decode is saved.

Memory is checked before anything is written (host: free space of ``cache_dir`` and the node's
available RAM; device: free GPU memory), leaving ``data.cache_reserve_gib`` free; a cohort that
does not fit is refused with the numbers and the fix. The node's lead rank deletes the files
when the cache is closed or the process exits; a directory left by a killed run is removed by
the next cache built on that node. The directory is the owner's alone (mode 0700): it holds
the subjects' images, in a folder every user of the node can list. Each node has a directory
of its own (the host name is part of its name), so a ``data.cache_dir`` that several nodes
share is not a clash. Liveness is a ``flock`` the lead holds on the directory's :data:`OWNER`
file for the cache's life (the kernel drops it however the process ends), not a pid: a pid can
be reused, and a run in another container of the node may have one this process cannot see
(caches of earlier versions, which took no lock, and file systems without ``flock``: the pid).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from masan import distributed as D
from masan.config import ConfigError, DataConfig
from masan.data.batches import Batches, Scale
from masan.host import GIB, available_bytes, pid_alive
from masan.store.cohort import CohortStore, normalized_float32, scaled_float32

log = logging.getLogger(__name__)

PREFIX = "masan-cache-"
OWNER = "owner"
"""File in a cache directory holding ``<host> <pid> flock`` of the rank that deletes it, which
holds an exclusive ``flock`` on it while the cache lives (``<host> <pid>`` alone: a cache of an
earlier version, which took no lock: alive while that pid is)."""
LOCKED = "flock"
FIX = ("use data.cache=none, cache fewer frames (data.fmri_frames) or subjects, or run on a node with more "
       "memory (or lower data.cache_reserve_gib)")


class CacheError(RuntimeError):
    """The cohort cache could not be built; the message says why and what to do."""


class CacheConfigError(CacheError, ConfigError):
    """The cache the config asks for cannot be made on this node (no ``data.cache_dir``, the
    cohort does not fit the memory allowed): a restart cannot cure it, so launchers exit 2
    (a :class:`~masan.config.ConfigError`); the message names bytes needed/available and the fix."""


def check_cache_dir(data_cfg: DataConfig) -> None:
    """Refuse (CacheConfigError) a cache whose ``data.cache_dir`` is not a folder on this node:
    a start checks it on rank 0's node before the run folder is made, each node lead again."""
    if data_cfg.cache != "none" and not Path(data_cfg.cache_dir).is_dir():
        raise CacheConfigError(f"data.cache={data_cfg.cache} needs data.cache_dir={data_cfg.cache_dir}, which is not "
                               "a folder; point it at a tmpfs such as /dev/shm, or use data.cache=none")


def node_peers() -> tuple[int, int]:
    """Collective: (this rank's index among the ranks of its node, ranks on the node), by host name."""
    hosts = D.all_gather_objects(socket.gethostname())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    mine = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    return mine.index(rank), len(mine)


OWNER_RECORD_BYTES = 4096
"""At most this much of an owner file is read (the record is one short line)."""


def _open_owner(owner: Path) -> int:
    """A read descriptor of a cache's ``owner`` file. The cache folder lies where every user may
    write (``/dev/shm``): a link or a pipe planted under that name is refused (OSError), never
    followed or waited on."""
    fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{owner} is not a plain file")
    return fd


def _owner_record(folder: Path) -> str:
    """The owner line of a cache folder of this user (OSError for a folder that is a link or
    another user's: not ours to judge or remove)."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{folder} is not a cache folder of this user")
    fd = _open_owner(folder / OWNER)
    try:
        return os.read(fd, OWNER_RECORD_BYTES).decode(errors="replace")
    finally:
        os.close(fd)


def _owner_alive(owner: Path) -> bool:
    """Whether a live process holds the ``flock`` on ``owner`` (False: its cache was left behind)."""
    fd = _open_owner(owner)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return False


def _bytes_under(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):  # another run on the node may be sweeping it too
            total += f.stat().st_size if f.is_file() else 0
    return total


def sweep_stale(cache_dir: Path) -> list[Path]:
    """Remove this user's cache directories of this host whose owner no longer holds its lock (a
    killed run); -> removed.

    Each removal is logged with its name and size: shared memory a killed run held until now
    (its node's RAM), which would otherwise vanish without a trace."""
    removed = []
    host = socket.gethostname()
    for d in cache_dir.glob(PREFIX + "*"):
        try:
            owner_host, pid, *how = _owner_record(d).split()
            if owner_host != host or (_owner_alive(d / OWNER) if how == [LOCKED] else pid_alive(int(pid))):
                continue
        except (OSError, ValueError):
            continue  # being created right now, removed meanwhile, or not ours
        size = _bytes_under(d)
        shutil.rmtree(d, ignore_errors=True)
        log.warning("removed %s (%.2f GiB, %d bytes): the host cache of a run that ended without closing it "
                    "(pid %s on %s, killed or crashed), found at the start of this one", d, size / GIB, size,
                    pid, host)
        removed.append(d)
    return removed


def cached_shape(store: CohortStore, subject: str, modality: str, data_cfg: DataConfig) -> tuple[int, ...]:
    """Shape of what a cache holds of one image: the stored shape, an fMRI cut to
    ``data.fmri_frames`` frames."""
    shape = store.shape(subject, modality)
    if modality != "fmri" or not data_cfg.fmri_frames:
        return shape
    return (min(shape[0], data_cfg.fmri_frames),) + shape[1:]


def cached_bytes(store: CohortStore, subjects: list[str], data_cfg: DataConfig) -> int:
    """Bytes of the stored integers a cache of ``subjects`` holds (one copy; the modalities
    ``data_cfg`` uses)."""
    used = [m for m, on in (("t1", data_cfg.use_t1), ("fmri", data_cfg.use_fmri)) if on]
    return sum(np.dtype(store.row(s)[m]["dtype"]).itemsize * int(np.prod(cached_shape(store, s, m, data_cfg)))
               for s in subjects for m in used)


def check_host_fits(store: CohortStore, subjects: list[str], data_cfg: DataConfig) -> None:
    """Refuse (:class:`CacheConfigError`) a host cache of ``subjects`` that this node's shared
    memory cannot hold, leaving ``data.cache_reserve_gib`` free. Read-only: a training start
    asks it before it writes anything (and the cache again as it is built)."""
    need = cached_bytes(store, subjects, data_cfg)
    root = Path(data_cfg.cache_dir)
    check_cache_dir(data_cfg)
    free, avail = shutil.disk_usage(root).free, available_bytes()
    have = min(free, avail) - int(data_cfg.cache_reserve_gib * GIB)
    if need > have:
        raise CacheConfigError(
            f"data.cache={data_cfg.cache} needs {need / GIB:.2f} GiB ({need} bytes) of shared memory in {root} for "
            f"{len(subjects)} subjects of {store.path}, but only {max(have, 0) / GIB:.2f} GiB may be "
            f"used ({root} has {free / GIB:.2f} GiB free, the node {avail / GIB:.2f} GiB available, "
            f"data.cache_reserve_gib={data_cfg.cache_reserve_gib} kept free); {FIX}")


class CohortCache:
    """Stored integers of ``subjects`` (the modalities ``data_cfg`` uses) in shared memory, and on
    ``device`` for ``data_cfg.cache == "device"``. Collective: every rank constructs it.

    Reads like :class:`masan.store.cohort.CohortStore` (``read_t1``/``read_fmri``, float32, same
    values), so :class:`masan.data.dataset.CohortDataset` can read from it; :meth:`batches`
    yields training batches already on the device.

    Args:
        store_path: the cohort store.
        subjects: subjects to cache (the dataset's, in its order: batch indices refer to it).
        labels: class index of each subject.
        data_cfg: ``cache`` (host or device), ``cache_dir``, ``cache_reserve_gib``,
            ``fmri_frames`` (only those frames are cached), ``use_t1``/``use_fmri``.
        device: where batches go (``cuda:N`` or ``cpu``).
    """

    def __init__(self, store_path: str | os.PathLike, subjects: list[str], labels: list[int], data_cfg: DataConfig,
                 device: torch.device):
        if data_cfg.cache not in ("host", "device"):
            raise ValueError(f"CohortCache needs data.cache=host or device, got {data_cfg.cache!r}")
        self.store = CohortStore(store_path)
        self.subjects, self.labels, self.cfg = list(subjects), list(labels), data_cfg
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # set_device and mem_get_info need an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.modalities = [m for m, on in (("t1", data_cfg.use_t1), ("fmri", data_cfg.use_fmri)) if on]
        self.versions = {s: self.store.group_path(s) for s in self.subjects}
        """Subject -> its store version when the scales were taken: what every decode must read."""
        self.scales = {(s, m): self._scale(s, m) for s in self.subjects for m in self.modalities}
        self.local_rank, self.local_world = node_peers()
        self.decoded: list[str] = []
        """Subjects this rank decoded from the store (its share of the node's)."""
        self.dir = Path(data_cfg.cache_dir) / f"{PREFIX}{D.broadcast_object(self._token())}-{socket.gethostname()}"
        self.index = {s: i for i, s in enumerate(self.subjects)}
        # every step below is agreed by all ranks, so that a refusal on one never leaves the others
        # waiting in a barrier
        self.host: dict[tuple[str, str], np.ndarray] = {}
        self.on_device: dict[tuple[str, str], torch.Tensor] = {}
        if any(v != self.versions for v in D.all_gather_objects(self.versions)):  # the same verdict on every rank
            raise CacheError(f"a subject of {self.store.path} was reconverted while the ranks were starting: they "
                             "took different versions of it. Let the conversion finish, then restart the run "
                             "(it resumes)")
        _agree(self._create if self.local_rank == 0 else None)
        try:
            _agree(lambda: [self._decode(s) for i, s in enumerate(self.subjects)
                            if i % self.local_world == self.local_rank])
            self._map()
            if data_cfg.cache == "device":
                _agree(self._check_device)
                self.on_device = {k: torch.from_numpy(v).to(self.device, copy=True) for k, v in self.host.items()}
        except BaseException:
            self.close()  # no half-built cache left in shared memory
            raise

    def _map(self) -> None:
        # copy-on-write maps: writable views for torch, while the file (and other ranks) never change
        self.host = {k: np.load(self._file(*k), mmap_mode="c") for k in self.scales}

    def __getstate__(self) -> dict:
        """For spawned DataLoader workers: paths and numbers, not the mapped arrays (re-mapped there)."""
        local = ("host", "on_device", "_finalizer", "_producer", "_owner")
        state = {k: v for k, v in self.__dict__.items() if k not in local}
        return {**state, "device": torch.device("cpu")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.on_device = {}
        self._map()

    # ------------------------------------------------------------------ building
    def _token(self) -> str:
        key = f"{self.store.path.resolve()}|{self.cfg.fmri_frames}|{','.join(self.subjects)}|{time.time_ns()}"
        return f"{os.getpid()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def _shape(self, subject: str, modality: str) -> tuple[int, ...]:
        return cached_shape(self.store, subject, modality, self.cfg)

    def _scale(self, subject: str, modality: str) -> Scale:
        return Scale(*self.store.scaling(subject, modality))

    def nbytes(self) -> int:
        """Bytes of the cached stored integers (one copy)."""
        return cached_bytes(self.store, self.subjects, self.cfg)

    def _file(self, subject: str, modality: str) -> Path:
        return self.dir / f"{self.index[subject]}-{modality}.npy"

    def _create(self) -> None:
        """Node lead: check the memory, remove stale caches, make this cache's directory (deleted at close/exit)."""
        sweep_stale(Path(self.cfg.cache_dir))  # first: a killed run's leftovers count against the fit
        check_host_fits(self.store, self.subjects, self.cfg)
        # the subjects' images, in a folder every user of the node can list (/dev/shm): only this
        # user's ranks may enter it, whatever the umask and the user's group
        self.dir.mkdir(mode=0o700)
        owner = None
        try:
            self.dir.chmod(0o700)
            # locked and written under another name, then renamed: a sweep on another rank of the
            # node never finds an owner file that is not yet locked (the lock stays with the file)
            staged = self.dir / (OWNER + ".tmp")
            owner = os.open(staged, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            how = LOCKED
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:  # a file system without flock: the cache works, its sweep trusts the pid
                how = ""
                log.warning("%s cannot be locked (%s): a cache left by a killed run is found by its pid alone; "
                            "point data.cache_dir at a tmpfs such as /dev/shm", staged, e.strerror)
            os.write(owner, f"{socket.gethostname()} {os.getpid()} {how}".strip().encode())
            os.replace(staged, self.dir / OWNER)
        except BaseException:
            if owner is not None:
                os.close(owner)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._owner = owner
        self._finalizer = weakref.finalize(self, _remove, str(self.dir), owner)

    def _check_device(self) -> None:
        need = self.nbytes()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            where = f"GPU {self.device} ({free / GIB:.2f} of {total / GIB:.2f} GiB free)"
        else:  # every rank of the node holds its own copy in RAM
            need *= self.local_world
            free = available_bytes()
            where = f"this node's RAM ({free / GIB:.2f} GiB available, {self.local_world} ranks each with a copy)"
        have = free - int(self.cfg.cache_reserve_gib * GIB)
        if need > have:
            raise CacheConfigError(
                f"data.cache=device needs {need / GIB:.2f} GiB ({need} bytes) for {len(self.subjects)} subjects of "
                f"{self.store.path} on {where}, leaving data.cache_reserve_gib={self.cfg.cache_reserve_gib} GiB "
                "for the "
                f"model: {max(have, 0) / GIB:.2f} GiB may be used; use data.cache=host (the cohort in shared host "
                f"memory) or {FIX}")

    def _decode(self, subject: str) -> None:
        """Stored integers of the subject's arrays -> ``.npy`` files (written under a temporary name,
        then renamed, so a file that exists is complete); a shard of frames at a time. Refuses a
        subject whose store version changed meanwhile (a reconversion under a run), so the cache
        never mixes two versions or holds data that disagrees with the scales taken at start
        (:attr:`versions`: an earlier subject's decode rereads the table)."""
        before = self.versions[subject]
        for m in self.modalities:
            final = self._file(subject, m)
            dtype = np.dtype(self.store.row(subject)[m]["dtype"])
            tmp = final.with_name(final.name + ".tmp")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=self._shape(subject, m))
            self._reserve(tmp)
            if m == "t1":
                out[...] = self.store.read_raw(subject, m)
            else:  # a shard of frames at a time: no whole-run intermediate beside the file
                arr, _ = self.store._array(subject, m)
                step = (arr.shards or arr.chunks)[0]
                for t0 in range(0, out.shape[0], step):
                    t1 = min(t0 + step, out.shape[0])
                    out[t0:t1] = self.store.read_raw(subject, m, frames=slice(t0, t1))
            out.flush()
            del out
            os.replace(tmp, final)
        self.store._refresh()
        if self.store.group_path(subject) != before:  # also when it changed before its own decode began
            raise RuntimeError(
                f"{subject} was reconverted in {self.store.path} while data.cache was being built; the cache would "
                "mix two versions of it. Let the conversion finish, then restart the run (it resumes)")
        self.decoded.append(subject)

    def _reserve(self, path: Path) -> None:
        """Allocate the whole (sparse) file now: a full folder (another run's cache sharing
        data.cache_dir filled it since the space check) is then an error naming it, not a SIGBUS
        that kills the rank without a word when a write through the map finds no page."""
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise CacheConfigError(
                    f"{self.cfg.cache_dir} ran out of space while data.cache={self.cfg.cache} was being built "
                    f"({e.strerror}; another run's cache in the same data.cache_dir may have taken it since this "
                    f"run's check); {FIX}") from e

    def discard_files(self) -> None:
        """Node lead: delete the cache's folder now (nothing else; the other ranks' maps keep their
        pages); others: nothing. For a process about to end without unwinding."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()

    def close(self) -> None:
        """Drop this rank's views and device copies; the node's lead rank deletes the files (others
        may still map them: their pages stay valid until they drop them)."""
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.stop()
            self._producer = None
        self.host, self.on_device = {}, {}
        self.discard_files()

    # ------------------------------------------------------------------ the store's read API
    def read_t1(self, subject: str, normalize: bool = True) -> np.ndarray:
        """float32 (X, Y, Z), equal to ``CohortStore.read_t1``."""
        return self._values(subject, "t1", None, normalize)

    def read_fmri(self, subject: str, frames: slice | None = None, normalize: bool = True) -> np.ndarray:
        """float32 (T, X, Y, Z) of the cached frames (``frames`` within them), equal to ``CohortStore.read_fmri``."""
        return self._values(subject, "fmri", frames, normalize)

    def _values(self, subject: str, modality: str, frames: slice | None, normalize: bool) -> np.ndarray:
        raw = self.host[(subject, modality)]
        if frames is not None:
            if frames.stop is not None and frames.stop > raw.shape[0]:
                raise ValueError(f"{subject}: frames {frames} asked but only {raw.shape[0]} are cached "
                                 f"(data.fmri_frames={self.cfg.fmri_frames})")
            raw = raw[frames]
        sc = self.scales[(subject, modality)]
        if normalize:
            return normalized_float32(raw, sc.slope, sc.inter, sc.mean, sc.std)
        return scaled_float32(raw, sc.slope, sc.inter)

    # ------------------------------------------------------------------ training batches
    def batches(self, indices: Iterable[int], batch_size: int, dtype: torch.dtype, depth: int = 2,
                then: Iterable[int] | None = None) -> Batches:
        """Batches of ``batch_size`` dataset indices (the last partial one dropped), on the device in
        ``dtype``, prepared ``depth`` ahead by a background thread: see :class:`Batches`. One
        iterator at a time: starting one stops the previous (each epoch starts a new one), whose
        buffers the new one reuses.

        ``then``: the indices the *next* iterator will most likely be asked for (the next epoch's
        order). Once this one's batches are prepared, the thread prepares the first ``depth`` of
        those too, and the next iterator starts with them where its batches begin the same way
        (else they are dropped): an epoch then starts without waiting for its first batch, which
        with a few steps per epoch per rank was most of the data wait."""
        previous = getattr(self, "_producer", None)
        if previous is not None:
            previous.stop()  # its thread has ended: its buffers are free, its lookahead is done
        it = Batches(self, indices, batch_size, dtype, depth, previous.handover() if previous is not None else None,
                     then)
        self._producer = it.producer  # not the iterator: dropping that still stops the thread
        return it

    def raw(self, subject: str, modality: str) -> torch.Tensor:
        """Stored integers of one array: the device copy (``device`` cache) or a view of the shared file."""
        key = (subject, modality)
        return self.on_device[key] if key in self.on_device else torch.from_numpy(self.host[key])


def _remove(folder: str, owner: int) -> None:
    """A cache's end: its files, then its owner's lock (a sweep never sees a half-deleted cache unlocked)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.close(owner)


def _agree(step) -> None:
    """Collective: run ``step`` (None: nothing) on this rank, then raise on every rank the first
    error any rank met (so no rank is left waiting for one that failed)."""
    error = None
    if step is not None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    errors = D.all_gather_objects(None if error is None else
                                  (isinstance(error, ConfigError), f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:  # of the same kind on every rank: a launcher exits 2 for all of them or for none
        config, text = first
        raise (CacheConfigError if config else CacheError)(f"another rank failed to build the cohort cache: {text}")


def open_cache(dataset, data_cfg: DataConfig, device: torch.device) -> CohortCache | None:
    """Collective: the cache ``data_cfg.cache`` asks for over ``dataset``'s subjects (None for
    ``none``); the dataset then reads from it too (standardiser fits, monitoring)."""
    if data_cfg.cache == "none":
        return None
    cache = CohortCache(dataset.store.path, dataset.subjects, dataset.labels, data_cfg, device)
    dataset.use_cache(cache)
    return cache
