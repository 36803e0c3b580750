"""launch/submit.py without SLURM, and how a submission expands into runs and resources."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import run_status
from launch.slurm import jobs
from launch.slurm.plan import DEFAULT_RUN_DIR, Resources, base_run_dir, parse_time_min, plan_runs, variant_overrides
from masan.config import ConfigError, load_config
from processes import children, gone

REPO = Path(__file__).resolve().parents[1]
SLURM_COMMANDS = {"sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel", "sacct"}


def path_without_slurm(tmp_path: Path) -> str:
    """A PATH with every system command except SLURM's (a laptop or a login node without it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin"):
        for exe in Path(folder).iterdir():
            if exe.name not in SLURM_COMMANDS and not (bin_dir / exe.name).exists():
                (bin_dir / exe.name).symlink_to(exe)
    return f"{Path(sys.executable).parent}:{bin_dir}"


@pytest.mark.slow
def test_without_slurm_the_same_command_trains_locally(tiny_config, tiny_store, tmp_path):
    """... with the store named relative to the folder it is started in: the run's config.yaml
    records where that is, so predict and evaluate find the store from any folder. The input
    shapes are the store's (null, as the README advises): the finished run is still known as
    finished, by this command and by the same command again."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=path_without_slurm(tmp_path))
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--nodes", "1", "--config", str(tiny_config),
           "--run-dir", str(run_dir), f"data.store={tiny_store.name}", "model.t1_shape=null", "model.fmri_shape=null"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tiny_store.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "run STOPPED" not in res.stdout, res.stdout
    assert "sbatch was not found" in res.stdout and "running locally" in res.stdout
    assert f"tensorboard --logdir {run_dir}" in res.stdout
    done = json.loads((run_dir / "DONE").read_text())
    assert done["epochs_done"] == 3
    assert [j["kind"] for j in jobs.read_record(run_dir)["jobs"]] == ["local"]
    assert load_config(run_dir / "config.yaml").data.store == str(tiny_store)

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tiny_store.parent)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert json.loads((run_dir / "DONE").read_text()) == done
    assert len(jobs.read_record(run_dir)["jobs"]) == 1


def test_repeats_and_ablations_expand_to_one_run_dir_each(tiny_config, tmp_path):
    specs = plan_runs(tmp_path / "abl", str(tiny_config), ["optim.lr=3e-4"], repeats=2,
                      ablations=["model.fusion=add", "model.arch=hfcn data.use_fmri=false"])
    got = {(s.run_dir.relative_to(tmp_path / "abl").as_posix(), s.cfg.split.repeat, s.cfg.model.fusion,
            s.cfg.model.arch, s.cfg.data.use_fmri) for s in specs}
    hfcn = "model.arch-hfcn-data.use_fmri-false"  # a variant of two overrides, the H-FCN reading no fMRI
    assert got == {
        ("baseline/repeat_0", 0, "attention", "masan", True), ("baseline/repeat_1", 1, "attention", "masan", True),
        ("model.fusion-add/repeat_0", 0, "add", "masan", True), ("model.fusion-add/repeat_1", 1, "add", "masan", True),
        (f"{hfcn}/repeat_0", 0, "attention", "hfcn", False), (f"{hfcn}/repeat_1", 1, "attention", "hfcn", False),
    }
    assert variant_overrides("model.channels=[4, 8] optim.lr=1e-3") == ["model.channels=[4, 8]", "optim.lr=1e-3"]
    assert all(s.cfg.optim.lr == 3e-4 and s.cfg.run_dir == str(s.run_dir) for s in specs)
    single = plan_runs(tmp_path / "one", str(tiny_config), ["split.repeat=3"])
    assert [(s.run_dir, s.cfg.split.repeat) for s in single] == [((tmp_path / "one").resolve(), 3)]
    with pytest.raises(ConfigError) as refused:  # the error names what the user gave, not the planner's repeat
        plan_runs(tmp_path / "abl", str(tiny_config), [], repeats=2, ablations=["model.fusoin=add"])
    assert str(refused.value).endswith("(from the overrides model.fusoin=add)")


def test_the_run_directory_is_the_one_the_command_or_its_config_names(tiny_config, tmp_path):
    """submit.py trains where train_local.py would: --run-dir, else a run_dir= override, else the
    config file's run_dir (it used to train into runs/masan, ignoring both)."""
    from masan.config import ConfigError

    named = tmp_path / "named.yaml"
    named.write_text(tiny_config.read_text() + f"run_dir: {tmp_path / 'from_file'}\n")
    assert base_run_dir(None, str(named), []) == str(tmp_path / "from_file")
    assert base_run_dir(None, str(named), [f"run_dir={tmp_path / 'over'}"]) == str(tmp_path / "over")
    assert base_run_dir("flag", str(named), ["run_dir=flag"]) == "flag"
    assert base_run_dir(None, str(tiny_config), []) == base_run_dir(None, None, []) == DEFAULT_RUN_DIR
    with pytest.raises(ConfigError, match="--run-dir a and the override run_dir=b name different"):
        base_run_dir("a", None, ["run_dir=b"])


def test_a_dry_run_checks_everything_and_writes_nothing(tiny_config, tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--local", "--dry-run", "--config", str(tiny_config),
           "--repeats", "2", "--run-dir", str(tmp_path / "runs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("dry run: the checks passed; nothing was written or submitted")
    assert f"{tmp_path / 'runs' / 'repeat_1'}: baseline, split.repeat=1, 3 epochs" in res.stdout
    too_big = subprocess.run([*cmd, "optim.micro_batch=64"], capture_output=True, text=True, timeout=300)
    assert too_big.returncode == 2 and "lower optim.micro_batch" in too_big.stderr, too_big.stderr
    assert not (tmp_path / "runs").exists()


def test_resubmission_reuses_the_run_dirs_config(tiny_config, tmp_path):
    from masan.config import load_config, save_config

    run_dir = tmp_path / "resume"
    save_config(load_config(str(tiny_config), ["optim.lr=0.02", f"run_dir={run_dir}"]), run_dir / "config.yaml")
    (spec,) = plan_runs(run_dir, None, [])
    assert spec.cfg.optim.lr == 0.02 and spec.cfg.data.store == load_config(str(tiny_config)).data.store


def test_a_failed_jobs_message_names_the_logs_that_hold_its_error(tmp_path):
    """With a frozen node the traceback (a collective timeout) is in the waiting ranks' logs,
    not always in rank 0's, which is all the message named before."""
    from launch.slurm.submission import failure_logs

    def log(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    log("12_0_log.out", "step 40: loss 0.3\n")  # rank 0 froze: no error of its own
    r1 = log("12_1_log.out", "Traceback (most recent call last):\n  ...\nTimed out waiting 60000ms\n")
    r10 = log("12_10_log.out", "Traceback (most recent call last):\n")
    log("12_3_0_log.out", "Traceback (most recent call last):\n")  # array job 12_3's rank 0
    assert failure_logs(tmp_path, "12") == [r1, r10]
    assert failure_logs(tmp_path, "12_3") == [tmp_path / "12_3_0_log.out"]
    assert failure_logs(tmp_path, "99") == [tmp_path / "99_0_log.out"]  # no logs (yet): rank 0's path
    # asked again (status --watch) after rank 0's log changed: read again, not the answer kept from before
    with open(tmp_path / "12_0_log.out", "a") as f:
        f.write("Traceback (most recent call last):\n")
    assert failure_logs(tmp_path, "12") == [tmp_path / "12_0_log.out", r1, r10]


def test_one_rank_per_gpu_or_one_per_cpu_node():
    assert Resources(nodes=4, gpus_per_node=8).world_size == 32
    assert Resources(nodes=2, gpus_per_node=0).tasks_per_node == 1


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-12", 2160),
                                           ("1-0:30", 1470), ("0-0:0:59", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_time_min(text) == minutes


def test_bad_inputs_say_what_to_fix(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="--time"):
        parse_time_min("two hours")
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--local", "--config",
                          str(tiny_config), "--run-dir", str(tmp_path / "x"), "model.fusoin=add"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "fusoin" in res.stderr
    # a start its input refuses is not restarted (--max-restarts is for crashes); overrides may come first
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), f"data.store={tmp_path / 'nope.zarr'}",
                          "--local", "--config", str(tiny_config), "--run-dir", str(tmp_path / "y")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "nope.zarr does not exist" in res.stderr and "restart 1" not in res.stdout, res.stdout + res.stderr
    # refused before anything started or was written: no run begun, no TensorBoard line, no run folder
    assert "local run" not in res.stdout and "TensorBoard" not in res.stdout, res.stdout
    assert not (tmp_path / "y").exists()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def test_a_live_local_run_blocks_a_second_submission(tmp_path):
    jobs.record_job(tmp_path, str(os.getpid()), "local", "terminal")  # this test process is alive
    assert jobs.active_jobs(tmp_path) == [(str(os.getpid()), "RUNNING (local)")]
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--local",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "refused" in res.stderr


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_replaces_only_its_own_cohort(tmp_path):
    """The README's main command, at a small size: every step, the report beside the run (not in
    it), a changed --per-class remade, a cohort it did not make left alone."""
    def demo(*args):
        return subprocess.run([sys.executable, str(REPO / "launch" / "demo.py"), "--root", str(tmp_path), *args,
                               "train.pretrain_epochs=1", "train.joint_epochs=1"],
                              capture_output=True, text=True, timeout=600, check=False)

    res = demo("--per-class", "4")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "reports" / "demo" / "table.md").is_file() and (tmp_path / "runs" / "demo" / "DONE").is_file()
    assert len((tmp_path / "demo" / "bids" / "participants.tsv").read_text().splitlines()) == 1 + 4 * 4

    res = demo("--per-class", "5")
    assert res.returncode == 0 and "a cohort of 16 subjects (--per-class 5 makes 20)" in res.stdout, res.stdout[-3000:]
    assert len((tmp_path / "demo" / "bids" / "participants.tsv").read_text().splitlines()) == 1 + 5 * 4

    (tmp_path / "demo" / "bids" / ".made-by-masan-demo").unlink()  # as data_tools/synth_cohort.py leaves one
    res = demo("--per-class", "4")
    assert res.returncode != 0 and "a cohort of 20 subjects (--per-class 4 makes 16), not made by the demo" \
        in res.stderr, res.stderr[-3000:]
    assert len((tmp_path / "demo" / "bids" / "participants.tsv").read_text().splitlines()) == 1 + 5 * 4
    assert (tmp_path / "runs" / "demo" / "DONE").is_file()  # its run kept too

    (tmp_path / "demo" / "bids" / "planted_effect.json").unlink()  # now a cohort the demo did not make
    res = demo("--per-class", "4")
    assert res.returncode != 0 and "holds a cohort the demo did not make" in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "demo" / "bids" / "participants.tsv").is_file() and (tmp_path / "runs" / "demo").is_dir()


@pytest.mark.parametrize("args, code, text", [
    (["--help"], 0, "A real SLURM cluster on this one machine"),
    (["status", "--dir"], 2, "--dir needs a value"),
    (["start", "--nodes", "0"], 2, "--nodes must be a whole number of at least 1, got '0'"),
    (["start", "--cpus", "abc"], 2, "--cpus must be a whole number of at least 1, got 'abc'"),
    (["start", "--port", "65535"], 2, "would pass 65535"),
])
def test_the_local_cluster_script_checks_its_arguments_before_doing_anything(args, code, text, tmp_path):
    res = subprocess.run(["bash", str(REPO / "hpc" / "local_cluster.sh"), *args, *(
        ["--dir", str(tmp_path / "c")] if args[0] == "start" else [])], capture_output=True, text=True, timeout=60,
        check=False)
    assert res.returncode == code and text in res.stdout + res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "c").exists()  # nothing installed, written or started


@pytest.mark.parametrize("action", ["start", "stop", "status"])
def test_the_local_cluster_script_refuses_a_folder_others_may_write(action, tmp_path):
    """Its daemons run as root: a /tmp folder another user prepared could hand them a config and
    have stop kill any process its pid files name."""
    folder = tmp_path / "c"
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "slurmctld.pid").write_text(str(os.getpid()))
    res = subprocess.run(["bash", str(REPO / "hpc" / "local_cluster.sh"), action, "--dir", str(folder)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "may be written by group or others" in res.stderr, res.stdout + res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["slurmctld.pid"]


def test_the_local_cluster_stop_kills_only_slurm_daemons(tmp_path):
    """A pid file of a cluster stopped long ago may name another process by now."""
    folder = tmp_path / "c"
    folder.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (folder / "slurmctld.pid").write_text(str(other.pid))
        res = subprocess.run(["bash", str(REPO / "hpc" / "local_cluster.sh"), "stop", "--dir", str(folder)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0 and other.poll() is None, res.stdout + res.stderr
    finally:
        other.kill()
        other.wait()


# ====================================================================== signals, the run lock, crashes

SUBMIT = REPO / "launch" / "submit.py"
LONG_RUN = ("train.joint_epochs=2000", "log.every_steps=1")
"""Far more epochs than a test waits for: the run is still training whenever the test acts."""


class LocalSubmit:
    """``launch/submit.py --local`` in the background, in a session of its own (as a terminal's
    job: a closed terminal signals that whole process group), its output in a file."""

    def __init__(self, config: Path, run_dir: Path, *overrides: str):
        from test_run_lock import STEP_LINE

        self.run_dir, self.step_line = run_dir, STEP_LINE
        self.out = run_dir.parent / f"{run_dir.name}.submit.log"
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen([sys.executable, str(SUBMIT), "--local", "--config", str(config),
                                          "--run-dir", str(run_dir), *overrides], stdout=f,
                                         stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

    def log(self) -> str:
        return self.out.read_text()

    def wait_for_steps(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.step_line.search(self.log()):
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}):\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"no training step yet:\n{self.log()[-4000:]}"
            time.sleep(0.05)

    def child(self) -> int:
        """The pid of the local run (train_local.py), as jobs.json records it."""
        (job,) = jobs.read_record(self.run_dir)["jobs"]
        return int(job["job_id"])


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGHUP, True)],
                         ids=["SIGTERM", "SIGHUP-of-a-closed-terminal"])
def test_a_signal_to_submit_local_stops_the_run_with_a_checkpoint_and_the_same_command_resumes(
        tiny_config, tmp_path, signum, to_group):
    """SIGTERM to submit.py used to end it at once, its run training on with no parent; SIGHUP
    (a closed terminal signals the whole process group) killed the run without a checkpoint."""
    from masan.train.checkpoint import POINTER

    run = tmp_path / "run"
    started = LocalSubmit(tiny_config, run, *LONG_RUN)
    started.wait_for_steps()
    child = started.child()
    (os.killpg if to_group else os.kill)(started.proc.pid, signum)
    code = started.proc.wait(timeout=180)
    log = started.log()
    assert code == 128 + signum, log[-4000:]
    assert gone(child), "the run outlived submit.py"
    stopped = re.search(r"status: stopped at step (\d+)", log)
    assert stopped and f"run STOPPED: {run}" in log, log[-4000:]
    step = int(stopped[1])
    assert (run / "checkpoints" / POINTER).read_text().strip() == f"step_{step:06d}"  # saved at the stop
    assert "restart 1" not in log  # a stop on request is never restarted

    res = subprocess.run([sys.executable, str(SUBMIT), "--local", "--config", str(tiny_config), "--run-dir", str(run),
                          *LONG_RUN, f"train.max_steps={step + 2}"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0 and f"resumed step_{step:06d}" in res.stderr + res.stdout, res.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_kill_9_of_submit_local_takes_its_run_with_it(tiny_config, tmp_path, nodes):
    """With one rank the run is train_local.py itself; with two, its launcher and their ranks."""
    run = tmp_path / "run"
    started = LocalSubmit(tiny_config, run, "--nodes", str(nodes), *LONG_RUN)
    started.wait_for_steps()
    child = started.child()
    ranks = children(child) if nodes > 1 else []  # (one rank: the child itself; its children are loader workers)
    assert len(ranks) >= (nodes if nodes > 1 else 0), ranks
    started.proc.kill()
    started.proc.wait()
    for pid in [child, *ranks]:
        assert gone(pid), "the run trains on after kill -9 of submit.py, with nobody to stop it"


def test_a_refused_local_start_writes_nothing_into_the_live_runs_folder(tiny_config, tmp_path):
    """A run started with train_local.py by hand has no jobs.json; submit.py used to write its
    job and config there before its run was refused, and status then called the live run ended."""
    from test_train_reliability import snapshot

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from masan.train.runlock import RunLock; "
                               f"RunLock({str(run)!r}).take(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        res = subprocess.run([sys.executable, str(SUBMIT), "--local", "--config", str(tiny_config), "--run-dir",
                              str(run)], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"in use by another run: pid {holder.pid} on host" in res.stderr and "run REFUSED" in res.stdout
        assert "Traceback" not in res.stderr and "local run" not in res.stdout  # nothing was started
        assert snapshot(run) == before
        assert run_status.run_status(tmp_path, run, {}).slurm == "RUNNING (local)"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_crashed_local_run_is_restarted_and_status_counts_the_restart_and_says_it_failed(
        tiny_config, tiny_store, tmp_path):
    """A store whose T1 chunks vanished after the start's checks (which read only metadata):
    every start crashes at its first batch."""
    damaged = Path(shutil.copytree(tiny_store, tmp_path / "damaged.zarr"))
    for chunks in damaged.glob("subjects/*/*/t1/0/c"):
        shutil.rmtree(chunks)
    run = tmp_path / "crash"
    res = subprocess.run([sys.executable, str(SUBMIT), "--local", "--config", str(tiny_config), "--run-dir", str(run),
                          "--max-restarts", "1", f"data.store={damaged}"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert res.returncode == 1 and "restart 1" in res.stdout and f"run NOT finished: {run}" in res.stdout, res.stdout
    first, second = (j["job_id"] for j in jobs.read_record(run)["jobs"])
    (row,) = run_status.collect([run])
    assert (row.slurm, row.job_id, row.restarts) == ("ended (local)", second, 1)
    assert row.note == (f"local run {second} exited with code 1: its error is in the output of the command that "
                        "started it; run that command again to resume from the newest complete checkpoint")
    restarted = [e for e in jobs.read_record(run)["events"] if e["event"] == "restarted"]
    assert [(e["job_id"], e["after"], e["code"]) for e in restarted] == [(second, first, 1)]


def test_train_local_does_not_start_fresh_beside_a_run_in_the_former_default_folder(tiny_config, tmp_path):
    """The built-in run directory moved (runs/default -> runs/masan, submit.py's): a bare start
    in a folder whose runs/default holds a run says how to resume it instead of training anew."""
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "config.yaml").write_text(tiny_config.read_text())
    res = subprocess.run([sys.executable, str(REPO / "launch" / "train_local.py")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and "pass --run-dir runs/default to resume it" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs" / "masan").exists()


def test_a_refused_sbatch_removes_its_own_files_not_another_submissions(tmp_path, monkeypatch):
    """RUN_DIR/slurm is shared by every submission into the run folder: when sbatch refuses, only
    what submitit wrote for the refused job (named by a temporary uuid) goes; job files another
    submission wrote meanwhile (named by their job id) stay. sbatch here is a stand-in that lets
    another job land in the folder, then refuses as sbatch does."""
    from launch.slurm.plan import RunSpec
    from launch.slurm.submission import SubmitError, submit_slurm

    folder, bin_dir = tmp_path / "run" / "slurm", tmp_path / "bin"
    folder.mkdir(parents=True)
    (folder / "100_submitted.pkl").write_text("an earlier job")
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {folder}/101_submitted.pkl {folder}/101_submission.sh\n"
                      "echo 'sbatch: error: Invalid qos specification' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = RunSpec(run_dir=tmp_path / "run", variant="baseline", repeat=0, cfg=load_config(None))
    with pytest.raises(SubmitError, match="Invalid qos specification"):
        submit_slurm([spec], Resources(), folder, max_requeues=0)
    assert sorted(p.name for p in folder.iterdir()) == ["100_submitted.pkl", "101_submission.sh", "101_submitted.pkl"]
