"""What SLURM says about a job now, without sacct: squeue's state and a pending job's reason
(:func:`squeue_states`, one call for every job), the reasons a job can never start as
submitted (:func:`never_starts`), and the result file submitit writes when a job ends
(:func:`submitit_result`); :func:`slurm_state` puts them together for one jobs.json job.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

from launch.slurm import jobs


class Queued(NamedTuple):
    """A job as squeue lists it: its state and SLURM's reason (``None`` when it has none)."""

    state: str
    reason: str = "None"


NEVER_STARTS = {
    "PartitionNodeLimit": "it asks for more nodes than the partition has or allows; submit again with fewer --nodes "
                          "(sinfo -o '%P %D %s' shows each partition's nodes and per-job limit)",
    "PartitionTimeLimit": "its time limit is above the partition's; submit again with a shorter --time "
                          "(sinfo -o '%P %l' shows each partition's limit)",
    "BadConstraints": "no node of the partition has what it asks for (--constraint, --gpus-per-node, --mem); "
                      "submit again with what its nodes have (sinfo -o '%P %G %m %f')",
}
"""Pending reasons that the job itself causes: it waits forever as submitted (SLURM does not
refuse such a job unless the cluster sets EnforcePartLimits)."""


def never_starts(reason: str | None) -> str | None:
    """Why a job pending for ``reason`` can never start, with the fix; None for a wait that ends
    (Priority, Resources, a node coming back ...)."""
    if reason is None:
        return None
    if reason in NEVER_STARTS:
        return NEVER_STARTS[reason]
    if "PerJob" in reason:  # QOSMaxNodePerJobLimit, AssocMaxWallDurationPerJobLimit, ...
        return ("it exceeds a per-job limit of its QOS or account; submit again within the limit "
                "(sacctmgr show qos / show assoc list them)")
    return None


def squeue_states() -> dict[str, Queued] | None:
    """Job id (array tasks as ``123_4``) -> state and reason of every job squeue lists; None when
    there is no squeue or the controller does not answer (then scontrol would not either)."""
    res = jobs.query(["squeue", "-h", "-r", "-o", "%i|%T|%r"])
    if res is None or res.returncode != 0:
        return None
    out = {}
    for line in res.stdout.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if state.strip():
            out[jid.strip()] = Queued(state.strip().split()[0], reason.strip() or "None")
    return out


class _Opaque:
    """Stands in for every class in a submitit result pickle: only its tag is read, so nothing
    is imported (a success holds masan's TrainOutcome, whose module loads torch) or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _TagOnly(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: ARG002 - pickle.Unpickler.find_class signature
        return _Opaque


def submitit_result(log: str | None) -> str | None:
    """COMPLETED or FAILED from the ``<job>_0_result.pkl`` submitit writes beside the job's
    ``<job>_0_log.out`` when the job's function returned or raised; None when there is none."""
    if not log or not log.endswith("_log.out"):
        return None
    path = Path(log[: -len("_log.out")] + "_result.pkl")
    try:
        with open(path, "rb") as f:
            tag = _TagOnly(f).load()[0]
    except (OSError, pickle.UnpicklingError, EOFError, IndexError, TypeError, KeyError):
        return None
    return {"success": "COMPLETED", "error": "FAILED"}.get(tag)


def slurm_state(job: dict, queued: dict[str, Queued] | None) -> str:
    """State of one jobs.json job: squeue (``queued``, None: SLURM does not answer), then
    scontrol (finished jobs stay there MinJobAge seconds), then submitit's result file; local
    runs by their process."""
    if job["kind"] == "local":
        # the same liveness test submit.py's refusal uses (its pid on this host)
        return jobs.LOCAL_RUNNING if jobs._local_alive(job) else jobs.LOCAL_ENDED
    jid = job["job_id"]
    if queued is not None and jid in queued:
        return queued[jid].state
    state = jobs.job_field(jid, "JobState") if queued is not None else None
    return state or submitit_result(job.get("log")) or (jobs.UNKNOWN if queued is not None else "UNKNOWN (no SLURM)")
