"""The cores a process may use are its affinity mask, not the node's: a SLURM job (or ``taskset``)
that grants one core of a larger node must get one thread per rank from the local launcher, not
one per core of the node (oversubscription slows every rank and the node's other jobs)."""

from __future__ import annotations

import os

import pytest

from launch.train_local import rank_environment
from masan.host import usable_cores

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks on this OS")


@pytest.fixture
def one_core(monkeypatch):
    """This process restricted to its first allowed core (as a one-core job's share), restored after."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    os.sched_setaffinity(0, allowed)


def test_usable_cores_is_the_affinity_mask(one_core):
    assert usable_cores() == len(os.sched_getaffinity(0)) == 1


def test_ranks_share_the_granted_cores_not_the_nodes(one_core, monkeypatch):
    if os.cpu_count() < 2:
        pytest.skip("a one-core node cannot tell its share from the node")
    assert rank_environment(rank=0, nproc=1, port=29500)["OMP_NUM_THREADS"] == "1"
    env = rank_environment(rank=1, nproc=2, port=29500)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", "29500")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_environment(rank=0, nproc=2, port=29500)["OMP_NUM_THREADS"] == "3"  # the user's choice stands


def test_ranks_split_every_granted_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert rank_environment(rank=0, nproc=1, port=29500)["OMP_NUM_THREADS"] == str(cores)
    assert rank_environment(rank=0, nproc=cores + 1, port=29500)["OMP_NUM_THREADS"] == "1"
