"""Whether a job can ever start on the partition it asks for, from ``sinfo``.

SLURM accepts a job larger than its partition allows (unless the cluster enforces partition
limits at submission) and keeps it PENDING forever (reason PartitionNodeLimit or
PartitionTimeLimit); :func:`check_partition` says so before submitting, with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launch.slurm import jobs
from launch.slurm.plan import Resources, parse_time_min, time_text

SINFO_FORMAT = "%P|%D|%G|%l|%s|%T"
"""One sinfo line per group of a partition's nodes alike in GRES and state: partition (``*``:
the default), node count, GRES, time limit, job size limit in nodes, state."""
UP_STATES = frozenset({"idle", "mixed", "allocated", "completing", "reserved", "planned", "blocked"})
"""Node states that can take a job now (or once the jobs on them end); the others (down,
drained, future, ...) may come back."""


@dataclass(frozen=True)
class NodeGroup:
    """One sinfo line (:data:`SINFO_FORMAT`)."""

    partition: str
    default: bool
    nodes: int
    gpus: int
    """GPUs per node (GRES ``gpu:N`` or ``gpu:type:N``)."""
    time_limit_min: int | None
    """None: no limit."""
    max_job_nodes: int | None
    """The largest job in nodes the partition accepts; None: no limit."""
    up: bool


def _limit(text: str, parse) -> int | None:
    text = text.strip().lower()
    return None if text in ("infinite", "unlimited", "n/a", "") else parse(text)


def parse_sinfo(text: str) -> list[NodeGroup]:
    """``sinfo -h -o SINFO_FORMAT`` output -> node groups (unparsable lines are left out)."""
    groups = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 6 or not fields[1].strip().isdigit():
            continue
        part, count, gres, time_limit, size, state = (f.strip() for f in fields)
        try:
            limit_min = _limit(time_limit, parse_time_min)
            max_nodes = _limit(size.rpartition("-")[2], int)
        except ValueError:
            continue
        groups.append(NodeGroup(part.rstrip("*"), part.endswith("*"), int(count), jobs.gres_gpus(gres), limit_min,
                                max_nodes, re.split(r"[^a-z_]", state.lower())[0] in UP_STATES))
    return groups


def partition_fit(groups: list[NodeGroup], res: Resources) -> tuple[list[str], list[str]]:
    """(why a job of ``res`` can never start on the partition(s) it asks for, each with the fix;
    warnings for one that waits until nodes come back). SLURM accepts such a job unless the
    cluster enforces partition limits at submission, and it then stays PENDING forever.

    --partition may list several (``a,b``): the job fits when one of them fits. Without it the
    default partition is checked; with none known, nothing is. --constraint and --exclude are
    left to SLURM (it refuses what no node matches at submission).
    """
    names = res.partition.split(",") if res.partition else sorted({g.partition for g in groups if g.default})
    known = sorted({g.partition for g in groups})
    problems: list[str] = []
    for name in names:
        mine = [g for g in groups if g.partition == name]
        if not mine:
            problems.append(f"partition {name!r} does not exist (sinfo lists {', '.join(known) or 'none'}); "
                            f"use --partition with one of those")
            continue
        why, waits = _fit(name, mine, res)
        if not why:
            return [], waits
        problems += why
    return problems, []


def _fit(name: str, groups: list[NodeGroup], res: Resources) -> tuple[list[str], list[str]]:
    """:func:`partition_fit` of one partition."""
    why = []
    limit = max((g.time_limit_min for g in groups), key=lambda t: float("inf") if t is None else t)
    if limit is not None and res.time_min > limit:
        why.append(f"--time {time_text(res.time_min)} is above partition {name}'s time limit "
                   f"{time_text(limit)}; use --time {time_text(limit)} or less")
    max_nodes = groups[0].max_job_nodes
    if max_nodes is not None and res.nodes > max_nodes:
        why.append(f"--nodes {res.nodes} is above partition {name}'s limit of {max_nodes} node(s) per job; "
                   f"use --nodes {max_nodes} or less")
    most_gpus = max(g.gpus for g in groups)
    fitting = [g for g in groups if g.gpus >= res.gpus_per_node]
    total, up = sum(g.nodes for g in fitting), sum(g.nodes for g in fitting if g.up)
    gpus = f" with {res.gpus_per_node} GPU(s) each" if res.gpus_per_node else ""
    if res.gpus_per_node > most_gpus:
        why.append(f"--gpus-per-node {res.gpus_per_node}: partition {name}'s nodes have at most {most_gpus} "
                   f"GPU(s); use --gpus-per-node {most_gpus} or less (one rank per GPU) and more --nodes")
    elif res.nodes > total:
        why.append(f"--nodes {res.nodes}: partition {name} has {total} node(s){gpus} in all; use --nodes "
                   f"{total} or less")
    if why:
        return why, []
    if res.nodes > up:
        return [], [f"partition {name} has {total} node(s){gpus} but only {up} can take jobs now (the others "
                    f"are down, drained or not yet there: sinfo -p {name}); the job waits until {res.nodes} can"]
    return [], []


def check_partition(res: Resources) -> tuple[list[str], list[str]]:
    """:func:`partition_fit` on this cluster's sinfo; nothing to say when sinfo does not answer."""
    out = jobs.query(["sinfo", "-h", "-a", "-o", SINFO_FORMAT])
    if out is None or out.returncode != 0:
        return [], []
    return partition_fit(parse_sinfo(out.stdout), res)
