"""TensorBoard for one run (rank 0 only; every other rank gets a logger that does nothing).

Steps are global optimizer steps. After a resume the writer is opened with
``purge_step=<resumed step + 1>``: points a killed run logged past its last complete
checkpoint are dropped (those up to its step were logged before it was saved), and a start
from scratch over earlier events (a run killed before its first checkpoint) with
``purge_step=0``, so every tag's steps increase without duplicates or rewinds for readers
that apply TensorBoard's purge events (TensorBoard itself; a raw reader of the event files,
such as tbparse, sees the dropped points too). The writer is flushed at each checkpoint and
closed before the run returns.

Tags: ``train/<loss term>`` (the logged step's loss, over ranks and micro-batches),
``train/epoch_loss`` (an epoch's mean loss, at its last step; not for the rest of an epoch a
resume ran), ``train/lr`` (the rate the logged step's update used), ``train/samples_per_s``,
``train/eta_s`` (seconds left of the whole run, :mod:`masan.train.eta`), ``train/epoch``,
per logging interval ``train/data_wait_frac`` (the largest share of the interval any rank spent
waiting for its next batch), ``train/data_wait_s`` and ``train/compute_s`` (seconds, mean over
ranks) and the peak memory of the interval, largest over ranks (:func:`interval_stats`):
``train/peak_rss_gib`` (process resident set), on CUDA ``train/gpu_mem_gib`` (max allocated) and
``train/gpu_reserved_gib`` (max reserved by the caching allocator), ``train/skipped_steps``
(optimizer steps DeepSpeed skipped for non-finite gradients), ``train/grad_norm_<term>``;
``monitor_val/<metric>`` for the validation-part metrics computed every
``log.eval_every_epochs``, the confusion-matrix figure and the region-weight / attention
images. The test part never appears here.

Beside the events, ``RUN_DIR/progress.json`` holds the last logged intervals (wall time s,
step, epochs as a fraction) and the last loss: what ``launch/status.py`` needs for its epoch,
loss and ETA columns, which it would otherwise parse from every event of the run (tens of
thousands over a long run, a second per few thousand). A resumed run starts the intervals
afresh, so status times only its own steps (its ETA appears at its second logged interval).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from masan.config import LogConfig, RunConfig, config_to_dict
from masan.files import atomic_write_json
from masan.host import peak_rss_bytes
from masan.metrics import HPARAM_METRICS, flat_scalars
from masan.rundir import RunDir
from masan.train.eta import ETA_INTERVALS

log = logging.getLogger(__name__)

MONITOR_PREFIX = "monitor_val"
"""Prefix of validation-part metrics (carved from the training subjects; the test part is only
evaluated at the end)."""


MEMORY_TAGS = ("peak_rss_gib", "gpu_mem_gib", "gpu_reserved_gib")


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory since the last call, GiB, and reset: ``peak_rss_gib``
    (:func:`masan.host.peak_rss_bytes`; where it cannot be reset, the peak since the process
    started), and on CUDA ``gpu_mem_gib`` / ``gpu_reserved_gib`` (max allocated / reserved)."""
    out = {"peak_rss_gib": peak_rss_bytes(reset=True) / 2**30}
    if device.type == "cuda":
        out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def interval_stats(wait_s: float, elapsed_s: float, device: torch.device) -> dict[str, float]:
    """One rank's logging interval: seconds waited for data (blocked fetching the next batch),
    wall seconds of the interval, and :func:`peak_memory` (reset for the next interval)."""
    return {"wait_s": wait_s, "elapsed_s": elapsed_s, **peak_memory(device)}


class TrainLogger:
    """Rank-0 TensorBoard writer; a silent no-op when ``enabled`` is False.

    Args:
        run_dir: events go to ``run_dir/tb``.
        log_cfg: the ``log`` config section.
        enabled: True on rank 0 with ``log.tensorboard``.
        purge_step: first step to drop from earlier event files (None: keep them all, a first
            start; 0: drop them all, a start from scratch over a killed start's events).
    """

    def __init__(self, run_dir: str | Path, log_cfg: LogConfig, enabled: bool, purge_step: int | None = None):
        self.writer = None
        self._open = None
        self._progress_file = RunDir(run_dir).progress if enabled else None
        self._intervals: list[list[float]] = []
        if enabled and log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # opened on the first event: a start with nothing left to do leaves no empty events file
            self._open = lambda: SummaryWriter(str(RunDir(run_dir).tb), purge_step=purge_step,
                                               flush_secs=log_cfg.flush_secs)

    def _writer(self):
        """The SummaryWriter, opened on first use; None when this logger is silent."""
        if self.writer is None and self._open is not None:
            self.writer, self._open = self._open(), None
        return self.writer

    def scalars(self, values: dict[str, float], step: int, prefix: str = "train") -> None:
        writer = self._writer()
        if writer is None:
            return
        for name, v in values.items():
            writer.add_scalar(f"{prefix}/{name}", float(v), step)

    def progress(self, step: int, epochs: float, loss: float) -> None:
        """Record a logged interval in ``progress.json`` (see the module doc): the last
        ``ETA_INTERVALS + 1`` of ``[wall time s, step, epochs]`` of this start, and ``loss`` as
        ``[wall time s, step, value]``. A start's first entry replaces every earlier one: the
        time from a stopped start's last interval to a resumed one's first is the downtime
        and the restart, not training (status would have taken it for a slow step)."""
        if self._progress_file is None:
            return
        now = time.time()
        self._intervals = self._intervals[-ETA_INTERVALS:] + [[now, step, float(epochs)]]
        try:
            atomic_write_json(self._progress_file, {"intervals": self._intervals, "loss": [now, step, float(loss)]},
                              indent=None)
        except OSError as e:  # only status reads it: the training goes on, status reads the events
            log.warning("cannot write %s (%s): launch/status.py reads the TensorBoard events instead",
                        self._progress_file, e.strerror or e)
            with contextlib.suppress(OSError):  # an older one would show status a stale position
                self._progress_file.unlink()
            self._progress_file = None

    def interval(self, per_rank: list[dict[str, float]], step: int) -> str:
        """Data wait, compute and peak memory of one logging interval (one :func:`interval_stats`
        per rank, in rank order) to TensorBoard; -> the console line, e.g. ``data wait 1.2 s of
        10.0 s (12.0% max over 2 ranks: 12.0% 3.1%), peak RSS 2.10 GiB, GPU 10.3 GiB alloc``."""
        frac = [r["wait_s"] / max(r["elapsed_s"], 1e-9) for r in per_rank]
        n = len(per_rank)
        values = {"data_wait_frac": max(frac), "data_wait_s": sum(r["wait_s"] for r in per_rank) / n,
                  "compute_s": sum(r["elapsed_s"] - r["wait_s"] for r in per_rank) / n}
        values.update({k: max(r[k] for r in per_rank) for k in MEMORY_TAGS if k in per_rank[0]})
        self.scalars(values, step)
        line = (f"data wait {values['data_wait_s']:.2f} s of {per_rank[0]['elapsed_s']:.2f} s "
                f"({100 * max(frac):.1f}% max over {n} ranks: {' '.join(f'{100 * f:.1f}%' for f in frac)}), "
                f"peak RSS {values['peak_rss_gib']:.2f} GiB")
        if "gpu_mem_gib" in values:
            line += f", GPU {values['gpu_mem_gib']:.2f} GiB allocated / {values['gpu_reserved_gib']:.2f} GiB reserved"
        return line

    def hparams(self, cfg: RunConfig) -> None:
        """The resolved config as text and as TensorBoard hparams (flattened scalars/strings)."""
        writer = self._writer()
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = {}

        def walk(node, prefix):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else k
                if isinstance(v, dict):
                    walk(v, key)
                else:
                    flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)

        d = config_to_dict(cfg)
        walk(d, "")
        metrics = {f"{MONITOR_PREFIX}/{m}": 0.0 for m in HPARAM_METRICS}
        # written into this writer's own file (add_hparams would open a second event folder)
        for summary in hparams(flat, metrics):
            writer.file_writer.add_summary(summary)
        writer.add_text("config", "```\n" + yaml.safe_dump(d, sort_keys=False) + "\n```", 0)

    def monitor_metrics(self, metrics: dict, step: int) -> None:
        """Validation metrics (:func:`masan.metrics.classification_metrics`) + confusion figure."""
        writer = self._writer()
        if writer is None:
            return
        from masan.evaluate.plots import confusion_figure  # matplotlib: only when images are logged

        self.scalars(flat_scalars(metrics), step, prefix=MONITOR_PREFIX)
        writer.add_figure(f"{MONITOR_PREFIX}/confusion_matrix",
                               confusion_figure(metrics["confusion_matrix"], metrics["class_names"],
                                                title="validation part"), step)

    def region_images(self, t1: np.ndarray | None, region_weights: np.ndarray, patch_grid: list[int],
                      step: int, attention: np.ndarray | None = None) -> None:
        """Mean validation region weights over a T1 (paper Fig. 4 style) and the mean attention.

        Args:
            t1: (X, Y, Z) T1 volume the regions tile (None: no overlay figure).
            region_weights: (N, R) region weights of the validation subjects.
            attention: (N, R, R) attention matrices, or None.
        """
        writer = self._writer()
        if writer is None:
            return
        from masan.evaluate.plots import region_map_figure  # matplotlib: only when images are logged

        w = np.asarray(region_weights, dtype=np.float32)
        if t1 is not None and w.size:
            writer.add_figure(f"{MONITOR_PREFIX}/region_weights",
                                   region_map_figure(t1, w.mean(axis=0), patch_grid,
                                                     title="mean region weight, validation part"), step)
        if attention is not None:
            a = np.asarray(attention, dtype=np.float32).mean(axis=0)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            writer.add_image(f"{MONITOR_PREFIX}/attention", a, step, dataformats="HW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
