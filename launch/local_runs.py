"""The runs of a submission trained on this machine, one after the other, without SLURM.

Each run is one ``launch/train_local.py`` child (nodes x gpus-per-node gloo ranks, at least
one), restarted after a crash up to ``--max-restarts`` times. SIGTERM or SIGHUP (a closed
terminal) to the launcher stops the run in progress as Ctrl-C does: its ranks save a
checkpoint and stop, no other run starts, and the launcher exits 128 + the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from launch.slurm import jobs
from launch.slurm.plan import Resources, RunSpec
from masan.config import save_config
from masan.rundir import RunDir
from masan.train.runlock import LAUNCHER_PID_ENV, RunLock, RunLockedError
from masan.train.stop import EXIT_INTERRUPTED

TRAIN_LOCAL = Path(__file__).resolve().parent / "train_local.py"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a local run as Ctrl-C does (SIGHUP: the terminal was closed)."""


def run_locally(specs: list[RunSpec], res: Resources, max_restarts: int) -> int:
    """Train the runs one after the other with launch/train_local.py (nodes x gpus ranks each).

    SIGTERM or SIGHUP to this command stops the run in progress as Ctrl-C does (its ranks save a
    checkpoint and stop), starts no other run and exits 128 + the signal (:class:`LocalStop`).
    """
    with LocalStop() as stop:
        return _run_locally(specs, res, max_restarts, stop)


def _run_locally(specs: list[RunSpec], res: Resources, max_restarts: int, stop: LocalStop) -> int:
    failed, refused, stopped, diverged = [], [], [], []
    code = 0
    for spec in specs:
        if stop.signum is not None:
            break  # asked to stop: the runs not begun stay as they are, the same command starts them
        busy = _lock_holder(spec.run_dir)
        if busy is not None:  # refused before anything is written into that run's folder
            print(f"refused: {busy}", file=sys.stderr, flush=True)
            refused.append(spec.run_dir)
            continue
        cfg_file = save_config(spec.cfg, RunDir(spec.run_dir).submitted_config)
        cmd = [sys.executable, str(TRAIN_LOCAL), "--config", str(cfg_file), "--nproc", str(res.world_size)]
        previous = None
        for attempt in range(max_restarts + 1):
            print(f"local run {spec.run_dir}: {res.world_size} rank(s)"
                  f"{f', restart {attempt}' if attempt else ''}", flush=True)
            proc = stop.start(cmd)
            jobs.record_job(spec.run_dir, str(proc.pid), "local", "(this terminal)", world_size=res.world_size)
            if previous is not None:
                jobs.record_restart(spec.run_dir, str(proc.pid), after=str(previous.pid), restart=attempt,
                                    code=previous.returncode)
            code = _wait_child(proc)
            jobs.record_event(spec.run_dir, str(proc.pid), jobs.EXITED, code=code)
            if code in (0, jobs.EXIT_REFUSED, jobs.EXIT_DIVERGED, EXIT_INTERRUPTED) or stop.signum is not None \
                    or spec.done() is not None:
                break  # finished, stopped on request (STOP, Ctrl-C, a signal), or an end a restart cannot cure
            print(f"  local run {jobs.exit_text(code)}", flush=True)
            previous = proc
        if code == jobs.EXIT_REFUSED:
            refused.append(spec.run_dir)
        elif code == jobs.EXIT_DIVERGED:
            diverged.append(spec.run_dir)
        elif code in (0, EXIT_INTERRUPTED) and spec.done() is None:
            stopped.append(spec.run_dir)
            if code == EXIT_INTERRUPTED:
                break  # a second Ctrl-C: the user wants the terminal back, not the next run
        elif spec.done() is None:
            failed.append(spec.run_dir)
    for d in refused:
        _say(f"run REFUSED: {d} (its config, resume or run directory, or a full disk: see the error above; fix it and "
             "run again)")
    for d in stopped:
        _say(f"run STOPPED: {d} (on request; run the same command again to resume from its last checkpoint)")
    for d in failed:
        _say(f"run NOT finished: {d} (run the same command again to resume)")
    for d in diverged:
        _say(f"run DIVERGED: {d} (see the error above; resumed, it would diverge again)")
    if stop.signum is not None:
        return 128 + stop.signum  # what a shell reports for a command that a signal ended
    if failed or diverged:
        return jobs.EXIT_FAILED
    return jobs.EXIT_REFUSED if refused else EXIT_INTERRUPTED if code == EXIT_INTERRUPTED else 0


def _lock_holder(run_dir: Path) -> str | None:
    """Why another run holds ``run_dir`` (its ``run.lock``: a launch/train_local.py started by
    hand has no jobs.json entry), or None. Locks and unlocks at once, creating and writing
    nothing: the run's own start takes the lock again."""
    lock = RunLock(run_dir)
    try:
        lock.take_existing()
    except RunLockedError as e:
        return str(e)
    finally:
        lock.release()
    return None


def _say(text: str) -> None:
    """A line on stdout that a closed terminal (SIGHUP) cannot turn into a traceback."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


class LocalStop:
    """:data:`STOP_SIGNALS` to this command while it runs local children.

    A child is stopped with SIGTERM, which its ranks take as a stop request (checkpoint, then
    exit 0). It runs with :data:`masan.train.runlock.LAUNCHER_PID_ENV` set to this process, so
    it dies with it (kill -9 included) instead of training on with nobody to stop it, and with
    SIGHUP ignored: a closed terminal signals the whole process group, and SIGHUP's default
    action would kill the child without a checkpoint before the SIGTERM from here reaches it.
    It stays in this process group so that a Ctrl-C in the terminal reaches it once, directly.
    """

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> "LocalStop":
        for sig in STOP_SIGNALS:
            self._before[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():  # main() may run inside a longer-lived program
            signal.signal(sig, handler)

    def start(self, cmd: list[str]) -> subprocess.Popen:
        """Start ``cmd`` as the child that a stop signal reaches."""
        env = dict(os.environ, **{LAUNCHER_PID_ENV: str(os.getpid())})
        # preexec_fn is unsafe only beside other threads, and this command starts none
        self.child = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_hangup)
        if self.signum is not None:  # the signal came while it was being started
            self.child.send_signal(signal.SIGTERM)
        return self.child

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        first = self.signum is None
        if first:
            self.signum = signum
        if self.child is None or self.child.poll() is not None:
            return
        self.child.send_signal(signal.SIGTERM)
        if first:
            # a raw write: the handler may have interrupted a print, and a closed terminal raises
            with contextlib.suppress(OSError):
                os.write(2, f"\n{signal.Signals(signum).name}: the ranks save a checkpoint at the end of this "
                            f"step, then stop; this command then exits {128 + signum}\n".encode())


def _ignore_hangup() -> None:
    """In the child, before it executes: SIGHUP ignored (an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _wait_child(proc: subprocess.Popen) -> int:
    """Wait for a local run; Ctrl-C reaches it too (it saves and stops), so keep waiting.
    (SIGTERM and SIGHUP are forwarded by :class:`LocalStop`'s handler while this waits.)"""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            _say("interrupted: waiting for the ranks to save a checkpoint and stop ...")
