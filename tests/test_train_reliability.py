"""Training that loses nothing and changes nothing it refuses (issue 12, training half).

Real runs (launch/train_local.py, DeepSpeed on the CPU, gloo ranks in separate processes) on
the session's tiny cohort, copied into a store readable by its owner only:

- the run directory of such a store is closed to other users (checked as a second,
  unprivileged user with ``runuser``), predictions.csv included;
- a refused start (incompatible checkpoint, a batch the cohort cannot fill) leaves the run
  directory byte for byte as it was (content, modes and mtimes of every path);
- checkpoint files damaged in place (same size) are found by their checksums: a damaged
  ZeRO shard seen by rank 1 only and a damaged model file seen by rank 0 only make both
  ranks fall back together, with a 1-minute collective timeout;
- a read-only checkpoint folder is refused at start, naming it; bad values exit 2 naming the
  key; ``submit.py`` refuses nonsensical resources.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from disks import resize, small_disk
from masan.access import apply_access
from masan.train.checkpoint import CheckpointManager
from test_train_run import LAUNCH, REPO, TRAIN_CONFIG, launch, manifests, ok

OTHER_USER = "masan-reader"
TWO_RANK_STEPS = 4
"""Steps of the two-rank run: checkpoints every step, the newest 3 kept (steps 2, 3, 4)."""


def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: checking what another user can read needs a second user (runuser)")


def other_user() -> str:
    """An unprivileged second user (created when missing)."""
    _as_root()
    if subprocess.run(["id", OTHER_USER], capture_output=True, check=False).returncode != 0:
        res = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                             capture_output=True, text=True, check=False)
        assert res.returncode in (0, 9), res.stderr  # 9: created meanwhile by another test
    return OTHER_USER


def as_other(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", other_user(), "--", *cmd], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def shared_dir():
    """A folder every user may enter (not pytest's root-only tmp), so only the modes of what
    the run writes decide what another user can read."""
    d = Path(tempfile.mkdtemp(prefix="masan-reliability-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def config(shared_dir, tiny_store) -> Path:
    """The tiny training config on a copy of the cohort readable by its owner only."""
    store = shared_dir / "closed.zarr"
    shutil.copytree(tiny_store, store)
    apply_access(store, 0o600)
    path = shared_dir / "train.yaml"
    path.write_text(yaml.safe_dump({**TRAIN_CONFIG, "data": {**TRAIN_CONFIG["data"], "store": str(store)},
                                    "log": {**TRAIN_CONFIG["log"], "eval_every_epochs": 0}}))
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def two_rank_run(shared_dir, config) -> Path:
    run = shared_dir / "run"
    ok(launch(config, run, f"train.max_steps={TWO_RANK_STEPS}", "checkpoint.every_steps=1", nproc=2), "max_steps")
    return run


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: (mode, mtime_ns, sha256 of a file's bytes)."""
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


def damage_in_place(path: Path) -> None:
    """Invert 4 KiB in the middle of a file: same size, different bytes."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        block = f.read(4096)
        f.seek(path.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in block))


def log_time(log: str, fragment: str) -> datetime:
    line = next(line for line in log.splitlines() if fragment in line)
    return datetime.strptime(re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", line).group(1), "%Y-%m-%d %H:%M:%S,%f")


@pytest.mark.slow  # real training runs
def test_run_directory_is_no_more_open_than_its_store(two_rank_run):
    reader = other_user()
    open_paths = [p for p in [two_rank_run, *two_rank_run.rglob("*")] if p.lstat().st_mode & 0o077]
    assert not open_paths, f"readable by group/others: {open_paths[:5]}"
    predictions = two_rank_run / "predictions.csv"
    assert predictions.is_file()
    denied = as_other("cat", str(predictions))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, (reader, denied.stdout[:200])
    listing = as_other("ls", str(two_rank_run / "checkpoints"))
    assert listing.returncode != 0
    control = two_rank_run.parent / "readable.txt"  # the same user reads what is meant to be shared
    control.write_text("shared\n")
    control.chmod(0o644)
    assert as_other("cat", str(control)).stdout == "shared\n"


@pytest.mark.slow  # a real training run
def test_what_submit_writes_is_no_more_open_than_the_store(shared_dir, config):
    """launch/submit.py's own files (jobs.json, the sweep folders it creates) under the usual
    umask 022: as closed as the store, like the run's (they used to be 644/755)."""
    base = shared_dir / "submitted"
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--local", "--config", str(config),
                          "--run-dir", str(base / "sweep"), "--repeats", "2", "train.max_steps=1"],
                         capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
                         preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (base / "sweep" / "repeat_1" / "jobs.json").is_file()
    open_paths = [p for p in (base / "sweep", *(base / "sweep").rglob("*")) if p.lstat().st_mode & 0o077]
    assert not open_paths, f"readable by group/others: {open_paths[:5]}"


@pytest.mark.slow  # real training runs
def test_refused_start_leaves_the_run_directory_as_it_was(tmp_path, shared_dir, config, two_rank_run):
    run = shared_dir / "refused"
    shutil.copytree(two_rank_run, run)  # copy2: contents, modes and mtimes
    before = snapshot(run)
    assert (run / "DONE").is_file()

    res = launch(config, run, f"train.max_steps={TWO_RANK_STEPS}", "optim.lr=0.005")
    assert res.returncode == 2, res.log[-3000:]
    assert "optim.lr: 0.001 -> 0.005" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert snapshot(run) == before, "a refused resume changed the run directory"

    # checked against the cohort: 8 samples per step, 7 training subjects in split.json
    res = launch(config, run, f"train.max_steps={TWO_RANK_STEPS}", "optim.micro_batch=8")
    assert res.returncode == 2, res.log[-3000:]
    assert "optim.micro_batch=8" in res.stderr and "7 subjects" in res.stderr, res.stderr[-3000:]
    assert snapshot(run) == before

    fresh = tmp_path / "fresh"  # a new run refused before its directory exists
    res = launch(config, fresh, "optim.micro_batch=8")
    assert res.returncode == 2 and "optim.micro_batch=8" in res.stderr, res.log[-3000:]
    assert not fresh.exists()


@pytest.mark.slow  # real training runs
def test_damage_seen_by_one_rank_makes_both_fall_back_together(shared_dir, config, two_rank_run):
    run = shared_dir / "damaged"
    shutil.copytree(two_rank_run, run)
    mgr = CheckpointManager(run, keep=100)
    newest, second, third = mgr.complete_tags()[:3]
    shard = run / "checkpoints" / newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    model = run / "checkpoints" / second / "mp_rank_00_model_states.pt"
    damage_in_place(shard)  # only rank 1 loads (and verifies) its shard
    damage_in_place(model)  # only rank 0 verifies the shared model file
    assert mgr.problem(newest) is None and mgr.problem(second) is None  # sizes alone do not tell

    # a rank left waiting in a collective would fail the run after 1 minute
    res = launch(config, run, f"train.max_steps={TWO_RANK_STEPS + 1}", "checkpoint.every_steps=1",
                 "train.dist_timeout_minutes=1", nproc=2)
    log = ok(res, "max_steps")
    assert re.search(rf"skipping damaged checkpoint {run / 'checkpoints' / newest}: rank 1: file {shard.name} has "
                     r"sha256 \w+\.\.\., the manifest says", log), log[-4000:]
    assert f"skipping damaged checkpoint {run / 'checkpoints' / second}: rank 0: file {model.name}" in log
    assert f"resumed {third}" in log
    took = log_time(log, f"resumed {third}") - log_time(log, f"skipping damaged checkpoint {run / 'checkpoints'}")
    assert took.total_seconds() < 60, took
    assert manifests(run)[-1]["step"] == TWO_RANK_STEPS + 1


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only for this process: a read-only bind mount as root (root ignores
    mode bits), mode 555 otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield
        folder.chmod(0o755)
        return
    res = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here ({res.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_checkpoint_folder_is_refused_at_start(tmp_path, config):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with read_only(run / "checkpoints"):
        res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(config), f"run_dir={run}"],
                             capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"{run / 'checkpoints'} is on a read-only file system" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_a_full_checkpoint_disk_stops_the_run_in_one_line_and_a_rerun_resumes(tmp_path, config):
    """Torch reports a full disk as a RuntimeError about zip stream positions: the run said
    neither disk nor fix, left its cut-short save taking the space, and exit 1 spent a restart."""
    run = tmp_path / "run"
    with small_disk(run / "checkpoints", "96k"):
        res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(config), f"run_dir={run}",
                              "train.max_steps=2", "checkpoint.every_steps=1"],
                             capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
        assert "no space left on the device writing" in res.stderr and "run the same command again to resume" \
            in res.stderr, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        resize(run / "checkpoints", "64m")
        ok(launch(config, run, "train.max_steps=2", "checkpoint.every_steps=1"), "max_steps")
        assert not list((run / "checkpoints").glob("*.saving"))  # the cut-short save was removed at the start


def test_a_small_dev_shm_is_one_line_naming_num_workers(tmp_path, config):
    """Containers often give 64 MB of /dev/shm, where loader workers hand batches over: torch's
    own error named neither the setting nor the fix."""
    if os.geteuid() != 0:
        pytest.skip("a private /dev/shm needs root")
    script = (f"mount -t tmpfs -o size=64k tmpfs /dev/shm && exec {sys.executable} {LAUNCH} --config {config} "
              f"run_dir={tmp_path / 'run'} data.num_workers=1 data.cache=none train.max_steps=2")
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], capture_output=True,
                         text=True, timeout=300, cwd=REPO, check=False)
    if "mount:" in res.stderr or "unshare:" in res.stderr:
        pytest.skip(f"cannot give a process its own /dev/shm here ({res.stderr.strip()[:200]})")
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "data.num_workers=0" in res.stderr and "/dev/shm" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def test_a_bad_value_exits_2_naming_the_key(tmp_path, config):
    """(every rule: tests/test_config.py)"""
    res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(config), f"run_dir={tmp_path / 'run'}",
                          "split.test_fraction=1.5"], capture_output=True, text=True, timeout=120, cwd=REPO,
                         check=False)
    assert res.returncode == 2 and "split.test_fraction=1.5" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, fragment", [
    ("data.store={tmp}/nope.zarr", "data.store={tmp}/nope.zarr: cohort store {tmp}/nope.zarr does not exist; run "),
    ("data.store={tmp}/plain", "data.store={tmp}/plain: {tmp}/plain is not a Zarr v3 cohort store"),
    ("run_dir={tmp}/afile", "run_dir {tmp}/afile is a file, not a folder; choose another run_dir="),
    ("run_dir={tmp}/afile/run", "run_dir {tmp}/afile/run lies below {tmp}/afile, which is a file"),
    ("run_dir=", "run_dir='' is out of range; use a folder for the run, e.g. runs/my_run (empty would be the current"),
    # a start would give every file there the store's mode: a home or project folder loses its x bits
    ("run_dir={tmp}/project", "run_dir {tmp}/project is a folder of other files (tool.sh), not a training run"),
    ("run_dir={tmp}/other.zarr/run", "run_dir={tmp}/other.zarr/run is inside the cohort store {tmp}/other.zarr: "),
])
def test_a_start_without_a_store_or_a_run_folder_exits_2_with_the_fix(tmp_path, config, override, fragment):
    """Inputs a restart cannot cure (exit 2: never restarted), refused before anything is written;
    the override given before --config as users type it too."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "tool.sh").write_text("#!/bin/sh\n")
    (tmp_path / "project" / "tool.sh").chmod(0o755)
    fake_store(tmp_path / "other.zarr")
    fill = {"tmp": tmp_path}
    args = [override.format(**fill), "--config", str(config)]
    if not override.startswith("run_dir"):
        args.append(f"run_dir={tmp_path / 'run'}")
    res = subprocess.run([sys.executable, str(LAUNCH), *args], capture_output=True, text=True, timeout=120,
                         cwd=REPO, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert fragment.format(**fill) in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "x"
    tool = tmp_path / "project" / "tool.sh"
    assert sorted(os.listdir(tool.parent)) == ["tool.sh"] and os.access(tool, os.X_OK)
    assert sorted(os.listdir(tmp_path / "other.zarr")) == ["zarr.json"]


def test_a_missing_cache_folder_exits_2_before_the_run_folder_is_made(tmp_path, config):
    res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(config), f"run_dir={tmp_path / 'run'}",
                          "data.cache=host", f"data.cache_dir={tmp_path / 'shm'}"], capture_output=True, text=True,
                         timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"data.cache=host needs data.cache_dir={tmp_path / 'shm'}, which is not a folder" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def fake_store(path: Path) -> Path:
    """A folder the tools take for a cohort store (its root zarr.json names the format)."""
    from masan.store.places import STORE_FORMAT

    path.mkdir()
    (path / "zarr.json").write_text(json.dumps({"attributes": {"masan_store": {"format": STORE_FORMAT}}}))
    return path


def test_a_run_folder_that_holds_its_store_is_refused(tmp_path):
    """to_zarr.py refuses to update a store inside a run directory, so a run_dir above its own
    store would lock the store against its converter."""
    from masan.config import ConfigError, load_config
    from masan.train.run import check_place

    store = fake_store(tmp_path / "cohort.zarr")
    with pytest.raises(ConfigError, match=f"run_dir={tmp_path} holds the run's store data.store={store}"):
        check_place(load_config(None, [f"run_dir={tmp_path}", f"data.store={store}"]))
    check_place(load_config(None, [f"run_dir={tmp_path / 'runs' / 'a'}", f"data.store={store}"]))  # beside it: fine


def test_a_rendezvous_port_in_use_is_refused_before_any_rank_starts(tmp_path, config):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, str(LAUNCH), "--nproc", "2", "--port", str(port), "--config", str(config),
                              f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=REPO,
                             check=False)
    assert res.returncode == 2 and f"--port {port} is in use on this machine" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "0"], "argument --nodes: must be at least 1, got 0"),
    (["--gpus-per-node", "-1"], "argument --gpus-per-node: must be at least 0"),
    (["--poll", "0"], "argument --poll: must be a finite number above 0"),
    (["--repeats", "two"], "argument --repeats: 'two' is not an integer"),
    (["--time", "5", "--signal-delay", "600"], "--signal-delay 600 s is not shorter than --time 5"),
])
def test_submit_refuses_nonsensical_resources(tmp_path, capsys, args, fragment):
    from launch.submit import main

    try:
        code = main(["--local", "--run-dir", str(tmp_path / "run"), *args])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_submit_refuses_a_run_whose_job_record_is_damaged(tmp_path, capsys, tiny_config):
    from launch.submit import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "jobs.json").write_text('{"jobs": [{"job_id": ')  # cut mid-write by a full disk
    assert main(["--local", "--run-dir", str(run), "--config", str(tiny_config)]) == 2
    err = capsys.readouterr().err
    assert "jobs.json is damaged" in err and ".bad" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["jobs.json"]


NOT_ON_THE_NODES = "/nonexistent/node-tmpfs"
"""A data.cache_dir only a node can check: the login node leaves it to the job."""


@pytest.mark.slurm
@pytest.mark.slow
def test_wait_reports_a_refused_run_instead_of_resubmitting_it(slurm_cluster, tiny_config, tmp_path):
    """What only the training node can tell is refused inside the job (here: a data.cache_dir
    that is no folder on the nodes; what the login node can check, e.g. a batch larger than the
    training part or fp16 on nodes without GPUs, is refused before submitting: test_slurm_launch).
    --wait must tell it from a crash: one job, no restart, exit 2 with the reason. Two nodes:
    every rank refuses, and a rank ending first must not stop rank 0 recording why."""
    from test_slurm_launch import events, job_ids, submit

    too_big = submit("--nodes", 2, "--config", tiny_config, "--run-dir", tmp_path / "too_big", "optim.micro_batch=64")
    assert too_big.returncode == 2 and "lower optim.micro_batch" in too_big.stdout, too_big.stdout
    assert not job_ids(tmp_path / "too_big")

    run_dir = tmp_path / "refused"
    res = submit("--nodes", 2, "--time", 5, "--config", tiny_config, "--run-dir", run_dir, "--max-restarts", 1,
                 "data.cache=host", f"data.cache_dir={NOT_ON_THE_NODES}", wait_job=True)
    assert res.returncode == 2 and "run REFUSED" in res.stdout and "is not a folder" in res.stdout, res.stdout
    [jid] = job_ids(run_dir)
    [refused] = events(run_dir, "refused")
    assert refused["job_id"] == jid and f"data.cache_dir={NOT_ON_THE_NODES}" in refused["error"]
    fp16 = submit("--nodes", 2, "--config", tiny_config, "--run-dir", tmp_path / "fp16", "train.precision=fp16")
    assert fp16.returncode == 2 and "needs CUDA" in fp16.stdout and not job_ids(tmp_path / "fp16"), fp16.stdout
    assert not events(run_dir, "restarted")


DIVERGING = "optim.lr=1e30"  # Adam's first steps take every weight to ~1e30: the loss is NaN within two steps


@pytest.mark.slow
def test_a_diverged_local_run_ends_on_every_rank_without_a_restart(tiny_config, tmp_path):
    """A divergence is not a crash: resumed from its last checkpoint the run would take the
    same steps and diverge again, so submit.py --local does not restart it, both ranks end at
    the same step with the error and its fix, and status says what happened."""
    from launch import run_status
    from launch.slurm import jobs

    run_dir = tmp_path / "diverged"
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--local", "--nodes", "1",
                          "--gpus-per-node", "2", "--config", str(tiny_config), "--max-restarts", "1",
                          f"run_dir={run_dir}", DIVERGING], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 1 and f"run DIVERGED: {run_dir}" in res.stdout, res.stdout + res.stderr
    for rank in (0, 1):
        assert re.search(rf"diverged \(rank {rank}\): the pretrain loss is not finite at step \d+ on rank", res.stderr)
    assert "a lower optim.lr" in res.stderr and "were stopped" not in res.stderr and "Traceback" not in res.stderr
    assert re.search(r"subjects [\w-]+(, [\w-]+)*: inputs t1 finite", res.stderr), "the first suspects are named"
    [job] = jobs.read_record(run_dir)["jobs"]
    assert [e["code"] for e in jobs.read_record(run_dir)["events"] if e["event"] == jobs.EXITED] == [3]
    (row,) = run_status.collect([run_dir])
    assert row.job_id == job["job_id"] and row.eta_s is None and "diverged (exit 3" in row.note, row


@pytest.mark.slurm
@pytest.mark.slow
def test_wait_reports_a_diverged_run_instead_of_resubmitting_it(slurm_cluster, tiny_config, tmp_path):
    """On SLURM too: one job, no restart, the reason in jobs.json and in --wait's report."""
    from test_slurm_launch import events, job_ids, submit

    run_dir = tmp_path / "diverged"
    res = submit("--nodes", 2, "--time", 5, "--config", tiny_config, "--run-dir", run_dir, "--max-restarts", 1,
                 DIVERGING, wait_job=True)
    assert res.returncode == 1 and "run DIVERGED" in res.stdout and "a lower optim.lr" in res.stdout, res.stdout
    [jid] = job_ids(run_dir)
    [diverged] = events(run_dir, "diverged")
    assert diverged["job_id"] == jid and "loss is not finite" in diverged["error"]
    assert not events(run_dir, "restarted")
