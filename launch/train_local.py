#!/usr/bin/env python
"""Train one run on this machine: in this process, or as N gloo processes (no SLURM needed).

Examples::

    python launch/train_local.py --config hpc/configs/demo.yaml
    python launch/train_local.py --config hpc/configs/demo.yaml --nproc 2 run_dir=runs/demo2 optim.lr=3e-4

Run the same command again after a crash, kill or stop: it resumes from the newest complete
checkpoint in run_dir (a finished run returns at once). ``touch RUN_DIR/STOP`` (or Ctrl-C,
SIGUSR2 or SIGTERM to this launcher) makes every rank save a checkpoint and stop; a second
Ctrl-C stops at once, losing the steps since the last checkpoint.

One run directory takes one run at a time (``RUN_DIR/run.lock``, :mod:`masan.train.runlock`):
a second start while a run is live is refused, naming it. The ranks of ``--nproc N`` die with
this launcher, even when it is killed with kill -9.

Exit status: 0 when the run completed or stopped cleanly (the last line says which), 1 when a
rank failed, 2 for a bad config or arguments, a run directory that is not writable or in use
by another run, or a checkpoint that refuses this config (nothing in the run directory changed
then), 130 after a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from masan.access import reports_denied
from masan.argtypes import number, str_path

FORWARDED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
POLL_S = 0.5
KILL_AFTER_S = 5.0
"""After a second Ctrl-C, or after terminating them, ranks still alive this long later (stuck
in a step or a collective) are killed."""
END_GRACE_S = 5.0
"""After one rank failed, how long the others may take to end by themselves before they are terminated."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from masan.config import add_config_arguments

    ap = argparse.ArgumentParser(
        description="Train a MASAN run locally: in this process (--nproc 1) or as N processes with "
                    "torch.distributed gloo on the CPU (nccl when GPUs are visible). Resumes automatically "
                    "from RUN_DIR/checkpoints; `touch RUN_DIR/STOP` saves and stops every rank.",
        epilog="Overrides are section.key=value, e.g. run_dir=runs/x train.max_steps=20 optim.lr=3e-4. Without "
               "--config, a run directory that has a config.yaml continues with it (as launch/submit.py does).")
    ap.add_argument("--nproc", type=number(int, 1), default=1, help="processes (data-parallel ranks) on this machine")
    ap.add_argument("--port", type=number(int, 1, 65535), default=None,
                    help="rendezvous port for --nproc > 1 (default: a free one)")
    ap.add_argument("--run-dir", type=str_path,
                    help="run directory, as launch/submit.py takes it (the same as run_dir=...; "
                         "default: the --config file's run_dir, else the built-in one)")
    add_config_arguments(ap)
    args = ap.parse_intermixed_args(argv)  # overrides may come before, between or after the options
    if args.run_dir is not None:
        from launch.slurm.plan import base_run_dir
        from masan.config import ConfigError

        try:
            base_run_dir(args.run_dir, None, args.overrides)
        except ConfigError as e:
            ap.error(str(e))
        args.overrides.append(f"run_dir={args.run_dir}")
    return args


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


FORMER_DEFAULT_RUN_DIR = "runs/default"
"""The built-in run directory of earlier versions (now launch/submit.py's, the config's default)."""


def former_default_refusal(args: argparse.Namespace) -> str | None:
    """Why a start that names no run directory must not train in the built-in one: a run of an
    earlier version waits in :data:`FORMER_DEFAULT_RUN_DIR` and the new default holds none
    (it would start fresh beside it, silently). None otherwise."""
    from launch.slurm.plan import DEFAULT_RUN_DIR, base_run_dir, run_dir_override
    from masan.rundir import RunDir

    if run_dir_override(args.overrides) is not None or \
            base_run_dir(None, args.config, args.overrides) != DEFAULT_RUN_DIR:
        return None
    if RunDir(FORMER_DEFAULT_RUN_DIR).config.is_file() and not RunDir(DEFAULT_RUN_DIR).config.is_file():
        return (f"no run directory given, and the built-in one is now {DEFAULT_RUN_DIR} (launch/submit.py's), while "
                f"an earlier run waits in {FORMER_DEFAULT_RUN_DIR}: pass --run-dir {FORMER_DEFAULT_RUN_DIR} to resume "
                f"it, or --run-dir {DEFAULT_RUN_DIR} to start a new run there")
    return None


def resume_with_run_config(args: argparse.Namespace) -> None:
    """Without --config, continue a run with its own config.yaml (the overrides still apply):
    the built-in defaults would be refused by its checkpoints, one differing key at a time."""
    from launch.slurm.plan import DEFAULT_RUN_DIR, run_dir_override
    from masan.rundir import RunDir

    if args.config is not None:
        return
    args.config = RunDir(run_dir_override(args.overrides) or DEFAULT_RUN_DIR).start_config(None)
    if args.config is not None and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger(__name__).info("no --config: continuing with the run's own %s", args.config)


def train_here(args: argparse.Namespace) -> int:
    """One rank: this process (the environment says which rank, or a world of one)."""
    from masan.train.runlock import LAUNCHER_PID_ENV, die_with_launcher
    from masan.train.stop import StopRequest

    if LAUNCHER_PID_ENV in os.environ:
        die_with_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    stop = StopRequest().install()  # before the slow imports: a Ctrl-C from now on saves and stops

    from launch.slurm.jobs import EXIT_DIVERGED, EXIT_REFUSED
    from masan.config import config_from_args
    from masan.train.gradients import Diverged
    from masan.train.run import USER_ERRORS, run_training

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        former = former_default_refusal(args)
    except USER_ERRORS as e:
        former = str(e)
    if former:
        print(f"error (rank {rank}): {former}", file=sys.stderr)
        return EXIT_REFUSED
    resume_with_run_config(args)
    cfg = config_from_args(args)
    stop.run_dir = Path(cfg.run_dir)
    try:
        outcome = run_training(cfg, stop)
    except USER_ERRORS as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Diverged as e:  # every rank at the same step: a restart would diverge again
        print(f"diverged (rank {rank}): {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if rank == 0:
        hint = {"stopped": "; run the same command again to continue",
                "max_steps": "; train.max_steps ended it before its epochs: start it again with a larger "
                             "train.max_steps to go on"}.get(outcome.status, "")
        print(f"status: {outcome.status} at step {outcome.step} (epoch {outcome.epoch}) in {outcome.run_dir}{hint}",
              flush=True)
    stop.settle()  # a Ctrl-C during the interpreter's teardown must not read as work lost
    return 0


def spawn(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``--nproc`` copies of this script as ranks 0..N-1 and wait for all of them.

    If one rank dies, the others are terminated after a few seconds (they would wait forever in
    a collective) and killed if that does not end them.
    Signals to this launcher are forwarded to every rank (a stop request reaches all of them).
    The ranks run in their own process group, so a Ctrl-C in the terminal reaches them once,
    through this launcher (twice would read as the second Ctrl-C that stops at once), and they
    die with this launcher (:func:`masan.train.runlock.die_with_launcher`).
    """
    from masan.distributed import free_port
    from masan.train.runlock import LAUNCHER_PID_ENV, die_with_launcher

    if LAUNCHER_PID_ENV in os.environ:  # started by launch/submit.py --local: end with it, and the ranks with this
        die_with_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    port = args.port or free_port()
    worker_argv = strip_nproc(argv)
    procs: list[subprocess.Popen] = []
    interrupts = {"count": 0, "kill_at": None}
    # before the ranks exist: a rank started after a Ctrl-C learns of it from the others (the
    # stop flags are agreed over all ranks at each step)
    _forward_signals(procs, interrupts)
    _start_ranks(procs, args.nproc, worker_argv, port)
    codes, ended = _wait_for_ranks(procs, interrupts)
    return _launcher_exit(codes, ended, interrupts)


def _forward_signals(procs: list[subprocess.Popen], interrupts: dict) -> None:
    """Install this launcher's handlers: :data:`FORWARDED_SIGNALS` go to every live rank of
    ``procs`` (a list the caller fills later); ``interrupts`` counts Ctrl-Cs and, at the second,
    sets ``kill_at`` (a time.monotonic() deadline); Ctrl-Z stops and resumes the ranks too."""

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        if signum == signal.SIGINT:
            interrupts["count"] += 1
            if interrupts["count"] == 2:
                interrupts["kill_at"] = time.monotonic() + KILL_AFTER_S
        hard = signum == signal.SIGINT and interrupts["count"] > 2  # a third Ctrl-C: no waiting at all
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if hard else signum)

    def suspend(signum, frame):  # noqa: ARG001 - signal handler signature
        # Ctrl-Z: the terminal stops only this launcher's process group, the ranks are outside it
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.send_signal(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # returns at `fg` / `bg`
        for p in alive:
            p.send_signal(signal.SIGCONT)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    signal.signal(signal.SIGTSTP, suspend)


def _start_ranks(procs: list[subprocess.Popen], nproc: int, worker_argv: list[str], port: int) -> None:
    """Start ranks 0..nproc-1 (this script with ``worker_argv``) into ``procs``, one by one, so
    the signal handlers reach every rank already started."""
    for rank in range(nproc):
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *worker_argv],
                                      env=rank_environment(rank, nproc, port), stdin=subprocess.DEVNULL,
                                      process_group=0))


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of rank ``rank`` of ``nproc`` on this host: torch.distributed's variables
    on loopback, this launcher's pid, and OMP_NUM_THREADS (unless set) = the cores this launcher
    may use (its affinity mask: a SLURM job's share, not the node's) split over the ranks."""
    from masan.host import usable_cores
    from masan.train.runlock import LAUNCHER_PID_ENV

    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    # share the cores instead of every rank starting one thread per core (as torchrun does)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    return env


def _wait_for_ranks(procs: list[subprocess.Popen], interrupts: dict) -> tuple[dict[int, int], set[int]]:
    """Wait until every rank has ended; after one fails, terminate the others :data:`END_GRACE_S`
    later and kill what is left :data:`KILL_AFTER_S` after that (or after a second Ctrl-C).
    Returns (exit code per rank, the ranks this launcher terminated)."""
    codes: dict[int, int] = {}
    ended: set[int] = set()  # ranks this launcher terminated: their codes say nothing about the run
    end_at = None
    while len(codes) < len(procs):
        for rank, p in enumerate(procs):
            if rank not in codes and p.poll() is not None:
                codes[rank] = p.returncode
                if p.returncode != 0 and end_at is None:
                    # a refused start ends every rank by itself (the refusal is agreed); after a crash
                    # the others would wait in a collective forever
                    end_at = time.monotonic() + END_GRACE_S
        if end_at is not None and time.monotonic() > end_at:
            for rank, p in enumerate(procs):
                if p.poll() is None:
                    ended.add(rank)
                    p.terminate()
            end_at = float("inf")
            interrupts["kill_at"] = min(interrupts["kill_at"] or end_at, time.monotonic() + KILL_AFTER_S)
        if interrupts["kill_at"] is not None and time.monotonic() > interrupts["kill_at"]:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(POLL_S)
    return codes, ended


def _launcher_exit(codes: dict[int, int], ended: set[int], interrupts: dict) -> int:
    """This launcher's exit status from its ranks' (the ranks it terminated do not count), with
    the line that says what to do."""
    from launch.slurm.jobs import EXIT_DIVERGED, EXIT_REFUSED
    from masan.train.stop import EXIT_INTERRUPTED

    failed = {r: c for r, c in codes.items() if c != 0 and r not in ended}
    if interrupts["count"] >= 2 and failed:
        print("stopped at once by a second Ctrl-C: the steps since the newest complete checkpoint are lost; "
              "run the same command again to resume from it", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not failed:
        return 0
    codes_seen = set(failed.values())
    if codes_seen == {EXIT_DIVERGED}:  # every rank at the same step, its error above
        print("error: training diverged; a restart from its newest complete checkpoint would diverge again",
              file=sys.stderr)
        return EXIT_DIVERGED
    stopped = (f"; rank(s) {sorted(ended)}, still running then, were stopped (a collective timeout above "
               "means one of them had stopped answering)" if ended else "")
    print(f"error: rank(s) {sorted(failed)} exited with {sorted(codes_seen)}{stopped}; "
          f"the run resumes from its newest complete checkpoint when started again", file=sys.stderr)
    return EXIT_REFUSED if codes_seen == {EXIT_REFUSED} else 1


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` / ``--port ...`` (the workers are single ranks)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--port"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--port=")):
            continue
        out.append(a)
    return out


@reports_denied("train_local")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.nproc > 1 and "RANK" not in os.environ:
        from masan.distributed import port_taken

        if args.port is not None and port_taken(args.port):
            print(f"error: --port {args.port} is in use on this machine (another run or program listens there); "
                  "pass another port, or leave --port out to use a free one", file=sys.stderr)
            return 2
        return spawn(args, argv)
    return train_here(args)


if __name__ == "__main__":
    sys.exit(main())
