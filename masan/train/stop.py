"""Stop requests: how a time limit or preemption reaches every rank.

SLURM sends SIGUSR2 (``--signal=USR2@delay``) to every task ahead of the time limit or on
preemption, and submitit calls ``checkpoint()`` on one rank only, while a DeepSpeed save
needs every rank. So nothing is saved inside a signal handler: the handler (or a
``STOP`` file in the run directory, or ``checkpoint()`` on rank 0) only raises a local flag,
and the training loop all-reduces the flags at each step boundary (:meth:`StopRequest.agreed`)
so all ranks stop at the same step, save one complete checkpoint together and return
``status="stopped"``. The launcher then requeues the job.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from masan.rundir import RunDir


class StopRequest:
    """A per-process stop flag fed by signals, a file in ``run_dir`` or a direct call.

    Args:
        run_dir: the run directory; a file ``run_dir/STOP`` asks every rank to stop.
    """

    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._flag = threading.Event()
        self.reason = ""

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> "StopRequest":
        """Make these signals set the flag (main thread only). Never use SIGUSR1: NCCL owns it."""
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.request(f"signal {signal.Signals(signum).name}")

    def request(self, reason: str = "requested") -> None:
        """Ask this process to stop at the next step boundary."""
        self.reason = self.reason or reason
        self._flag.set()

    @property
    def file(self) -> Path | None:
        return RunDir(self.run_dir).stop if self.run_dir is not None else None

    def local(self) -> bool:
        """True if this process was asked to stop (flag or STOP file)."""
        if not self._flag.is_set() and self.file is not None and self.file.exists():
            self.request(f"file {self.file}")
        return self._flag.is_set()

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank was asked to stop.

        Call it at the same point on all ranks (e.g. after each optimizer step).
        Without an initialised process group it is :meth:`local`.
        """
        import torch
        import torch.distributed as dist

        flag = self.local()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop = bool(t.item() > 0)
        if stop and not flag:
            self.request("another rank asked to stop")
        return stop

    def clear_file(self) -> None:
        """Remove a consumed STOP file (rank 0, after the stop checkpoint is complete)."""
        if self.file is not None:
            self.file.unlink(missing_ok=True)
