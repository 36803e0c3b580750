"""Training batches from a cohort cache, prepared ahead on a background thread.

:class:`Batches` (what :meth:`masan.data.cache.CohortCache.batches` returns) gathers a batch's
stored integers (a view of the node's shared files, or the device copy), copies them to the
device on a side stream and scales them there with :func:`to_values`: the same float32
operations as :func:`masan.store.cohort.normalized_float32` / ``scaled_float32``, so the values
are bit-identical to reading the store. :class:`Handover` lets the next epoch start with the
batches this one's thread prepared ahead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from masan.data.temporal import fluctuations
from masan.store.cohort import NORMALIZE_BLOCK, normalized_float32, scaled_float32

if TYPE_CHECKING:
    from masan.config import DataConfig


class BatchSource(Protocol):
    """What a batch is gathered from (:class:`masan.data.cache.CohortCache`): the training subjects,
    their labels and cached arrays, and the device the batches go to."""

    subjects: list[str]
    labels: list[int]
    modalities: list[str]
    scales: dict[tuple[str, str], Scale]
    cfg: DataConfig
    device: torch.device

    def raw(self, subject: str, modality: str) -> torch.Tensor: ...

    def read_fmri(self, subject: str, frames: slice | None = None, normalize: bool = True) -> np.ndarray: ...


@dataclass(frozen=True)
class Scale:
    """How one cached array becomes model values: ``raw * slope + inter``, z-scored by ``mean``/``std``."""

    slope: float
    inter: float
    mean: float
    std: float



def to_values(raws: list[torch.Tensor], scales: list[Scale], normalize: bool, out_dtype: torch.dtype,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Stored integers of B samples (each (...) on one device) -> (B, ...) model input in ``out_dtype``
    (through the float32 ``out`` when given, else a new tensor).

    The same operations as the store's readers, so values are bit-identical to the ``none`` path:
    on the CPU the store's own functions, on a GPU the same float32 steps, z-score as
    ``x * float32(slope/std)`` then ``+ float32((inter-mean)/std)``, plain scaling in float64
    rounded to float32; then the cast to the model dtype.
    """
    if out is None:
        out = torch.empty((len(raws),) + tuple(raws[0].shape), dtype=torch.float32, device=raws[0].device)
    for o, r, sc in zip(out, raws, scales):
        if o.device.type == "cpu":  # the store's cache-blocked functions, on all of torch's CPU threads
            if normalize:
                _in_parts(lambda a, b, sc=sc: normalized_float32(a, sc.slope, sc.inter, sc.mean, sc.std, out=b), r, o)
            else:
                _in_parts(lambda a, b, sc=sc: scaled_float32(a, sc.slope, sc.inter, out=b), r, o)
        elif normalize:
            o.copy_(r)  # int -> float32 is exact, as numpy's cast inside np.multiply
            o.mul_(float(np.float32(sc.slope / sc.std))).add_(float(np.float32((sc.inter - sc.mean) / sc.std)))
        elif sc.slope == 1.0 and sc.inter == 0.0:
            o.copy_(r)
        else:
            o.copy_(r.double() * sc.slope + sc.inter)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


_END = object()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _in_parts(convert, raw: torch.Tensor, out: torch.Tensor) -> None:
    """``convert(raw part, out part)`` over ``torch.get_num_threads()`` contiguous parts of the
    flattened arrays at once (numpy releases the GIL; the values are those of one call)."""
    global _POOL
    threads = torch.get_num_threads()
    src, dst = raw.numpy().reshape(-1), out.numpy().reshape(-1)
    step = -(-src.size // threads)
    step = -(-step // NORMALIZE_BLOCK) * NORMALIZE_BLOCK  # whole blocks per part
    if threads == 1 or step >= src.size:
        convert(src, dst)
        return
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="masan-cache-scale")
    list(_POOL.map(lambda i: convert(src[i:i + step], dst[i:i + step]), range(0, src.size, step)))


class Batches:
    """Iterator of training batches from a :class:`BatchSource` (the cohort cache):
    ``{"t1": (B, 1, X, Y, Z), "fmri": (B, T, X, Y, Z)`` in ``dtype`` on the cache's device,
    ``"label": int64 (B,), "index": int64 (B,)}``, as ``DataLoader(CohortDataset)`` followed by
    ``masan.train.loop.to_device`` would give.

    A daemon thread (:class:`_Producer`) prepares up to ``depth`` batches ahead. :meth:`__next__`
    waits for the next one (host time: the data wait) and, on CUDA, for the event of its copy and
    scaling on the side stream, then hands its tensors to the current stream. Stopping early
    (:meth:`close`, or dropping the iterator) ends the thread.

    On the CPU the float32 images are written into ``depth + 2`` reused buffers (a fresh
    full-resolution sample's tensor costs more in page faults than the scaling itself), so a
    batch stays valid until ``depth + 1`` further batches were taken: the training loop holds
    one at a time; clone a batch to keep it longer.
    """

    def __init__(self, cache: BatchSource, indices: Iterable[int], batch_size: int, dtype: torch.dtype, depth: int,
                 handover: "Handover | None" = None, then: Iterable[int] | None = None):
        self.device = cache.device
        lookahead = _groups(then, batch_size)[:depth] if then is not None else []
        self.producer = _Producer(cache, _groups(indices, batch_size), dtype, depth, handover, lookahead)
        # the thread holds the producer, not this iterator: dropping the iterator stops it
        weakref.finalize(self, self.producer.stopped.set)
        self.producer.thread.start()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __len__(self) -> int:
        return len(self.producer.groups)

    def __next__(self) -> dict:
        q = self.producer.queue
        item = q.get()
        if item is _END:
            q.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, event = item
        if event is not None:
            event.synchronize()
            current = torch.cuda.current_stream(self.device)
            for v in batch.values():  # made on the side stream, used and freed on the current one
                v.record_stream(current)
        return batch

    def close(self) -> None:
        self.producer.stop()


def _groups(indices: Iterable[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``batch_size`` indices; a last partial group is dropped."""
    order = list(indices)
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


@dataclass
class Handover:
    """What an ended :class:`_Producer` leaves to the next one of the same cache."""

    pinned: list
    outputs: list
    next_slot: int
    ready: list
    """``(group, (batch, event))`` prepared ahead for the next iterator, in order."""


class _Producer:
    """The batch-preparing side of :class:`Batches`. On CUDA a ``host`` batch is gathered into one of
    ``depth + 2`` reused pinned buffers (refilled only after the event of its last copy fired),
    copied on a side stream and scaled there. After its own batches it prepares the ``lookahead``
    groups (at most ``depth``) for the next producer (:meth:`handover`)."""

    def __init__(self, cache: BatchSource, groups: list[list[int]], dtype: torch.dtype, depth: int,
                 handover: Handover | None = None, lookahead: list[list[int]] | None = None):
        self.cache, self.groups, self.dtype = cache, groups, dtype
        self.cuda = cache.device.type == "cuda"
        self.stream = torch.cuda.Stream(cache.device) if self.cuda else None
        handover = handover or Handover([], [], 0, [])
        pinned, outputs, next_slot = handover.pinned, handover.outputs, handover.next_slot
        self.ready = handover.ready
        self.lookahead = lookahead or []
        self.ahead: list = []
        """``(group, item)`` prepared from ``lookahead``."""
        slots = depth + 2
        self.next_slot = next_slot % slots
        self.pinned: list[dict[str, torch.Tensor]] = (pinned + [{} for _ in range(slots)])[:slots]
        """CUDA only: per slot, the pinned staging buffers of the host-to-device copies."""
        self.outputs: list[dict[str, torch.Tensor]] = (outputs + [{} for _ in range(slots)])[:slots]
        """CPU only: per slot, the float32 image buffers reused by each (depth + 2)-th batch."""
        self.events: list[torch.cuda.Event | None] = [None] * (depth + 2)
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="masan-cache-batches", daemon=True)

    def stop(self) -> None:
        """End the thread (at once when it waits on a full queue; after the batch in hand otherwise)."""
        self.stopped.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        if self.stream is not None:
            self.stream.synchronize()  # copies out of the pinned buffers have landed: the next iterator may refill them

    def handover(self) -> Handover:
        """The pinned and output buffers, the next slot and the batches prepared ahead, for the next
        iterator of the same cache (this one has ended; its last batch, still held by the consumer,
        is left alone the longest)."""
        return Handover(self.pinned, self.outputs, self.next_slot, self.ahead)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.cache.device)
            # batches the previous producer prepared ahead, while they match this one's (in slot order)
            reused = 0
            for group, item in self.ready:
                if reused == len(self.groups) or group != self.groups[reused]:
                    break
                if self.stopped.is_set() or not self._put(item):
                    return
                reused += 1
            self.ready = []
            for group in self.groups[reused:]:
                if self.stopped.is_set() or not self._put(self._prepare(self._take_slot(), group)):
                    return
            if not self._put(_END):
                return
            for group in self.lookahead:  # the next iterator's first batches, while this one's are used
                if self.stopped.is_set():
                    return
                self.ahead.append((group, self._prepare(self._take_slot(), group)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by Batches.__next__
            self.ahead = []
            self._put(e)

    def _take_slot(self) -> int:
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.pinned)
        return slot

    def _on_side_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _prepare(self, slot: int, group: list[int]) -> tuple[dict, torch.cuda.Event | None]:
        c = self.cache
        subjects = [c.subjects[i] for i in group]
        batch: dict[str, torch.Tensor] = {}
        if self.cuda and self.events[slot] is not None:
            self.events[slot].synchronize()  # this slot's pinned buffers were copied out
        for m in c.modalities:
            if m == "fmri" and c.cfg.fmri_temporal != "none":  # per-voxel statistics: on the CPU, as the dataset
                runs = [fluctuations(c.read_fmri(s, normalize=False), c.cfg.fmri_temporal, s)
                        for s in subjects]
                values = self._upload(slot, m, [torch.from_numpy(r) for r in runs])
                with self._on_side_stream():
                    batch[m] = torch.stack(values).to(self.dtype)
                continue
            raws = self._upload(slot, m, [c.raw(s, m) for s in subjects])
            out = None
            if not self.cuda:
                shape = (len(raws),) + tuple(raws[0].shape)
                out = self.outputs[slot].get(m)
                if out is None or out.shape != shape:
                    out = self.outputs[slot][m] = torch.empty(shape, dtype=torch.float32)
            with self._on_side_stream():
                batch[m] = to_values(raws, [c.scales[(s, m)] for s in subjects], c.cfg.normalize, self.dtype, out)
        if "t1" in batch:
            batch["t1"] = batch["t1"].unsqueeze(1)
        with self._on_side_stream():
            batch["label"] = torch.tensor([c.labels[i] for i in group], dtype=torch.int64).to(c.device)
            batch["index"] = torch.tensor(group, dtype=torch.int64).to(c.device)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[slot] = event
        return batch, event

    def _upload(self, slot: int, modality: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Samples on the cache's device: as they are when already there, else through the slot's
        pinned buffer and an asynchronous copy on the side stream (CUDA)."""
        if tensors[0].device == self.cache.device:
            return tensors
        shape = (len(tensors),) + tuple(tensors[0].shape)
        buf = self.pinned[slot].get(modality)
        if buf is None or buf.shape != shape or buf.dtype != tensors[0].dtype:
            buf = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
            self.pinned[slot][modality] = buf
        for b, t in zip(buf, tensors):
            b.copy_(t)
        with self._on_side_stream():
            return list(buf.to(self.cache.device, non_blocking=True).unbind(0))
