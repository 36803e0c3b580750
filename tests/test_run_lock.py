"""One run, one writer, and interrupts that lose nothing.

Real runs (launch/train_local.py, DeepSpeed on the CPU, two gloo ranks) on the session's tiny
cohort:

- Ctrl-C (SIGINT to the launcher) makes both ranks save a complete checkpoint at the step
  they were at and end ``stopped`` (exit 0); a second Ctrl-C ends them at once (exit 130),
  saying the steps since the last checkpoint are lost;
- a second start on a live run directory is refused (exit 2) naming the holder, before it
  changes a byte there; kill -9 of a ``--nproc 2`` launcher takes both ranks with it; the
  next start takes the lock and resumes;
- a rank frozen with SIGSTOP ends the run within ``train.dist_timeout_minutes``;
- the lock itself (forked children do not keep it), the host cache sweep's message, and
  torch.compile's precompiled headers kept in the run's compile cache.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from masan.rundir import RunDir
from masan.train.checkpoint import POINTER
from masan.train.runlock import RunLock, RunLockedError
from processes import children, gone
from test_train_reliability import snapshot
from test_train_run import LAUNCH, REPO, RUN_TIMEOUT_S, TRAIN_CONFIG, launch, manifests

pytestmark = pytest.mark.slow  # every test trains real runs and signals them

LONG = ("train.joint_epochs=100", "checkpoint.every_steps=5")
"""Long enough that the run is still training whenever the test acts on it."""
STEP_LINE = re.compile(r"rank0 INFO masan\.train\.loop: step (\d+):")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_store) -> Path:
    path = tmp_path_factory.mktemp("lock_config") / "train.yaml"
    path.write_text(yaml.safe_dump({**TRAIN_CONFIG, "data": {**TRAIN_CONFIG["data"], "store": str(tiny_store)},
                                    "log": {**TRAIN_CONFIG["log"], "eval_every_epochs": 0}}))
    return path


class Started:
    """A launcher running in the background, its output in files."""

    def __init__(self, config: Path, run_dir: Path, *overrides: str, nproc: int = 2):
        self.out = run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log"
        self.file = open(self.out, "w")  # closed in wait()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # no waiting for a held lock
        self.proc = subprocess.Popen([sys.executable, str(LAUNCH), "--config", str(config), "--nproc", str(nproc),
                                      f"run_dir={run_dir}", *overrides], stdout=self.file, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=env)

    def log(self) -> str:
        return self.out.read_text()

    def steps(self) -> list[int]:
        return [int(s) for s in STEP_LINE.findall(self.log())]

    def wait_for(self, what, timeout_s: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            assert self.proc.poll() is None, f"the run ended early ({self.proc.returncode}):\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting:\n{self.log()[-4000:]}"
            time.sleep(0.01)

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.file.close()


def alive(pid: int) -> bool:
    """Some thread of the process still runs: a killed orphan may wait as a zombie to be reaped
    by init, and its main thread is a zombie while its other threads still exit (holding its
    files, and so its run-directory lock)."""
    try:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return False  # gone, or went while being read
    return any(state != "Z" for state in states)


def lock_free(run: Path) -> bool:
    """Nobody holds ``run``'s lock (it is taken and given back at once)."""
    lock = RunLock(run)
    try:
        lock.take_existing()
    except RunLockedError:
        return False
    finally:
        lock.release()
    return True


def test_ctrl_c_saves_a_complete_checkpoint_and_a_second_one_stops_at_once(tmp_path, config):
    run = tmp_path / "run"
    first = Started(config, run, *LONG)
    first.wait_for(lambda: (run / "checkpoints" / POINTER).exists() and len(first.steps()) >= 7)
    first.proc.send_signal(signal.SIGINT)
    assert first.wait() == 0, first.log()[-4000:]
    log = first.log()
    stopped = int(re.search(r"status: stopped at step (\d+)", log).group(1))
    assert first.steps()[-1] == stopped, "a step was logged but not saved"
    assert manifests(run)[-1]["step"] == stopped  # complete: every file hashed, COMPLETE marker
    assert "Ctrl-C: every rank saves a checkpoint" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]

    shm = tmp_path / "shm"
    shm.mkdir()
    # each step also measures every loss term's gradient norm: a step several times as long, so that
    # the second Ctrl-C lands inside it on a loaded machine too (it came after the save once)
    second = Started(config, run, *LONG, "data.cache=host", f"data.cache_dir={shm}", "data.cache_reserve_gib=0",
                     "log.grad_norm_every_steps=1")
    second.wait_for(lambda: any(s > stopped + 1 for s in second.steps()))
    assert list(shm.glob("masan-cache-*")), "the resumed run holds the cohort in its host cache"
    assert f"resumed step_{stopped:06d}" in second.log()
    ranks = children(second.proc.pid)
    logged = len(second.steps())
    second.wait_for(lambda: len(second.steps()) > logged, timeout_s=30)  # a step has just begun
    second.proc.send_signal(signal.SIGINT)
    # apart, or the two signals would reach a rank as one: rank 0 has taken the first (its line),
    # and the other rank had as long again
    second.wait_for(lambda: "Ctrl-C: every rank saves" in second.log(), timeout_s=30)
    time.sleep(0.05)
    second.proc.send_signal(signal.SIGINT)  # long before that step and its checkpoint could be done
    t0 = time.monotonic()
    assert second.wait(timeout_s=30) == 130, second.log()[-4000:]
    assert time.monotonic() - t0 < 10
    log = second.log()
    since = re.search(r"second Ctrl-C: stopping at once, without a checkpoint: the steps since step_(\d+) \(the "
                      r"newest complete checkpoint in \S+\) are lost", log)
    assert since and int(since.group(1)) == manifests(run)[-1]["step"] >= stopped, log[-4000:]
    assert "status:" not in log
    assert not any(alive(p) for p in ranks)
    assert not list(shm.glob("masan-cache-*")), "ended at once, yet no shared memory left behind"


def test_one_run_per_directory_and_ranks_die_with_their_launcher(tmp_path, config):
    run = tmp_path / "run"
    holder = Started(config, run, *LONG)
    holder.wait_for(lambda: (run / "checkpoints" / POINTER).exists())
    ranks = children(holder.proc.pid)
    assert len(ranks) == 2

    again = launch(config, run, *LONG, nproc=2)  # the same command while the run is live
    assert again.returncode == 2, again.log[-4000:]
    assert re.search(rf"{run} is in use by another run: pid (\d+) \(rank 0 of a local run whose launcher is pid "
                     rf"{holder.proc.pid}\) on host {re.escape(socket.gethostname())} since \S+", again.stderr), \
        again.log[-4000:]
    assert "Traceback" not in again.stderr
    assert holder.proc.poll() is None, "the refused start disturbed the live run"

    holder.proc.kill()  # kill -9 of the launcher
    holder.wait()
    assert all(gone(p) for p in ranks), "ranks outlived their launcher"
    deadline = time.monotonic() + 120  # a killed rank's last threads may hold its files (the lock) a while longer
    while not lock_free(run) and time.monotonic() < deadline:
        time.sleep(0.2)

    # another process holding the lock: the refused start changes nothing in the run directory
    hold = subprocess.Popen([sys.executable, "-c", "import sys; from masan.train.runlock import RunLock; "
                             "RunLock(sys.argv[1]).take(); print('held', flush=True); sys.stdin.read()", str(run)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert hold.stdout.readline().strip() == "held"  # so the ranks' own lock was gone with them
    before = snapshot(run)
    res = launch(config, run, *LONG, nproc=1)
    assert res.returncode == 2 and f"in use by another run: pid {hold.pid} on host" in res.stderr, res.log[-4000:]
    assert snapshot(run) == before
    hold.stdin.close()
    hold.wait()

    resumed = Started(config, run, *LONG)
    resumed.wait_for(lambda: "resumed step_" in resumed.log() and resumed.steps())
    (run / "STOP").touch()
    assert resumed.wait() == 0 and "status: stopped" in resumed.log(), resumed.log()[-4000:]


def test_a_frozen_rank_fails_the_run_within_the_collective_timeout(tmp_path, config):
    """A rank that stops answering (a frozen node, a hung process: here SIGSTOP) ends the run
    within train.dist_timeout_minutes, also when the others wait in DeepSpeed's own step
    collectives, so that the launcher restarts it instead of the job idling until its limit."""
    run = tmp_path / "run"
    timeout_s = 15
    started = Started(config, run, *LONG, f"train.dist_timeout_minutes={timeout_s / 60}")
    started.wait_for(lambda: len(started.steps()) >= 2)
    rank1 = next(p for p in children(started.proc.pid)
                 if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))
    os.kill(rank1, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        code = started.wait(timeout_s=20 * timeout_s)
    finally:
        if alive(rank1):
            os.kill(rank1, signal.SIGKILL)
    took = time.monotonic() - frozen
    assert code != 0, started.log()[-4000:]
    assert took < 5 * timeout_s, (took, started.log()[-4000:])
    log = started.log()
    assert f"Timed out waiting {timeout_s * 1000}ms" in log, log[-4000:]
    # the failed rank exits 1, or is aborted by gloo's teardown after the failed collective (-6)
    assert re.search(r"error: rank\(s\) \[0\] exited with \[-?\d+\]; rank\(s\) \[1\], still running then, were "
                     r"stopped", log), log[-4000:]


def test_the_lock_protocol(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    assert not lock.take_existing() and not run.exists()  # nothing is created before the checks
    lock.take()
    assert (run / RunDir.LOCK_NAME).is_file() and lock.held
    with pytest.raises(RunLockedError, match=rf"in use by another run: pid {os.getpid()} on host "):
        RunLock(run).take_existing()

    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:  # a forked child (a DataLoader worker) must not keep the run directory locked
        os.write(tell, b"1")  # its fork hooks have run by now
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        lock.release()
        other = RunLock(run)
        assert other.take_existing()
        other.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)


def test_the_cache_sweep_says_what_it_removed(tmp_path, caplog):
    from masan.data.cache import OWNER, sweep_stale

    stale = tmp_path / "masan-cache-dead"
    stale.mkdir()
    (stale / OWNER).write_text(f"{socket.gethostname()} 999999999")
    (stale / "0-t1.npy").write_bytes(b"\0" * 4096)
    live = tmp_path / "masan-cache-live"
    live.mkdir()
    (live / OWNER).write_text(f"{socket.gethostname()} 999999998 flock")  # a pid this process cannot see ...
    held = os.open(live / OWNER, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # ... whose owner is alive: it holds the lock
    owner = (stale / OWNER).stat().st_size
    try:
        with caplog.at_level(logging.WARNING, logger="masan.data.cache"):
            assert sweep_stale(tmp_path) == [stale]
    finally:
        os.close(held)
    assert f"removed {stale} (0.00 GiB, {4096 + owner} bytes)" in caplog.text
    assert "pid 999999999" in caplog.text and live.exists()
    earlier = tmp_path / "masan-cache-of-an-earlier-version"  # took no lock: its live pid keeps it
    earlier.mkdir()
    (earlier / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
    assert sweep_stale(tmp_path) == [live], "its lock released, the cache is left behind"
    assert earlier.exists()


def test_compile_keeps_precompiled_headers_in_the_run_cache(tmp_path):
    import torch._inductor.codecache as codecache

    from masan.train.run import keep_inductor_files_in

    saved = codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR
    try:
        keep_inductor_files_in(str(tmp_path / "compile_cache"))
        assert codecache._HEADER_DIR == str(tmp_path / "compile_cache" / "precompiled_headers")
        assert codecache._HEADER_LOCK_DIR.startswith(codecache._HEADER_DIR)
    finally:
        codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = saved
