"""launch/submit.py against a real SLURM cluster (two slurmd nodes on this machine).

Each test trains the tiny real model with real DeepSpeed engines (gloo) through submitit.
What users rely on: one rank per node of a 2-node job; a job requeued by hand or stopped by
its time limit resumes from a complete checkpoint and finishes every epoch; --repeats runs
every repeat as one array; the same run directory is never started over or run twice at once.

SLURM holds a requeued job for about two minutes (``Reason=BeginTime``) before it may start
again; the tests release that hold (``scontrol update StartTime=now``, as an admin could)
so they wait for the resume, not for the scheduler.
"""

from __future__ import annotations

import contextlib
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
import yaml

from launch.slurm import jobs
from launch.slurm.plan import parse_time_min

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launch" / "submit.py"
JOB_TIMEOUT_S = 420
POLL_S = 1.0
# TINY_CONFIG trains 1 + 2 epochs; these give a run long enough to interrupt.
LONG_RUN = ["train.joint_epochs=14", "checkpoint.every_steps=10"]


def submit(*args, wait_job: bool = False, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run launch/submit.py; with wait_job, --wait while releasing SLURM's requeue holds."""
    cmd = [sys.executable, str(SUBMIT), *map(str, args)] + (["--wait", "--poll", "2"] if wait_job else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{' '.join(cmd)} did not end within {timeout}s:\n{proc.stdout.read()}")
        release_requeue_holds()
        time.sleep(POLL_S)
    return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.read(), "")


def release_requeue_holds() -> None:
    res = subprocess.run(["squeue", "-h", "-r", "-o", "%i %r"], capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        jid, _, reason = line.partition(" ")
        if reason.strip() == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True, check=False)


def job_ids(run_dir: Path) -> list[str]:
    return [j["job_id"] for j in jobs.read_record(run_dir)["jobs"]]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in jobs.read_record(run_dir)["events"] if e["event"] == kind]


def wait_until(predicate, what: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        release_requeue_holds()
        time.sleep(POLL_S)


def rank0_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"{job_id}_0_log.out").read_text()


def assert_finished(run_dir: Path, epochs: int) -> dict:
    done = json.loads((run_dir / "DONE").read_text())
    assert done["epochs_done"] == epochs, done
    assert (run_dir / "predictions.csv").is_file() and (run_dir / "metrics.json").is_file()
    return done


def test_two_node_job_runs_one_rank_per_node_and_is_not_started_twice(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "two_nodes"
    res = submit("--nodes", 2, "--time", 10, "--config", tiny_config, "--run-dir", run_dir, wait_job=True)
    assert res.returncode == 0, res.stdout
    (jid,) = job_ids(run_dir)
    assert f"job {jid}" in res.stdout and "tensorboard --logdir" in res.stdout and "_0_log.out" in res.stdout
    done = assert_finished(run_dir, epochs=3)
    (started,) = events(run_dir, "started")
    assert started["world_size"] == 2 and started["nodes"] == 2
    assert "rank 0/2 on node node1" in rank0_log(run_dir, jid)
    assert "rank 1/2 on node node2" in (run_dir / "slurm" / f"{jid}_1_log.out").read_text()
    assert (run_dir / "tb").is_dir()

    again = submit("--nodes", 2, "--time", 10, "--run-dir", run_dir, wait_job=True)
    assert again.returncode == 0, again.stdout
    assert "already finished" in again.stdout
    assert job_ids(run_dir) == [jid]  # nothing new submitted, nothing retrained
    assert json.loads((run_dir / "DONE").read_text()) == done


def test_scontrol_requeue_mid_run_resumes_from_checkpoint(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "requeue"
    res = submit("--nodes", 2, "--time", 10, "--config", tiny_config, "--run-dir", run_dir, *LONG_RUN)
    assert res.returncode == 0, res.stdout
    (jid,) = job_ids(run_dir)

    twice = submit("--nodes", 2, "--run-dir", run_dir)
    assert twice.returncode == 2 and "refused" in twice.stdout and jid in twice.stdout
    assert job_ids(run_dir) == [jid]

    wait_until(lambda: (run_dir / "checkpoints" / "latest_complete").exists(), "a first checkpoint")
    subprocess.run(["scontrol", "requeue", jid], check=True)
    wait_until(lambda: jobs.job_state(jid) not in jobs.ACTIVE_STATES, f"job {jid} to end")

    assert jobs.job_state(jid) == "COMPLETED"
    assert_finished(run_dir, epochs=15)
    assert [e["restarts"] for e in events(run_dir, "started")] == [0, 1]
    log = rank0_log(run_dir, jid)
    assert "resumed step_" in log.split("restart 1")[1]


def test_time_limit_stops_saves_requeues_and_finishes(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "time_limit"
    # Whatever this machine's speed, the job must meet its time limit mid-run: once it has a
    # first checkpoint its limit is cut to 2 minutes past the time it has run (as if it had run
    # for hours), so SLURM sends USR2 (100 s ahead of the limit) at its next periodic check,
    # leaving a minute or more to save. Once the job has requeued itself, the limit is raised again so the next
    # allocation can finish the run (about 2 minutes of training on 2 quiet cores).
    res = submit("--nodes", 2, "--time", 15, "--signal-delay", 100, "--config", tiny_config,
                 "--run-dir", run_dir, "train.joint_epochs=300", "checkpoint.every_steps=10")
    assert res.returncode == 0, res.stdout
    (jid,) = job_ids(run_dir)
    wait_until(lambda: (run_dir / "checkpoints" / "latest_complete").exists(), "a first checkpoint")
    shown = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, check=True).stdout
    ran_min = parse_time_min(re.search(r"RunTime=(\S+)", shown)[1])  # rounded up
    subprocess.run(["scontrol", "update", f"JobId={jid}", f"TimeLimit={ran_min + 2}"], check=True)
    wait_until(lambda: events(run_dir, "requeued"), "the job to stop at its time limit and requeue itself")
    subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=15"], check=True)
    wait_until(lambda: jobs.job_state(jid) not in jobs.ACTIVE_STATES, f"job {jid} to end", timeout=900)

    assert jobs.job_state(jid) == "COMPLETED"
    assert_finished(run_dir, epochs=301)
    requeued = events(run_dir, "requeued")
    assert requeued and requeued[0]["step"] > 0
    assert [e["restarts"] for e in events(run_dir, "started")][:2] == [0, 1]
    after = rank0_log(run_dir, jid).split("restart 1")[1]
    assert f"resumed step_{requeued[0]['step']:06d}" in after  # the stop checkpoint itself


def task_pid(job_id: str, rank: int) -> int:
    """The pid of a job's training task of this rank (every node of the test cluster is this host)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            argv = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue  # not a process, or one that ended meanwhile
        # the batch script's srun has the same job id, rank 0's SLURM_PROCID and the task's arguments
        task = Path(argv[0]).name.startswith("python") and "submitit.core._submit" in argv
        if task and (env.get("SLURM_JOB_ID"), env.get("SLURM_PROCID")) == (job_id, str(rank)):
            return int(proc.name)
    pytest.fail(f"no task of rank {rank} of job {job_id} on this host")


@pytest.mark.parametrize("frozen_rank", [0, 1])
def test_a_frozen_node_fails_its_job_within_the_collective_timeout_and_a_resubmit_resumes(
        slurm_cluster, tiny_config, tmp_path, frozen_rank):
    """A node that stops answering (here: one rank SIGSTOPped) must cost the job the run's
    collective timeout, not the rest of its time limit: the other rank times out and fails, and
    ``srun --kill-on-bad-exit`` ends the frozen task with it. Submitting again resumes."""
    run_dir = tmp_path / "frozen"
    # far more epochs than the test waits for: the freeze must come before the run's last collective
    res = submit("--nodes", 2, "--time", 10, "--config", tiny_config, "--run-dir", run_dir,
                 "train.joint_epochs=300", "checkpoint.every_steps=10", "train.dist_timeout_minutes=0.25")
    assert res.returncode == 0, res.stdout
    (jid,) = job_ids(run_dir)
    wait_until(lambda: (run_dir / "checkpoints" / "latest_complete").exists(), "a first checkpoint")
    frozen = task_pid(jid, rank=frozen_rank)
    os.kill(frozen, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        # the timeout, then SLURM's KillWait (30 s on the test cluster) at most, and slack for 2 busy cores
        wait_until(lambda: jobs.job_state(jid) not in jobs.ACTIVE_STATES, f"job {jid} to end", timeout=150)
        ended_after = time.monotonic() - frozen_at
        print(f"job {jid} ended {ended_after:.0f} s after rank {frozen_rank} froze")
    finally:
        subprocess.run(["scancel", jid], capture_output=True, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    assert jobs.job_state(jid) == "FAILED", (jobs.job_state(jid), ended_after)
    survivor_log = (run_dir / "slurm" / f"{jid}_{1 - frozen_rank}_log.out").read_text()
    assert "Timed out waiting 15000ms" in survivor_log, survivor_log[-3000:]

    res = submit("--nodes", 2, "--time", 10, "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout
    first, second = job_ids(run_dir)
    assert first == jid
    wait_until(lambda: "resumed step_" in rank0_log(run_dir, second) if (run_dir / "slurm" / f"{second}_0_log.out")
               .exists() else False, f"job {second} to resume")
    (run_dir / "STOP").touch()  # the rest of the 300 epochs is not this test's business
    wait_until(lambda: jobs.job_state(second) not in jobs.ACTIVE_STATES, f"job {second} to end")
    assert jobs.job_state(second) == "COMPLETED", rank0_log(run_dir, second)[-3000:]


def test_repeats_run_as_one_array_with_one_run_dir_each(slurm_cluster, tiny_config, tmp_path):
    base = tmp_path / "repeats"
    res = submit("--nodes", 1, "--repeats", 2, "--time", 10, "--config", tiny_config, "--run-dir", base,
                 wait_job=True)
    assert res.returncode == 0, res.stdout
    ids = [job_ids(base / f"repeat_{r}")[0] for r in range(2)]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1"]
    for r in range(2):
        assert_finished(base / f"repeat_{r}", epochs=3)
        assert yaml.safe_load((base / f"repeat_{r}" / "config.yaml").read_text())["split"]["repeat"] == r
    splits = [json.loads((base / f"repeat_{r}" / "split.json").read_text()) for r in range(2)]
    assert splits[0]["test"] != splits[1]["test"]


def test_a_crashed_job_is_resubmitted_up_to_max_restarts(slurm_cluster, tiny_config, tiny_store, tmp_path):
    """A crash (here: a store whose T1 chunks vanished after the start's checks, which read only
    metadata) is resubmitted; a refused start is not (test_wait_reports_a_refused_run...)."""
    damaged = Path(shutil.copytree(tiny_store, tmp_path / "damaged.zarr"))
    for chunks in damaged.glob("subjects/*/*/t1/0/c"):
        shutil.rmtree(chunks)
    run_dir = tmp_path / "crash"
    res = submit("--nodes", 1, "--time", 5, "--config", tiny_config, "--run-dir", run_dir, "--max-restarts", 1,
                 f"data.store={damaged}", wait_job=True)  # every start crashes at its first batch
    assert res.returncode == 1 and "NOT finished" in res.stdout, res.stdout
    first, second = job_ids(run_dir)
    (restart,) = events(run_dir, "restarted")
    assert (restart["after"], restart["job_id"], restart["state"]) == (first, second, "FAILED")
    assert re.search(r"damaged\.zarr.*chunk file .* is missing", rank0_log(run_dir, second))


def test_what_sbatch_or_the_jobs_start_would_refuse_is_refused_before_anything_is_queued(
        slurm_cluster, tiny_config, tmp_path):
    """A job that would wait in the queue only to be refused, or that sbatch refuses, is refused
    here in one line (exit 2), with nothing submitted and nothing left in the run directory."""
    no_store = submit("--nodes", 1, "--config", tiny_config, "--run-dir", tmp_path / "no_store",
                      f"data.store={tmp_path / 'nope.zarr'}")
    assert no_store.returncode == 2 and "nope.zarr does not exist" in no_store.stdout, no_store.stdout
    assert "nothing was submitted" in no_store.stdout and not (tmp_path / "no_store" / "jobs.json").exists()

    dry = submit("--nodes", 2, "--time", 7, "--config", tiny_config, "--run-dir", tmp_path / "dry", "--dry-run")
    assert dry.returncode == 0 and "submit one job to SLURM: nodes=2" in dry.stdout, dry.stdout
    assert "time=7" in dry.stdout
    assert not (tmp_path / "dry").exists()

    feature = submit("--nodes", 1, "--config", tiny_config, "--run-dir", tmp_path / "feature", "--constraint", "bigmem")
    assert feature.returncode == 2 and "refused by sbatch: sbatch: error:" in feature.stdout, feature.stdout
    assert "Traceback" not in feature.stdout and "--constraint" in feature.stdout
    assert not (tmp_path / "feature" / "jobs.json").exists()
    # no submission script or pickle of a job that never was: only the lock of the run's jobs.json
    assert [p.name for p in (tmp_path / "feature").rglob("*")] == ["jobs.json.lock"]


def test_two_submissions_into_one_run_directory_at_once_queue_one_job(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "race"
    cmd = [sys.executable, str(SUBMIT), "--nodes", "1", "--time", "5", "--config", str(tiny_config),
           "--run-dir", str(run_dir), *LONG_RUN]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    try:
        assert sorted(p.returncode for p in procs) == [0, 2], outs
        assert any("already has a live job" in out for out in outs), outs
        assert len(job_ids(run_dir)) == 1
    finally:
        for jid in job_ids(run_dir):
            subprocess.run(["scancel", jid], check=False)


def test_a_cluster_whose_controller_does_not_answer_is_not_trained_on_here(slurm_cluster, tiny_config, tmp_path):
    """sbatch is there but slurmctld does not answer (down, or unreachable from this node):
    training on a login node instead would take its cores; nothing is started."""
    from masan.distributed import free_port

    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", f"SlurmctldPort={free_port()}", conf))
    res = subprocess.run([sys.executable, str(SUBMIT), "--nodes", "1", "--config", str(tiny_config), "--run-dir",
                          str(tmp_path / "run")], env=dict(os.environ, SLURM_CONF=str(dead)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "did not answer sinfo" in res.stderr and "--local" in res.stderr, res.stderr
    assert "running locally" not in res.stdout and not (tmp_path / "run").exists()
