"""Stop requests: how a time limit or preemption reaches every rank.

SLURM sends SIGUSR2 (``--signal=USR2@delay``) to every task ahead of the time limit or on
preemption, and submitit calls ``checkpoint()`` on one rank only, while a DeepSpeed save
needs every rank. So nothing is saved inside a signal handler: the handler (or a
``STOP`` file in the run directory, or ``checkpoint()`` on rank 0) only raises a local flag,
and the training loop all-reduces the flags at each step boundary (:meth:`StopRequest.agreed`)
so all ranks stop at the same step, save one complete checkpoint together and return
``status="stopped"``. The launcher then requeues the job.

Ctrl-C (SIGINT) is a stop request too: the run saves and ends ``stopped``, so nothing since
the last checkpoint is lost. A second Ctrl-C ends the process at once with exit status
:data:`EXIT_INTERRUPTED` (130, what a shell reports for Ctrl-C), saying which checkpoint the
next start resumes from: for a rank stuck in a step, or a user who prefers to lose the steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import weakref
from pathlib import Path

from masan.rundir import RunDir

EXIT_INTERRUPTED = 130
"""Exit status after a second Ctrl-C: stopped at once, without a checkpoint (128 + SIGINT)."""


class StopRequest:
    """A per-process stop flag fed by signals, a file in ``run_dir`` or a direct call.

    Args:
        run_dir: the run directory; a file ``run_dir/STOP`` asks every rank to stop.
    """

    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._flag = threading.Event()
        self.reason = ""
        self._interrupts = 0
        self._settled = False
        self._before_exit: list = []

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)) -> "StopRequest":
        """Make these signals set the flag (main thread only). Never use SIGUSR1: NCCL owns it.
        SIGINT also counts Ctrl-C presses: the second one ends the process at once."""
        for sig in signals:
            signal.signal(sig, self._on_interrupt if sig == signal.SIGINT else self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.request(f"signal {signal.Signals(signum).name}")

    def before_exit(self, cleanup) -> None:
        """Run ``cleanup()`` (a bound method, quick, needing no other rank: e.g. deleting this
        node's host cache) when a second Ctrl-C ends the process without unwinding. Held weakly:
        its object still goes when the run drops it."""
        self._before_exit.append(weakref.WeakMethod(cleanup))

    def _exit(self, status: int) -> None:
        for ref in self._before_exit:
            cleanup = ref()
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
        os._exit(status)  # no unwinding: the other ranks may never reach a collective again

    def _on_interrupt(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._settled:
            self._exit(0)  # the outcome is saved and reported: ending now loses nothing
        self._interrupts += 1
        if self._interrupts > 1:
            self._say(f"second Ctrl-C: stopping at once, without a checkpoint: {self.lost()}")
            self._exit(EXIT_INTERRUPTED)
        self.request("Ctrl-C (SIGINT)")
        self._say("Ctrl-C: every rank saves a checkpoint at the end of this step, then stops (press Ctrl-C again "
                  "to stop at once, losing the steps since the last checkpoint)")

    @staticmethod
    def _say(message: str) -> None:
        """One line on stderr, from rank 0 only (every rank receives the launcher's signal). A raw
        write: the handler may have interrupted a print or a log line, and re-entering Python's
        buffered streams would raise in the training code."""
        if os.environ.get("RANK", "0") == "0":
            with contextlib.suppress(OSError):
                os.write(2, f"\n{message}\n".encode())

    def lost(self) -> str:
        """What a stop without a checkpoint loses, and where the next start resumes."""
        if self.run_dir is None:
            return "the steps since the last checkpoint are lost"
        folder = RunDir(self.run_dir).checkpoints
        # never import in a signal handler: it may interrupt the import of that very module
        checkpoint = sys.modules.get("masan.train.checkpoint")
        if checkpoint is None:
            return f"the steps since the newest complete checkpoint in {folder} are lost; the same command resumes"
        try:
            newest = (folder / checkpoint.POINTER).read_text().strip()
        except OSError:
            return (f"the steps since the start are lost (no complete checkpoint in {folder} yet); the same "
                    "command starts the run again from scratch")
        return (f"the steps since {newest} (the newest complete checkpoint in {folder}) are lost; the same "
                "command resumes from it")

    def settle(self) -> None:
        """The run returned and its outcome was reported: a Ctrl-C from now on just ends the
        process, with exit status 0 (the process is ending anyway)."""
        self._settled = True

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
