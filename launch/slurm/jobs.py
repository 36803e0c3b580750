"""SLURM job states without sacct, and the run directory's record of its jobs.

Many clusters (and the local test cluster, which has no slurmdbd) have no working ``sacct``,
so a job's state is read from ``squeue`` while it is queued or running, then from
``scontrol show job`` (finished jobs stay there for ``MinJobAge`` seconds, 300 by default),
then from ``sacct`` when it exists, and is ``UNKNOWN`` otherwise: callers then look at the
run directory (``DONE``) to tell how the run ended.

``run_dir/jobs.json`` lists every job submitted for a run directory (SLURM job ids, or the pid
of a local run) and the events of those jobs (requeues, restarts; a local run's exit status,
which no scheduler keeps). It is what stops a second submission while a job for the same run
directory is still pending or running.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from masan.files import atomic_write_json
from masan.host import FLOCK_UNSUPPORTED, pid_alive
from masan.rundir import RunDir

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 30
"""Seconds a SLURM query (sinfo, squeue, sacct, scontrol) may take: a controller that is down
or overloaded must not hang a submission or a status table."""

# States in which a job still holds (or will hold) its run directory.
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED",
})
# Ends that a resubmission can cure (a crash, a lost node, an exhausted requeue budget).
RESTARTABLE_STATES = frozenset({
    "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "TIMEOUT", "PREEMPTED", "DEADLINE",
})
UNKNOWN = "UNKNOWN"
REFUSED = "refused"
"""jobs.json event of a job whose training refused to start (see :func:`refusal`)."""
LOCAL_RUNNING, LOCAL_ENDED = "RUNNING (local)", "ended (local)"
"""The state of a local run's job: its process lives, or not."""
EXITED = "exited"
"""jobs.json event of a local run that ended, with its exit status ``code`` (negative: killed by
that signal); launch/status.py reads it back, as SLURM's state says how a SLURM job ended."""
EXIT_FAILED = 1
"""Exit status of the submitting command when a run did not finish (it may be resumed)."""
EXIT_REFUSED = 2
"""Exit status of bad input (arguments, config, a refused resume), never restarted: the
submitting command's, and a training task's whose run refused to start."""
REQUEUES_SPENT = "requeue_budget_exhausted"
"""jobs.json event of a job that stopped with a checkpoint at a time limit or preemption and was
not requeued: its --max-requeues were used up (SLURM then shows it COMPLETED)."""
DIVERGED = "diverged"
"""jobs.json event of a job whose training diverged (:class:`masan.train.gradients.Diverged`)."""
EXIT_DIVERGED = 3
"""Exit status of a training that diverged, never restarted: resumed from its last checkpoint,
it would take the same steps and diverge again."""


def query(cmd: list[str]) -> subprocess.CompletedProcess | None:
    """Run a SLURM query (output captured as text); None when the command is missing or the
    controller did not answer within :data:`QUERY_TIMEOUT_S`."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None


def slurm_available() -> tuple[bool, str]:
    """(True, "") when sbatch exists and the controller answers; else (False, why)."""
    if shutil.which("sbatch") is None:
        return False, "sbatch was not found on PATH"
    res = query(["sinfo", "-h", "-o", "%P"])
    if res is None or res.returncode != 0:
        detail = (res.stderr.strip() if res is not None else "no answer") or "no answer"
        return False, f"the SLURM controller did not answer sinfo ({detail})"
    return True, ""


def _state_word(text: str) -> str:
    # "CANCELLED by 0" -> CANCELLED; "RUNNING" -> RUNNING
    return text.strip().split()[0].upper() if text.strip() else ""


def job_state(job_id: str) -> str:
    """State of one job or array task ("123" or "123_4"): PENDING, RUNNING, COMPLETED, ...

    Tries squeue, scontrol, then sacct; returns ``UNKNOWN`` when none knows the job.
    """
    res = query(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T"])
    if res is not None and res.returncode == 0:
        for line in res.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid.strip() == job_id and state.strip():
                return _state_word(state)
    res = query(["scontrol", "show", "job", "-o", job_id])
    if res is not None and res.returncode == 0:
        fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
        if fields.get("JobState"):
            return _state_word(fields["JobState"])
    res = query(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"])
    if res is not None and res.returncode == 0:
        for line in res.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid.strip() == job_id and state.strip():
                return _state_word(state)
    return UNKNOWN


def job_field(job_id: str, name: str) -> str | None:
    """One ``scontrol show job`` field (e.g. ``Restarts``, ``Reason``), None when unknown."""
    res = query(["scontrol", "show", "job", "-o", job_id])
    if res is None or res.returncode != 0:
        return None
    fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
    return fields.get(name)


def requeue(job_id: str) -> None:
    """``scontrol requeue`` this job (from inside it, after the stop checkpoint is complete)."""
    res = query(["scontrol", "requeue", job_id])
    if res is None or res.returncode != 0:
        why = res.stderr.strip() if res is not None else "scontrol not found or no answer"
        raise RuntimeError(f"scontrol requeue {job_id} failed: {why}")


def node_address(node: str) -> str:
    """An address for ``node`` that resolves: itself, else its SLURM ``NodeAddr``.

    SLURM node names need not be host names (several slurmd on one host, or clusters whose
    node names are not in DNS); the rendezvous (MASTER_ADDR) needs a reachable address.
    """
    try:
        socket.getaddrinfo(node, None)
        return node
    except socket.gaierror:
        pass
    res = query(["scontrol", "show", "node", "-o", node])
    if res is not None and res.returncode == 0:
        fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
        if fields.get("NodeAddr"):
            return fields["NodeAddr"]
    raise RuntimeError(f"cannot resolve node {node!r} for MASTER_ADDR: not in DNS and no NodeAddr in scontrol")


# --------------------------------------------------------------------------- jobs.json


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


_HELD: set[Path] = set()
"""jobs.json locks this process holds: taken again inside, they are not waited for (a flock on a
second open file would wait for the first forever)."""


@contextlib.contextmanager
def _record_lock(run_dir: Path):
    """The exclusive lock of run_dir/jobs.json (run_dir created if missing); reentrant."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).jobs_lock.resolve()
    if path in _HELD:
        yield
        return
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            log.warning("the file system of %s cannot lock files (flock: %s): jobs.json is written WITHOUT its "
                        "lock, so two submissions into this run directory at once could both pass the busy check; "
                        "submit each run directory once at a time (or mount with flock)", run_dir, e.strerror)
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)


@contextlib.contextmanager
def submitting(run_dirs):
    """Hold the jobs.json locks of ``run_dirs`` while a submission checks that none has a live
    job, submits and records its jobs: two submissions into one run directory at once cannot
    both pass the check. Taken in sorted order: two submissions never each hold a lock the other
    waits for."""
    with contextlib.ExitStack() as held:
        for run_dir in sorted({Path(d).resolve() for d in run_dirs}):
            held.enter_context(_record_lock(run_dir))
        yield


@contextlib.contextmanager
def _locked_record(run_dir: Path):
    """Read-modify-write of run_dir/jobs.json under an exclusive file lock."""
    with _record_lock(run_dir):
        record = read_record(run_dir)
        yield record
        atomic_write_json(RunDir(run_dir).jobs, record)


class RecordError(ValueError):
    """A run's jobs.json is damaged; the message names it and the fix, ``why`` the damage."""

    def __init__(self, path: Path, why: str):
        self.why = why
        super().__init__(f"{path} is damaged: {why}; it only lists the run's past jobs: move it aside "
                         f"(mv {path} {path}.bad), check with `squeue -u $USER` that no job of this run is "
                         "still running, and submit again")


def read_record(run_dir: str | Path) -> dict:
    """The run directory's jobs.json as a dict (empty lists when absent); RecordError when it is
    not the JSON record this module writes."""
    path = RunDir(run_dir).jobs
    if not path.exists():
        return {"jobs": [], "events": []}
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        record, why = None, f"not JSON ({e})"
    else:
        why = "not the record launch/submit.py writes"
    if not (isinstance(record, dict) and isinstance(record.get("jobs"), list)
            and isinstance(record.get("events"), list)):
        raise RecordError(path, why)
    return record


def record_job(run_dir: str | Path, job_id: str, kind: str, log: str, **extra) -> None:
    """Add a submitted job (kind ``slurm``) or a local run (kind ``local``, job_id = pid)."""
    with _locked_record(Path(run_dir)) as rec:
        rec["jobs"].append({"job_id": str(job_id), "kind": kind, "host": socket.gethostname(),
                            "submitted": _now(), "log": log, **extra})


def record_event(run_dir: str | Path, job_id: str, event: str, **extra) -> None:
    """Append an event (``started``, ``requeued``, ``restarted``, ...) to jobs.json."""
    with _locked_record(Path(run_dir)) as rec:
        rec["events"].append({"time": _now(), "job_id": str(job_id), "event": event, **extra})
        if event == EXITED:  # on the job too: its pid may be another process's by the time anyone asks
            for job in rec["jobs"]:
                if job["job_id"] == str(job_id) and job["kind"] == "local":
                    job["exited"] = extra.get("code")


def record_restart(run_dir: str | Path, job_id: str, after: str, restart: int, **why) -> None:
    """Record that job ``job_id`` (a resubmission, or a local run started again) restarts the
    crashed job ``after``, the ``restart``-th time; launch/status.py counts these."""
    record_event(run_dir, job_id, "restarted", after=str(after), restart=restart, **why)


def local_exit(record: dict, job_id: str) -> int | None:
    """The exit status that ``record`` (:func:`read_record`) holds for local run ``job_id``
    (see :data:`EXITED`), or None."""
    for event in reversed(record["events"]):
        if event.get("job_id") == str(job_id) and event.get("event") == EXITED:
            return event.get("code")
    return None


def exit_text(code: int) -> str:
    """How a local run ended, from its exit status (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def final_end(record: dict, job_id: str) -> tuple[str, str] | None:
    """(event, error) when ``record`` (:func:`read_record`) says job ``job_id`` ended in a way a
    resubmission would meet again, as its rank 0 recorded it: ``refused`` (a config or resume
    error) or ``diverged``; else None."""
    for event in reversed(record["events"]):
        if event.get("job_id") == str(job_id) and event.get("event") in (REFUSED, DIVERGED):
            return event["event"], event.get("error", "(no reason recorded)")
    return None


def _local_alive(job: dict) -> bool:
    """Whether a local run's process still runs: not recorded as exited, and its pid alive on
    this host (a pid alone is reused: a finished run looked alive, and submit.py refused it)."""
    if "exited" in job or job.get("host") != socket.gethostname():
        return False  # cannot tell from here; a local run elsewhere does not block
    try:
        return pid_alive(int(job["job_id"]))  # another user's counts: a group member's run in a shared folder
    except (OSError, ValueError):
        return False


def active_jobs(run_dir: str | Path) -> list[tuple[str, str]]:
    """(job id, state) of this run directory's jobs that are still pending or running."""
    out = []
    for job in read_record(run_dir)["jobs"]:
        if job["kind"] == "local":
            if _local_alive(job):
                out.append((job["job_id"], LOCAL_RUNNING))
            continue
        state = job_state(job["job_id"])
        if state in ACTIVE_STATES:
            out.append((job["job_id"], state))
    return out


def detect_gpus_per_node(partition: str | None = None) -> int:
    """GPUs per node of a partition from sinfo's GRES (``gpu:8``, ``gpu:a100:4(S:0-1)``); 0 if none.

    When the partition mixes node types, the largest count is taken; pass --gpus-per-node
    to choose.
    """
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    res = query(cmd)
    if res is None or res.returncode != 0:
        return 0
    return max([0] + [gres_gpus(line) for line in res.stdout.split()])


def gres_gpus(gres: str) -> int:
    """GPUs per node in a GRES list: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``(null)`` -> 8, 4, 0
    (commas inside parentheses, e.g. a socket list, do not split the list)."""
    for item in re.split(r",(?![^(]*\))", gres):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            return int(parts[-1])
    return 0
