"""Submitting training runs to SLURM with submitit: the executor, the jobs, their logs.

The executor's parameters come from :meth:`launch.slurm.plan.Resources.executor_parameters`
(one per resource field) plus what every MASAN job needs whatever the resources: rank 0's
stderr in its log, ``hpc/env/cluster_env.sh`` sourced before ``srun`` (threads, NCCL,
signals), ``--requeue`` so that :class:`launch.slurm.task.TrainTask` can requeue the job
after a stop checkpoint, and ``srun --kill-on-bad-exit=1``: when one task fails (a crash, or a
collective timeout because a peer stopped answering), SLURM ends the others, so a frozen node
costs the job ``train.dist_timeout_minutes`` and a restart, not the rest of its time limit.
Submitted jobs are recorded in each run directory's ``jobs.json``. The tasks unpickle
``launch.slurm.task`` on the compute nodes with the submitting Python, where the project is
installed (``pip install -e .``), so no ``PYTHONPATH`` is set.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from functools import lru_cache
from pathlib import Path

from launch.slurm import jobs
from launch.slurm.plan import Resources, RunSpec

ENV_SCRIPT = Path(__file__).resolve().parents[2] / "hpc" / "env" / "cluster_env.sh"
# A task that exits non-zero ends the whole step (the cluster's KillOnBadExit may be 0).
SRUN_ARGS = ("--kill-on-bad-exit=1",)
TRACEBACK = "Traceback (most recent call last)"


def make_executor(folder: Path, res: Resources, max_requeues: int):
    """A ``submitit.SlurmExecutor`` writing its scripts and logs to ``folder``."""
    import submitit  # lazy: --help and local runs need no submitit

    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    # Quoted (a checkout path with spaces); a job whose environment script fails stops there
    # instead of training without its thread counts, NCCL settings and preemption signal.
    setup = [f"source {shlex.quote(str(ENV_SCRIPT))} || exit 1"]
    ex.update_parameters(**res.executor_parameters(), stderr_to_stdout=True, setup=setup,
                         additional_parameters={"requeue": True}, srun_args=list(SRUN_ARGS))
    return ex


def log_path(folder: Path, job_id: str) -> Path:
    """Where submitit writes rank 0's output of a job (``%j_0_log.out``)."""
    return folder / f"{job_id}_0_log.out"


def failure_logs(folder: Path, job_id: str) -> list[Path]:
    """The task logs of an ended job that hold a Python traceback, in rank order (rank 0's log
    when none does): where to read why it failed. The error is not always rank 0's: when a node
    stops answering, the traceback (a collective timeout) is in the logs of the ranks that
    waited for it."""
    ranks = {}
    for path in folder.glob(f"{job_id}_*_log.out"):
        rank = path.name[len(job_id) + 1:-len("_log.out")]
        if rank.isdigit():  # not another array task's log (job 12's glob also matches 12_3_0_log.out)
            ranks[int(rank)] = path
    with_error = [p for _, p in sorted(ranks.items()) if _holds_traceback(p)]
    return with_error or [log_path(folder, job_id)]


def _holds_traceback(path: Path) -> bool:
    """Whether the log at ``path`` holds a traceback; a log is read again only once it changed
    (``launch/status.py --watch`` asks every few seconds, and a long run's logs are large)."""
    try:
        st = path.stat()
    except OSError:  # removed since the listing
        return False
    return _scan_for_traceback((str(path), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=1024)
def _scan_for_traceback(version: tuple[str, int, int]) -> bool:
    """``version``: (path, size, mtime in ns), the cache key of one state of a log."""
    with open(version[0], errors="replace") as f:
        return any(TRACEBACK in line for line in f)


class SubmitError(RuntimeError):
    """sbatch refused the job (an unknown feature, node, account or QOS, too much memory, ...):
    nothing was submitted; the message is sbatch's."""


SUBMITIT_TEMPORARY = re.compile(r"[0-9a-f]{32}(\.pkl|\.sh)$")
"""What submitit writes before sbatch answers: ``<uuid>.pkl``, ``.submission_file_<uuid>.sh`` (renamed
after the job id once sbatch accepts); ``RUN_DIR/slurm`` is shared by every submission into it."""


def submit_slurm(specs: list[RunSpec], res: Resources, folder: Path, max_requeues: int) -> list[str]:
    """Submit the runs (one job, or one array for several) and record them; returns job ids.
    Raises :class:`SubmitError` when sbatch refuses, leaving ``folder`` as it was."""
    from submitit.core.utils import FailedJobError

    from launch.slurm.task import TrainTask

    existed = folder.is_dir()
    ex = make_executor(folder, res, max_requeues)
    tasks = [TrainTask(s.cfg, max_requeues=max_requeues) for s in specs]
    before = set(folder.iterdir()) if existed else set()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error, then raises it
            if len(tasks) == 1:
                submitted = [ex.submit(tasks[0])]
            else:
                with ex.batch():
                    submitted = [ex.submit(t) for t in tasks]
    except FailedJobError as e:
        for left in set(folder.iterdir()) - before:  # the submission script and pickles of a job that never was
            if SUBMITIT_TEMPORARY.search(left.name):  # another submission's job files, named by their ids, stay
                shutil.rmtree(left) if left.is_dir() and not left.is_symlink() else left.unlink(missing_ok=True)
        if not existed and not any(folder.iterdir()):
            folder.rmdir()
        said = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise SubmitError("; ".join(said) or "sbatch failed without a message") from None
    ids = [str(j.job_id) for j in submitted]
    for spec, jid in zip(specs, ids):
        jobs.record_job(spec.run_dir, jid, "slurm", str(log_path(folder, jid)),
                        nodes=res.nodes, tasks_per_node=res.tasks_per_node)
    return ids
