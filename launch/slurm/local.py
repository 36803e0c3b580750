"""Run a job on this machine without SLURM: N gloo ranks as local processes.

Used by ``submit.py --local`` and by its automatic fallback when no SLURM answers. Each rank
is a fresh spawned process (clean DeepSpeed/torch.distributed state) with RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT and LOCAL_RANK, and a StopRequest installed for
SIGUSR2/SIGTERM; Ctrl-C or SIGTERM to the launcher is passed on as SIGTERM, so the ranks
stop at the next step with a complete checkpoint and a later submission resumes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

from launch.slurm import jobs
from launch.slurm.task import DEFAULT_ENTRY, SignalLog, resolve_entry
from masan.config import RunConfig

LOCAL_HOST = "127.0.0.1"
JOIN_POLL_S = 1.0


def _rank_main(cfg: RunConfig, rank: int, world_size: int, port: int, entry: str, log_path: str) -> None:
    from masan.train.stop import StopRequest

    with open(log_path, "a", buffering=1) as logf:
        if rank != 0:
            os.dup2(logf.fileno(), sys.stdout.fileno())
            os.dup2(logf.fileno(), sys.stderr.fileno())
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=LOCAL_HOST, MASTER_PORT=str(port))
        stop = StopRequest(cfg.run_dir)
        SignalLog(stop).install()
        outcome = resolve_entry(entry)(cfg, stop)
        print(f"rank {rank}: {outcome}", flush=True)
        if outcome.status != "completed":
            sys.exit(3)


def run_local(cfg: RunConfig, world_size: int = 1, entry: str = DEFAULT_ENTRY) -> int:
    """Train ``cfg`` with ``world_size`` local ranks; returns 0 when every rank completed.

    Rank 0 prints to this terminal; the others write ``run_dir/logs/local_rank<R>.log``.
    """
    from masan.train.distributed import free_port

    run_dir = Path(cfg.run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs.record_job(run_dir, str(os.getpid()), "local", str(logs), world_size=world_size)
    ctx = mp.get_context("spawn")
    port = free_port(LOCAL_HOST)
    procs = [ctx.Process(target=_rank_main, name=f"masan-rank{r}",
                         args=(cfg, r, world_size, port, entry, str(logs / f"local_rank{r}.log")))
             for r in range(world_size)]
    for p in procs:
        p.start()

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(JOIN_POLL_S)
                if p.exitcode not in (None, 0):
                    forward(signal.SIGTERM, None)  # one rank failed: do not leave the rest hanging
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.exitcode for p in procs]
    return 0 if all(c == 0 for c in codes) else max(c if c and c > 0 else 1 for c in codes)
