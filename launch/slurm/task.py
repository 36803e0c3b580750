"""The submitit callable: one SLURM task = one training rank, preemption-safe.

What happens on a time limit or preemption (``--signal=USR2@delay``, sent by SLURM to every
task of the job step):

1. submitit installs its own USR2 handler before calling the task; it would call
   ``checkpoint()`` on global rank 0 only and requeue at once, while a DeepSpeed save needs
   every rank. So :meth:`TrainTask.__call__` replaces the USR2 and SIGTERM handlers on every
   rank with ones that only raise the local :class:`~masan.train.stop.StopRequest` flag.
2. ``run_training`` all-reduces the flag at the next step boundary, every rank saves one
   complete checkpoint, and it returns ``status="stopped"``.
3. Only then, global rank 0 runs ``scontrol requeue`` for its job (when USR2 arrived and
   ``SLURM_RESTART_COUNT`` is below ``max_requeues``); every rank exits without writing a
   submitit result. The requeued job (same id) starts over and ``run_training`` resumes from
   the newest complete checkpoint in the run directory.

SIGTERM alone (``scancel``, ``scontrol requeue`` by hand, preemption with ``PreemptMode=
REQUEUE``) also stops at the next step with a checkpoint, if ``KillWait`` allows, but is never
followed by a requeue from here: SLURM already requeues (or the user cancelled).

Before step 1 (while the task is still importing) submitit's own handler is in charge; there
is nothing to save then, so :meth:`TrainTask.checkpoint` just resubmits the unchanged task.

A run that refuses to start (a config or resume error, raised on every rank alike) is not a
crash: rank 0 records a ``refused`` event with the reason in ``run_dir/jobs.json`` and exits
with status 2, so ``submit.py --wait`` reports it instead of resubmitting it. The other ranks
log the reason and exit 0: the job is run with ``srun --kill-on-bad-exit=1``, and a rank
exiting 2 first would have SLURM kill rank 0 before it recorded why.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import submitit

from launch.slurm import jobs
from masan.config import RunConfig

log = logging.getLogger("masan.launch")

DEFAULT_ENTRY = "masan.train.run:run_training"
REQUEUE_SIGNAL = signal.SIGUSR2  # never SIGUSR1: NCCL uses it
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)  # SIGINT: Ctrl-C through an interactive srun
# SLURM signals all tasks at about the same time, but a rank may stop because another rank
# was signalled first; give its own signal this long to arrive before deciding to requeue.
SIGNAL_GRACE_S = 5.0


def resolve_entry(entry: str):
    """``"package.module:function"`` -> the function."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class SignalLog:
    """Signal handlers that record what arrived and raise the StopRequest flag."""

    stop: object
    seen: set[int] = field(default_factory=set)

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> "SignalLog":
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def wait_for_any(self, timeout_s: float) -> None:
        """Wait until some signal was recorded (or timeout_s passed)."""
        deadline = time.monotonic() + timeout_s
        while not self.seen and time.monotonic() < deadline:
            time.sleep(0.1)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.seen.add(signum)
        self.stop.request(f"signal {signal.Signals(signum).name}")


def export_distributed_env() -> submitit.JobEnvironment:
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK from the SLURM task environment.

    CUDA_VISIBLE_DEVICES is left alone (every task sees all GPUs of its node) because
    DeepSpeed selects ``cuda:LOCAL_RANK`` itself.
    """
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.master_addr = jobs.node_address(dist_env.master_addr)
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    return submitit.JobEnvironment()


class TrainTask:
    """Picklable callable run by every SLURM task of a training job.

    Args:
        cfg: the resolved run configuration (its ``run_dir`` is where checkpoints live).
        max_requeues: requeues after USR2 allowed for this job (``SLURM_RESTART_COUNT``
            counts every requeue of the job, by this task, by hand or by preemption).
        entry: ``"module:function"`` of the training entry point,
            ``run_training(cfg, stop) -> TrainOutcome``.
    """

    def __init__(self, cfg: RunConfig, max_requeues: int = 10, entry: str = DEFAULT_ENTRY):
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.entry = entry

    def __call__(self):
        from masan.train.stop import StopRequest

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
        env = export_distributed_env()
        rank = env.global_rank
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        stop = StopRequest(self.cfg.run_dir)
        signals = SignalLog(stop).install()
        if rank == 0:
            jobs.record_event(self.cfg.run_dir, env.job_id, "started", restarts=restarts,
                              nodes=env.num_nodes, world_size=env.num_tasks)
        log.info("rank %d/%d on node %s (job %s, restart %d): training %s", rank, env.num_tasks,
                 os.environ.get("SLURMD_NODENAME", env.hostname), env.job_id, restarts, self.cfg.run_dir)
        from masan.train.gradients import Diverged
        from masan.train.run import USER_ERRORS, DiskRefused

        try:
            outcome = resolve_entry(self.entry)(self.cfg, stop)
        except USER_ERRORS as e:
            # every rank gets the same error at the start (agreed collectively); a disk that refuses a
            # write later may do so to this rank alone: it records it and exits 2 itself
            alone = isinstance(e, DiskRefused)
            if rank == 0 or alone:
                jobs.record_event(self.cfg.run_dir, env.job_id, jobs.REFUSED, error=str(e))
            log.error("rank %d: refused: %s", rank, e)
            sys.exit(jobs.EXIT_REFUSED if rank == 0 or alone else 0)
        except Diverged as e:  # raised on every rank at the same step
            if rank == 0:
                jobs.record_event(self.cfg.run_dir, env.job_id, jobs.DIVERGED, error=str(e))
            log.error("rank %d: diverged: %s", rank, e)
            sys.exit(jobs.EXIT_DIVERGED if rank == 0 else 0)
        log.info("rank %d: run_training returned %s", rank, outcome)
        if outcome.status != "stopped":
            return outcome
        signals.wait_for_any(SIGNAL_GRACE_S)
        if signal.SIGTERM in signals.seen:
            log.info("rank %d: SIGTERM: SLURM ends or requeues this job itself; exiting", rank)
            sys.exit(0)
        if REQUEUE_SIGNAL not in signals.seen:
            return outcome  # a STOP file: the run ends here, stopped; submit again to resume
        if restarts >= self.max_requeues:
            if rank == 0:
                jobs.record_event(self.cfg.run_dir, env.job_id, jobs.REQUEUES_SPENT,
                                  step=outcome.step, restarts=restarts)
            log.warning("rank %d: not requeued: %d requeues already (max %d); resubmit to resume",
                        rank, restarts, self.max_requeues)
            return outcome
        if rank == 0:
            # run_training returned "stopped": the checkpoint is complete on every rank.
            jobs.record_event(self.cfg.run_dir, env.job_id, "requeued", step=outcome.step,
                              epoch=outcome.epoch, restarts=restarts + 1)
            jobs.requeue(env.job_id)
            log.info("requeued job %s after a complete checkpoint at step %d", env.job_id, outcome.step)
        # Exit without a submitit result: the job is not over, it continues after the requeue.
        sys.exit(0)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Used by submitit only if USR2 arrives before __call__ took over the handlers."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
