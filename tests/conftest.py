"""Shared fixtures: the local SLURM cluster, and a tiny real cohort + config for launcher tests.

The cluster is a real one (Debian's slurm-wlm + munge, two ``slurmd -N nodeX`` on loopback),
started once per session by ``hpc/local_cluster.sh`` when the tests run as root (it installs
the packages on first use) and stopped at the end if this session started it. Without root
and without an answering local cluster, the SLURM tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

CLUSTER_SCRIPT = REPO / "hpc" / "local_cluster.sh"
LOCAL_CLUSTER_NAME = "masan-local"
CLUSTER_START_TIMEOUT_S = 900  # includes the one-time apt-get install
PASSAGE = 0o011
"""Group and other may enter (not list) the tests' temporary folders."""

# The smallest model and data the real training path accepts (hpc/configs/tiny.yaml: T1 32^3 in
# 2x2x2 patches, fMRI 6 frames of 16^3), two classes, five subjects each: a few seconds per epoch
# on a core.
TINY_YAML = REPO / "hpc" / "configs" / "tiny.yaml"
TINY_CONFIG = {
    **yaml.safe_load(TINY_YAML.read_text()),
    "train": {"pretrain_epochs": 1, "joint_epochs": 2, "precision": "fp32", "device": "cpu"},
    "checkpoint": {"every_steps": 20, "every_minutes": 0},
    "log": {"every_steps": 5, "eval_every_epochs": 100},
}


@pytest.fixture(scope="session", autouse=True)
def reachable_tmp(tmp_path_factory) -> None:
    """Let everyone pass through (x, not list) pytest's temporary folders, which it makes 0700:
    every folder on the way to a source limits who may read what the tools write from it
    (masan.access), so each test's data would count as its owner's alone. Tests that close a
    folder on the way do so themselves; pytest closes its root folder again at its next start."""
    base = tmp_path_factory.getbasetemp()
    for folder in (base, base.parent):
        folder.chmod(folder.stat().st_mode | PASSAGE)
    made = tmp_path_factory.mktemp

    def mktemp(basename: str, numbered: bool = True) -> Path:  # also tmp_path's maker
        path = made(basename, numbered)
        path.chmod(path.stat().st_mode | PASSAGE)
        return path

    tmp_path_factory.mktemp = mktemp


def _cluster_name() -> str | None:
    if shutil.which("scontrol") is None:
        return None
    res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        return None
    for line in res.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local SLURM cluster with nodes node1 and node2 (started here when needed)."""
    name = _cluster_name()
    if name is not None and name != LOCAL_CLUSTER_NAME:
        pytest.skip(f"SLURM here is cluster {name!r}, not the local test cluster: not submitting test jobs to it")
    if name is None and os.geteuid() != 0:
        pytest.skip("no local SLURM cluster answers, and starting one (bash hpc/local_cluster.sh start) needs root")
    res = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True,
                         timeout=CLUSTER_START_TIMEOUT_S, check=False)
    if res.returncode != 0:
        pytest.fail(f"hpc/local_cluster.sh start failed:\n{res.stdout}\n{res.stderr}")
    yield
    if name is None:  # this session started it
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A converted Zarr cohort: 5 NC + 5 AD phantom subjects (real NIfTI -> real store)."""
    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    root = tmp_path_factory.mktemp("cohort")
    bids = synthesize_cohort(root / "bids", n_per_class=5, classes=("NC", "AD"), frames=6)
    store = root / "cohort.zarr"
    report = convert_cohort(discover_bids(bids), store, ConvertOptions(patch_grid=(2, 2, 2)),
                            classes=("NC", "AD"), progress=False)
    assert not report.failed, report.failed
    return store


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, tiny_store) -> Path:
    """YAML run config for the tiny cohort (override epochs etc. on the command line)."""
    cfg = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "store": str(tiny_store)}}
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SECOND_USER = "masan-reader"
"""A user of its own group, created when missing: what another user of a cluster may do."""


def second_user() -> tuple[int, int]:
    """(uid, gid) of :data:`SECOND_USER` (root only: created with useradd when missing)."""
    import pwd

    if subprocess.run(["id", SECOND_USER], capture_output=True, check=False).returncode != 0:
        res = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SECOND_USER],
                             capture_output=True, text=True, check=False)
        assert res.returncode in (0, 9), res.stderr  # 9: created meanwhile by another test
    pw = pwd.getpwnam(SECOND_USER)
    return pw.pw_uid, pw.pw_gid


def as_second_user(fn, groups: tuple[int, ...] = ()) -> tuple[int, str]:
    """(exit code, output) of ``fn()`` (returning an exit code) run as :func:`second_user`, also
    a member of ``groups``: as root, in a forked child that drops to that user. The interpreter
    lives where that user may not look, so the child keeps the modules this process imported:
    import what ``fn`` needs first. An exception in the child comes back as its traceback."""
    import contextlib
    import io

    uid, gid = second_user()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = fn()
            os.write(write_end, out.getvalue().encode())
        except BaseException:  # noqa: BLE001 - report anything to the parent, which fails the test
            import traceback

            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    _, wait = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait), text
