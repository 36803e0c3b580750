"""launch/status.py: one table of every run, from what the run directories hold.

Two tiny real runs trained in this process (the conftest's tiny cohort and config, CPU):
one finished, one stopped after a few steps while its (recorded) local launcher still lives.
On the local SLURM cluster, a --repeats array shows up as two array tasks of one job and
ends DONE.

One bad run is one row with its problem, never a traceback or a missing row: copies of the
finished run with a truncated or invalid config.yaml or a corrupt jobs.json, and runs another
user may not read (read as a second user when the tests run as root: root reads everything).
A pending job shows SLURM's reason; submit.py refuses a job its partition can never start.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import as_second_user
from launch import run_status, status
from launch.slurm import jobs, partition, queue
from launch.slurm.plan import Resources

REPO = Path(__file__).resolve().parents[1]
LOGGED = ["log.every_steps=1"]  # a loss and a step time at every step: ETA needs two


STOPPED_RUN = """
import sys
from masan.config import load_config
from masan.train.run import run_training
from masan.train.stop import StopRequest

class StopAfter(StopRequest):
    # asks to stop at the 5th step boundary, as `touch RUN_DIR/STOP` would then
    calls = 0
    def agreed(self):
        self.calls += 1
        return self.calls >= 5

cfg = load_config(sys.argv[1], sys.argv[2:])
out = run_training(cfg, StopAfter(cfg.run_dir))
assert out.status == "stopped" and out.step == 5, out
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config) -> Path:
    """A finished run (launch/train_local.py) and one stopped at step 5, trained side by side in
    their own processes (DeepSpeed keeps process-wide state: one run per process). The finished
    run takes 2 of its 7 subjects per step: each epoch ends 6/7 through by the logged fraction."""
    root = tmp_path_factory.mktemp("runs")
    stopped = root / "sweep" / "repeat_1"
    finished = [f"run_dir={root / 'finished'}", "optim.micro_batch=2", *LOGGED]
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch" / "train_local.py"), "--config", str(tiny_config),
                               *finished], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen([sys.executable, "-c", STOPPED_RUN, str(tiny_config), f"run_dir={stopped}",
                               "split.repeat=1", *LOGGED], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    # its launcher is alive (this process), as submit.py --local records one
    jobs.record_job(stopped, str(os.getpid()), "local", "(this terminal)")
    return root


def test_finished_and_unfinished_runs(runs):
    rows = {r.run: r for r in run_status.collect([runs])}
    assert sorted(rows) == ["finished", "sweep/repeat_1"]
    done, going = rows["finished"], rows["sweep/repeat_1"]

    assert done.done and done.phase == "done" and done.eta_s == 0
    assert done.epochs_done == done.epochs_target == 3
    assert done.checkpoint == f"step_{done.step:06d}" and done.step > 5
    assert done.variant == "MASAN" and done.repeat == 0 and done.slurm == "-" and done.loss is not None
    # whole epochs when done: the epoch fraction counts the samples whole steps use (it read 2 + 6/7
    # of 3 at the end, one subject rotating out of each epoch, and status's ETA ran long by as much)
    logged = run_status._logged(Path(done.path))[run_status.EPOCH_TAG][-1]
    assert logged.step == done.step and logged.value == pytest.approx(3)
    events = run_status._scalars(Path(done.path), (run_status.EPOCH_TAG,))[run_status.EPOCH_TAG]
    assert [(e.step, e.value) for e in events[-len(run_status._logged(Path(done.path))[run_status.EPOCH_TAG]):]] \
        == [(e.step, pytest.approx(e.value)) for e in run_status._logged(Path(done.path))[run_status.EPOCH_TAG]], \
        "progress.json holds the events' last intervals"

    assert not going.done and going.phase == "pretrain" and going.step == 5
    assert going.checkpoint == "step_000005" and 0 <= going.checkpoint_age_s < 600
    assert 0 < going.epochs_done < 1 and going.epochs_target == 3
    assert going.repeat == 1 and going.slurm == "RUNNING (local)" and going.loss is not None
    # steps left x seconds per step: positive, and no more than a generous bound for this tiny run
    assert going.eta_s is not None and 0 < going.eta_s < 3600
    assert (going.requeues, going.restarts) == (0, 0)


def test_a_stopped_run_shows_no_eta(runs, tmp_path):
    """An ETA is a promise about a live run: a run whose local job ended, or that nothing runs
    any more on the host that ran it, ends only when it is started again."""
    ended, unowned = tmp_path / "ended", tmp_path / "unowned"
    for run in (ended, unowned):
        shutil.copytree(runs / "sweep" / "repeat_1", run)
        (run / "jobs.json").unlink()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    jobs.record_job(ended, gone.stdout.strip(), "local", "(this terminal)")
    rows = {Path(r.path).name: r for r in run_status.collect([ended, unowned])}
    assert rows["ended"].slurm == jobs.LOCAL_ENDED and rows["unowned"].slurm == run_status.NO_JOB
    for row in rows.values():
        assert not row.done and row.eta_s is None and row.step == 5, row
    # a pid is reused: a recorded exit ends the job whatever process holds its pid now
    reused = tmp_path / "reused"
    shutil.copytree(ended, reused)
    jobs.record_job(reused, str(os.getpid()), "local", "(this terminal)")  # this live process: the pid's new owner
    assert jobs.active_jobs(reused) == [(str(os.getpid()), jobs.LOCAL_RUNNING)]
    jobs.record_event(reused, str(os.getpid()), jobs.EXITED, code=0)  # as local_runs.py records the run's end
    assert jobs.active_jobs(reused) == []
    assert run_status.run_status(tmp_path, reused, {}).slurm == jobs.LOCAL_ENDED
    for row in rows.values():  # by hand or by submit.py --local, a stop on request is told from a crash
        assert row.note.startswith("stopped on request (") and "at step 5, with a complete checkpoint" in row.note, row
    lock = json.loads((unowned / "run.lock").read_text())  # a later start took the lock, then crashed early
    stopped_at = datetime.fromisoformat(json.loads((unowned / "STOPPED").read_text())["time"])
    (unowned / "run.lock").write_text(json.dumps({**lock, "since": (stopped_at + timedelta(seconds=5)).isoformat()}))
    assert run_status.run_status(tmp_path, unowned, {}).note.startswith(
        "not running (no process on this host holds its run.lock) and not finished, and it recorded no stop: it "
        "crashed or was killed")

    # without its TensorBoard log, the checkpoint's own position: 5 of the 7 training subjects of epoch 0
    shutil.rmtree(unowned / "tb")
    assert run_status.run_status(tmp_path, unowned, {}).epochs_done == pytest.approx(5 / 7)
    # killed before its first step: no checkpoint, no log, but its start took the lock
    early = tmp_path / "early"
    early.mkdir()
    for name in ("config.yaml", "run.lock"):
        shutil.copy(unowned / name, early / name)
    row = run_status.run_status(tmp_path, early, {})
    assert row.step is None and row.note.startswith("not running (no process on this host holds its run.lock)"), row


def test_table_and_cli(runs, capsys):
    assert status.main([str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(status.COLUMNS)
    line = {row.split()[0]: row for row in out[1:3]}
    assert line["finished"].rstrip().endswith("DONE") and "RUNNING (local)" in line["sweep/repeat_1"]
    assert "step_000005" in line["sweep/repeat_1"] and "pretrain" in line["sweep/repeat_1"]
    assert out[-1] == "2 runs, 1 done"
    assert status.main([str(runs), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["finished"]["done"] and rows["sweep/repeat_1"]["checkpoint"] == "step_000005"
    assert status.main([str(runs / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_watch_refreshes_until_interrupted(runs, capsys, monkeypatch):
    naps = []

    def nap(seconds):  # the second wait is where the user presses Ctrl-C
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(status.time, "sleep", nap)
    assert status.main([str(runs / "finished"), "--watch", "0.5"]) == 0
    assert naps == [0.5, 0.5] and capsys.readouterr().out.count("1 runs, 1 done") == 2


class Outcome:
    """Stands for masan.train.run.TrainOutcome in a submitit result file (any class must do)."""

    def __init__(self, step):
        self.step = step


def test_ended_slurm_jobs_without_an_answering_controller_read_submitit_results(tmp_path):
    import pickle

    folder = tmp_path / "slurm"
    folder.mkdir()
    for jid, result in (("41", ("success", Outcome(7))), ("42_1", ("error", "Traceback ...: ValueError"))):
        (folder / f"{jid}_0_result.pkl").write_bytes(pickle.dumps(result))
    job = {"kind": "slurm", "log": str(folder / "41_0_log.out"), "job_id": "41"}
    assert queue.slurm_state(job, None) == "COMPLETED"
    assert queue.slurm_state({**job, "job_id": "42_1", "log": str(folder / "42_1_0_log.out")}, None) == "FAILED"
    assert queue.slurm_state({**job, "job_id": "43", "log": str(folder / "43_0_log.out")}, None) == \
        "UNKNOWN (no SLURM)"
    assert queue.slurm_state(job, {"41": queue.Queued("RUNNING")}) == "RUNNING"  # squeue first


@pytest.mark.slurm
@pytest.mark.slow
def test_repeats_array_on_the_local_slurm_cluster(slurm_cluster, tiny_config, tmp_path):
    from tests.test_slurm_launch import submit, wait_until

    base = tmp_path / "array"
    res = submit("--nodes", 1, "--repeats", 2, "--time", 10, "--config", tiny_config, "--run-dir", base)
    assert res.returncode == 0, res.stdout
    ids = [jobs.read_record(base / f"repeat_{r}")["jobs"][0]["job_id"] for r in range(2)]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]

    def table() -> dict[str, run_status.RunStatus]:
        return {r.run: r for r in run_status.collect([base])}

    seen = table()  # both tasks listed at once, from squeue, before either has written a config
    assert sorted(seen) == ["repeat_0", "repeat_1"]
    assert {seen[f"repeat_{r}"].job_id for r in range(2)} == set(ids)
    assert all(r.slurm in jobs.ACTIVE_STATES or r.slurm == "COMPLETED" for r in seen.values()), seen
    # DONE is written by the job's last step, the job ends a moment later
    wait_until(lambda: all(r.done and r.slurm == "COMPLETED" for r in table().values()), "both repeats to finish")
    final = table()
    for r in range(2):
        row = final[f"repeat_{r}"]
        assert row.repeat == r and row.phase == "done" and row.epochs_done == 3 and row.eta_s == 0
    text = status.format_table(list(final.values()))
    assert f"({array}_0)" in text and f"({array}_1)" in text and text.endswith("2 runs, 2 done")


# ====================================================================== one bad run, one row


def _copy_finished(runs: Path, dest: Path) -> Path:
    shutil.copytree(runs / "finished", dest)
    return dest


def test_a_damaged_run_is_one_row_with_its_problem(runs, tmp_path, capsys):
    base = tmp_path / "sweep"
    _copy_finished(runs, base / "good")
    cut = _copy_finished(runs, base / "cut_config")  # cut at a line end: it still parses, defaults fill in
    text = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(text[: text.index("\ntrain:") + 1])
    mid_line = _copy_finished(runs, base / "cut_mid_line")
    (mid_line / "config.yaml").write_text(text[: len(text) - 7])
    invalid = _copy_finished(runs, base / "invalid_config")
    (invalid / "config.yaml").write_text("model: [unclosed\n")
    (_copy_finished(runs, base / "no_config") / "config.yaml").unlink()
    corrupt = _copy_finished(runs, base / "corrupt_jobs")
    jobs.record_job(corrupt, "4242", "slurm", str(corrupt / "slurm" / "4242_0_log.out"))
    (corrupt / "jobs.json").write_text((corrupt / "jobs.json").read_text()[:40])

    assert status.main([str(base)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""
    lines = captured.out.splitlines()
    assert lines[-1] == "6 runs, 2 done, 5 with a note"
    rows = {r.run: r for r in run_status.collect([base])}
    assert sorted(rows) == ["corrupt_jobs", "cut_config", "cut_mid_line", "good", "invalid_config", "no_config"]

    assert rows["good"].done and rows["good"].epochs_done == 3 and not rows["good"].note
    assert rows["no_config"].note.startswith("config.yaml is missing: its variant, epochs, eta and DONE are not shown")
    for name in ("cut_config", "cut_mid_line", "invalid_config", "no_config"):
        row = rows[name]
        # nothing from defaults: no 800-epoch target, pretrain phase or eta; the checkpoint's facts stay
        assert row.epochs_target is None and row.eta_s is None and row.variant == "?" and not row.done, row
        assert row.checkpoint == rows["good"].checkpoint and row.phase == "joint"
        assert "submit again with the --config the run was started with" in row.note
    assert rows["cut_config"].note.startswith("config.yaml is truncated (it ends before train.")
    assert rows["cut_mid_line"].note.startswith("config.yaml is truncated (its last line is cut off)")
    assert rows["invalid_config"].note.startswith("config.yaml is invalid (config file")
    assert "\n" not in rows["invalid_config"].note  # YAML's multi-line error on the note's one line
    # a corrupt jobs.json hides only the job: the rest of the row is read and it is DONE
    assert rows["corrupt_jobs"].done and rows["corrupt_jobs"].job_id is None
    assert rows["corrupt_jobs"].note.startswith("jobs.json is corrupt (not JSON")
    assert "move the file aside" in rows["corrupt_jobs"].note
    notes = [line for line in lines if line.startswith("note ")]
    assert [n.split(":")[0] for n in notes] == \
        ["note corrupt_jobs", "note cut_config", "note cut_mid_line", "note invalid_config", "note no_config"]

    (corrupt / "jobs.json").write_text(json.dumps({"jobs": [{"id": 1}], "events": []}))
    assert run_status.collect([corrupt])[0].note.startswith("jobs.json is corrupt (not the record launch/submit.py")


def status_as_reader(paths: list[Path]) -> tuple[int, str]:
    """launch/status.py's main as a user the runs' owner did not open them to: as root, a second
    user (:func:`conftest.as_second_user`); otherwise as this user, for whom the test closed them
    (mode 0)."""
    if os.geteuid() != 0:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = status.main([str(p) for p in paths])
        return code, out.getvalue()
    run_status.collect(paths)  # imports everything the reading needs, while they can be read
    return as_second_user(lambda: status.main([str(p) for p in paths]))


def test_runs_another_user_may_not_read_are_rows_naming_file_and_permission(runs):
    as_root = os.geteuid() == 0
    file_mode, dir_mode = (0o600, 0o700) if as_root else (0, 0)  # root's files are closed to the reader
    base = Path(tempfile.mkdtemp(prefix="masan-status-", dir="/tmp"))  # others may enter it
    try:
        base.chmod(0o755)
        for name in ("good", "files_closed", "folder_closed"):
            _copy_finished(runs, base / name)
            for path in [base / name, *(base / name).rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        for path in (base / "files_closed").rglob("*"):  # 755 folders, every file closed
            if path.is_file():
                path.chmod(file_mode)
        (base / "folder_closed").chmod(dir_mode)

        code, out = status_as_reader([base])
        assert code == 0 and "Traceback" not in out, out
        lines = out.splitlines()
        assert lines[-1] == "3 runs, 1 done, 2 with a note", out
        assert [line.split()[0] for line in lines[1:4]] == ["files_closed", "folder_closed", "good"]
        assert lines[3].rstrip().endswith("DONE")
        note = {line.split(":")[0][len("note "):]: line for line in lines if line.startswith("note ")}
        who = pwd.getpwuid(os.geteuid()).pw_name
        ckpt = run_status.collect([base / "good"])[0].checkpoint
        assert f"cannot read config.yaml (mode {file_mode:o}, owner {who})" in note["files_closed"]
        assert f"checkpoints/{ckpt}/COMPLETE (mode {file_mode:o}" in note["files_closed"]
        assert "progress.json" in note["files_closed"] and "permission denied for" in note["files_closed"]
        assert "chmod -R g+rX" in note["files_closed"]
        assert f"cannot read this folder (mode {dir_mode:o}, owner {who})" in note["folder_closed"]
        assert "it may hold runs not listed here" in note["folder_closed"]
    finally:
        for path in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(base, ignore_errors=True)


def test_a_resumed_runs_tensorboard_log_is_read_without_noise(tmp_path, caplog):
    from tensorboard.util import tb_logging
    from torch.utils.tensorboard import SummaryWriter

    from masan.config import load_config, save_config

    run = tmp_path / "resumed"
    save_config(load_config(None, [f"run_dir={run}", "train.pretrain_epochs=1", "train.joint_epochs=1"]),
                run / "config.yaml")
    with SummaryWriter(str(run / "tb")) as w:  # the first start, killed after step 10
        for step in range(1, 11):
            w.add_scalar(run_status.EPOCH_TAG, step / 10, step, walltime=1000 + step)
    with SummaryWriter(str(run / "tb"), purge_step=6) as w:  # resumed from its step-5 checkpoint, as TrainLogger does
        for step in range(6, 9):
            w.add_scalar(run_status.EPOCH_TAG, step / 10, step, walltime=2000 + step)

    (row,) = run_status.collect([run])
    assert (row.step, row.epochs_done, row.phase) == (8, pytest.approx(0.8), "pretrain")
    assert not [r for r in caplog.records if "out of order" in r.getMessage()]
    tb_logging.get_logger().warning("any other TensorBoard warning")  # the filter is that narrow
    assert [r.getMessage() for r in caplog.records] == ["any other TensorBoard warning"]


def test_progress_json_keeps_the_last_intervals_and_a_resume_starts_them_afresh(tmp_path):
    """status reads progress.json, not every TensorBoard event: it must say what the events say,
    a resumed run included (killed after step 20, resumed from its step-15 checkpoint), whose
    first interval must not be timed from the killed start's last (the downtime read as a slow
    step: an ETA minutes too long)."""
    from masan.config import load_config
    from masan.train.eta import ETA_INTERVALS
    from masan.train.logging import TrainLogger

    cfg = load_config(None, [])
    first = TrainLogger(tmp_path, cfg.log, enabled=True)
    for step in range(1, 21):
        first.progress(step, step / 10, 1.0 / step)
    first.close()
    logged = run_status._logged(tmp_path)
    assert [e.step for e in logged[run_status.EPOCH_TAG]] == list(range(20 - ETA_INTERVALS, 21))
    assert (logged[run_status.LOSS_TAG][-1].step, logged[run_status.LOSS_TAG][-1].value) == (20, 1.0 / 20)
    resumed = TrainLogger(tmp_path, cfg.log, enabled=True, purge_step=16)
    resumed.progress(17, 1.7, 0.5)
    assert [e.step for e in run_status._logged(tmp_path)[run_status.EPOCH_TAG]] == [17]
    resumed.progress(18, 1.8, 0.5)
    resumed.close()
    assert [e.step for e in run_status._logged(tmp_path)[run_status.EPOCH_TAG]] == [17, 18]
    assert not TrainLogger(tmp_path / "rank1", cfg.log, enabled=False).progress(1, 0.1, 1.0)
    assert not (tmp_path / "rank1").exists()
    blocked = TrainLogger(tmp_path / "gone", cfg.log, enabled=True)  # its folder is missing: the write fails
    blocked.progress(1, 0.1, 1.0)
    blocked.progress(2, 0.2, 1.0)  # the training goes on, without the file


def test_a_start_that_logs_nothing_leaves_no_events_file(tmp_path):
    """A resumed run with no step left opens no events file (status would read an empty one);
    the first event opens it."""
    from masan.config import load_config
    from masan.train.logging import TrainLogger

    cfg = load_config(None, [])
    quiet = TrainLogger(tmp_path, cfg.log, enabled=True, purge_step=6)
    quiet.close()
    assert not (tmp_path / "tb").exists()
    logger = TrainLogger(tmp_path, cfg.log, enabled=True)
    logger.scalars({"loss": 1.0}, step=1)
    logger.close()
    assert [p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir()] == [True]


def test_runs_are_listed_in_natural_order(tmp_path):
    """repeat_10 sorted before repeat_2 as strings: a table of ten repeats read out of order."""
    for name in ("repeat_10", "repeat_2", "repeat_1", "b/repeat_3", "a10", "a9"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / run_status.RUN_MARKERS[0]).write_text("{}")
    found = [str(run.relative_to(tmp_path)) for _, run, _ in run_status.find_runs([tmp_path])]
    assert found == ["a9", "a10", "b/repeat_3", "repeat_1", "repeat_2", "repeat_10"]


# ====================================================================== a job that can never start


def test_a_pending_job_shows_slurms_reason_and_one_that_never_starts_the_fix(tmp_path):
    run = tmp_path / "repeat_0"
    jobs.record_job(run, "77", "slurm", str(run / "slurm" / "77_0_log.out"))
    waits = run_status.run_status(tmp_path, run, {"77": queue.Queued("PENDING", "Priority")})
    assert (waits.slurm, waits.reason, waits.note) == ("PENDING", "Priority", "")
    assert "PENDING (77, Priority)" in status.row_cells(waits)
    never = run_status.run_status(tmp_path, run, {"77": queue.Queued("PENDING", "PartitionNodeLimit")})
    assert never.note.startswith("job 77 can never start as submitted (PartitionNodeLimit)")
    assert "fewer --nodes" in never.note and "scancel 77" in never.note
    assert queue.never_starts("QOSMaxNodePerJobLimit") and not queue.never_starts("Resources")
    running = run_status.run_status(tmp_path, run, {"77": queue.Queued("RUNNING", "None")})
    assert "RUNNING (77)" in status.row_cells(running) and running.reason is None


def test_a_slurm_job_that_ended_before_its_run_says_why_and_how_to_resume(tmp_path):
    """SLURM calls a job that exited 0 COMPLETED, also one that stopped with a checkpoint; and a
    refused or diverged job FAILED, which a resubmission cannot cure."""
    run = tmp_path / "run"
    for jid in ("81", "82", "83", "84"):
        jobs.record_job(run, jid, "slurm", str(run / "slurm" / f"{jid}_0_log.out"))
        if jid == "81":  # asked for at a time limit: counted while the job waits to start again
            jobs.record_event(run, jid, "requeued", step=20, restarts=1)
        if jid == "82":
            jobs.record_event(run, jid, jobs.REQUEUES_SPENT, step=40, restarts=3)
        if jid == "83":
            jobs.record_event(run, jid, jobs.DIVERGED, error="the joint loss is not finite at step 12 on rank 0")
        if jid == "84":
            jobs.record_event(run, jid, jobs.REFUSED, error="optim.micro_batch=64 is larger than the training part")
        done = {"81": "COMPLETED", "82": "COMPLETED", "83": "FAILED", "84": "FAILED"}[jid]
        row = run_status.run_status(tmp_path, run, {jid: queue.Queued(done)})
        assert row.requeues == 1, row  # the run's requeues so far, job 81's among them
        assert row.eta_s is None, row
        if jid == "81":
            assert row.note.startswith("job 81 ended before the run finished: it stopped on request (a STOP file)")
        if jid == "82":
            assert row.note.startswith("job 82 ended before the run finished: its --max-requeues were used up")
        if jid == "83":
            assert row.note == "job 83 diverged: the joint loss is not finite at step 12 on rank 0"
        if jid == "84":
            assert row.note == "job 84 refused: optim.micro_batch=64 is larger than the training part"


def test_a_running_job_that_stopped_logging_gets_a_note_and_a_pending_ones_eta_waits(runs, tmp_path):
    """A rank stuck outside a collective (a hung file system) holds its allocation until the time
    limit: status says so once the run has been silent far longer than its logging interval and
    its collective timeout. A pending job's eta is the training left once it starts."""
    run = tmp_path / "repeat_1"
    shutil.copytree(runs / "sweep" / "repeat_1", run)
    (run / "jobs.json").unlink()
    jobs.record_job(run, "91", "slurm", str(run / "slurm" / "91_0_log.out"))
    last = run_status._logged(run)[run_status.EPOCH_TAG][-1].wall_time
    running = {"91": queue.Queued("RUNNING", "None")}
    live = run_status.run_status(tmp_path, run, running, now=last + 60)
    assert live.note == "" and live.logged_age_s == pytest.approx(60)
    hung = run_status.run_status(tmp_path, run, running, now=last + 3 * 3600)
    assert hung.note.startswith("no step logged for 3h00m (it logged every ") and "scancel 91" in hung.note
    pending = run_status.run_status(tmp_path, run, {"91": queue.Queued("PENDING", "Priority")}, now=last + 3 * 3600)
    assert pending.note == "" and pending.eta_s > 0 and status.eta_text(pending).endswith("+wait")
    assert not status.eta_text(hung).endswith("+wait")
    # started again (its lock rewritten) and not logged yet: it may still be loading its data
    os.utime(run / "run.lock", (last + 100, last + 100))
    assert run_status.run_status(tmp_path, run, running, now=last + 3 * 3600).note == ""


def test_a_failed_job_names_the_logs_that_hold_its_error(tmp_path):
    """A frozen rank 0 leaves no error in its own log: the collective timeout is in rank 1's."""
    import pickle

    run = tmp_path / "repeat_0"
    folder = run / "slurm"
    jobs.record_job(run, "78", "slurm", str(folder / "78_0_log.out"))
    folder.mkdir()
    (folder / "78_0_result.pkl").write_bytes(pickle.dumps(("error", "Traceback ...: DistBackendError")))
    (folder / "78_0_log.out").write_text("step 40: loss 0.3\n")
    (folder / "78_1_log.out").write_text("Traceback (most recent call last):\n...Timed out waiting 60000ms\n")
    failed = run_status.run_status(tmp_path, run, None)
    assert failed.slurm == "FAILED" and failed.note == f"job 78 ended FAILED: see {folder / '78_1_log.out'}"


def test_a_live_train_local_run_shows_running_and_a_killed_one_does_not(tmp_path):
    """launch/train_local.py keeps no job record; its rank 0 holds run.lock while it lives."""
    from masan.train.runlock import RunLock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from masan.train.runlock import RunLock; "
                               f"RunLock({str(run)!r}).take(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_status.run_status(tmp_path, run, {}).slurm == "RUNNING (local)"
    finally:
        holder.kill()
        holder.wait()
    assert run_status.run_status(tmp_path, run, {}).slurm == "-"  # killed: the kernel dropped its lock
    lock = RunLock(run)
    assert lock.take_existing()  # and the next start takes it
    lock.release()


SINFO = """debug*|2|(null)|infinite|1-infinite|idle
gpu|3|gpu:a100:4(S:0-1)|1-00:00:00|1-2|mixed
gpu|1|gpu:a100:4(S:0-1)|1-00:00:00|1-2|down*
big|4|gpu:8,shard:2|4:00:00|infinite|drained
"""


def test_partition_check_refuses_what_can_never_start_and_warns_what_waits():
    groups = partition.parse_sinfo(SINFO + "a line sinfo would not write\n")
    assert [(g.partition, g.default, g.nodes, g.gpus, g.time_limit_min, g.max_job_nodes, g.up) for g in groups] == [
        ("debug", True, 2, 0, None, None, True), ("gpu", False, 3, 4, 1440, 2, True),
        ("gpu", False, 1, 4, 1440, 2, False), ("big", False, 4, 8, 240, None, False)]
    # one GRES parser for the partition check and the default --gpus-per-node: a socket list's
    # comma does not split the entry
    assert [jobs.gres_gpus(g) for g in ("gpu:h100:8(S:0,1)", "shard:2,gpu:4", "(null)", "gpu:a100")] == [8, 4, 0, 0]

    def fit(**given):
        return partition.partition_fit(groups, Resources(**{"time_min": 60, **given}))

    assert fit(nodes=2) == ([], [])  # the default partition
    assert fit(nodes=4) == (["--nodes 4: partition debug has 2 node(s) in all; use --nodes 2 or less"], [])
    never, _ = fit(nodes=2, partition="gpu", gpus_per_node=8, time_min=2000)
    assert never == ["--time 1-09:20:00 is above partition gpu's time limit 1-00:00:00; use --time 1-00:00:00 "
                     "or less", "--gpus-per-node 8: partition gpu's nodes have at most 4 GPU(s); use "
                     "--gpus-per-node 4 or less (one rank per GPU) and more --nodes"]
    assert fit(nodes=3, partition="gpu", gpus_per_node=4)[0] == \
        ["--nodes 3 is above partition gpu's limit of 2 node(s) per job; use --nodes 2 or less"]
    never, waits = fit(nodes=2, partition="big", gpus_per_node=8)  # drained nodes may come back
    assert never == [] and waits[0].startswith("partition big has 4 node(s) with 8 GPU(s) each but only 0 can")
    assert fit(partition="nope,debug") == ([], [])  # a list fits when one of them does
    assert fit(partition="nope")[0] == \
        ["partition 'nope' does not exist (sinfo lists big, debug, gpu); use --partition with one of those"]


@pytest.mark.slurm
def test_on_the_local_cluster_submit_refuses_too_many_nodes_and_status_shows_why_a_job_waits(
        slurm_cluster, tiny_config, tmp_path):
    from tests.test_slurm_launch import SUBMIT, wait_until

    run = tmp_path / "too_big"
    res = subprocess.run([sys.executable, str(SUBMIT), "--nodes", "4", "--time", "10", "--config", str(tiny_config),
                          "--run-dir", str(run)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--nodes 4: partition debug has 2 node(s) in all; use --nodes 2 or less" in res.stderr
    assert not (run / "jobs.json").exists()  # nothing submitted

    # what it used to leave behind: a job SLURM accepts and keeps pending, as sbatch does
    sb = subprocess.run(["sbatch", "--parsable", "--nodes", "4", "--time", "1", "-o", "/dev/null", "--wrap", "true"],
                        capture_output=True, text=True, timeout=60, check=True)
    jid = sb.stdout.strip().split(";")[0]
    try:
        jobs.record_job(run, jid, "slurm", "(sbatch)")
        # the reason is PartitionConfig until the scheduler's first pass over the job
        wait_until(lambda: run_status.collect([run])[0].reason == "PartitionNodeLimit", "the scheduler's reason",
                   timeout=60)
        (row,) = run_status.collect([run])
        assert row.slurm == "PENDING" and f"PENDING ({jid}, PartitionNodeLimit)" in status.format_table([row])
        assert f"job {jid} can never start as submitted (PartitionNodeLimit)" in row.note
    finally:
        subprocess.run(["scancel", jid], capture_output=True, check=False)


# ====================================================================== local runs: the lock, ends, epochs


def _hold_lock(run: Path, **env: str) -> subprocess.Popen:
    """A process holding ``run``'s run.lock, as a live run's rank 0 does (``env``: e.g. a SLURM job's)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from masan.train.runlock import RunLock; "
                               f"RunLock({str(run)!r}).take(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert holder.stdout.readline().strip() == "held"
    return holder


def _ended_pid() -> str:
    """The pid of a local run that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


def test_a_live_run_lock_holder_shows_running_whatever_jobs_json_says(tmp_path):
    """A refused submit.py used to leave the newest jobs.json entry in a live run's folder, and
    the table then called the live run ended."""
    run = tmp_path / "run"
    refused = _ended_pid()
    jobs.record_job(run, refused, "local", "(this terminal)")
    jobs.record_event(run, refused, jobs.EXITED, code=jobs.EXIT_REFUSED)
    holder = _hold_lock(run)
    try:
        row = run_status.run_status(tmp_path, run, {})
        assert (row.slurm, row.job_id, row.note) == ("RUNNING (local)", str(holder.pid), "")
    finally:
        holder.kill()
        holder.wait()
    row = run_status.run_status(tmp_path, run, {})
    assert row.slurm == "ended (local)"
    assert row.note.startswith(f"local run {refused} was refused (exit 2: a config, resume or run-directory error")

    # a SLURM job's rank 0 on this host holds the lock too: its row keeps SLURM's state and job
    jobs.record_job(run, "77", "slurm", str(run / "slurm" / "77_0_log.out"))
    holder = _hold_lock(run, SLURM_JOB_ID="77")
    try:
        row = run_status.run_status(tmp_path, run, {"77": queue.Queued("RUNNING", "None")})
        assert (row.slurm, row.job_id) == ("RUNNING", "77")
    finally:
        holder.kill()
        holder.wait()


def test_a_local_run_that_ended_in_failure_gets_a_note_and_its_restarts_count(tmp_path):
    run = tmp_path / "run"
    crashed, again = _ended_pid(), _ended_pid()
    jobs.record_job(run, crashed, "local", "(this terminal)")
    jobs.record_event(run, crashed, jobs.EXITED, code=1)
    jobs.record_job(run, again, "local", "(this terminal)")
    jobs.record_restart(run, again, after=crashed, restart=1, code=1)
    jobs.record_event(run, again, jobs.EXITED, code=-9)
    row = run_status.run_status(tmp_path, run, {})
    assert (row.slurm, row.restarts) == ("ended (local)", 1)
    assert row.note == (f"local run {again} was killed by SIGKILL: its error is in the output of the command that "
                        "started it; run that command again to resume from the newest complete checkpoint")
    jobs.record_event(run, again, jobs.EXITED, code=0)  # stopped on request, or finished: nothing to say
    assert run_status.run_status(tmp_path, run, {}).note == ""


def test_a_local_run_whose_launcher_was_killed_or_that_finished_gets_the_right_note(tmp_path, tiny_config):
    """kill -9 of submit.py left no exit status and no note; a Ctrl-C as the run finished left
    'killed by SIGINT: run that command again' beside its DONE, for good."""
    from masan.config import config_to_dict, load_config, save_config
    from masan.rundir import done_target

    run = tmp_path / "run"
    killed = _ended_pid()
    jobs.record_job(run, killed, "local", "(this terminal)")
    row = run_status.run_status(tmp_path, run, {})
    assert row.slurm == "ended (local)" and "ended without recording how" in row.note, row.note
    jobs.record_event(run, killed, jobs.EXITED, code=-2)
    cfg = load_config(tiny_config, [f"run_dir={run}"])
    save_config(cfg, run / "config.yaml")
    (run / "DONE").write_text(json.dumps({"step": 21, "epochs_done": sum(cfg.epochs.values()),
                                          "target": done_target(cfg), "config": config_to_dict(cfg)}))
    row = run_status.run_status(tmp_path, run, {})
    assert "SIGINT" not in row.note and "again" not in row.note, row.note
    elsewhere = tmp_path / "elsewhere"  # started on another node of a shared file system: maybe still running
    jobs.record_job(elsewhere, str(os.getpid()), "local", "(this terminal)", host="computenode-17")
    row = run_status.run_status(tmp_path, elsewhere, {})
    assert "started on host computenode-17: only there" in row.note and "killed" not in row.note, row.note


def test_epochs_show_one_decimal_rounded_down():
    """A stop mid-epoch used to show 31.57/201 beside 3/3; and no unfinished run may look done."""
    def cell(done, target):
        st = run_status.RunStatus(run="r", path="r", epochs_done=done, epochs_target=target)
        return status.row_cells(st)[status.COLUMNS.index("epoch")]

    assert [cell(31.571428, 201), cell(2.96, 3), cell(3, 3), cell(0.3, 3), cell(None, 3)] == \
        ["31.5/201", "2.9/3", "3.0/3", "0.3/3", "-/3"]


def test_a_run_ended_by_max_steps_is_not_shown_done(runs, tmp_path):
    """DONE also records a run that train.max_steps ended early; predict and evaluate call it
    unfinished, so status must not count it done."""
    from masan.config import load_config, save_config
    from masan.rundir import RunDir

    run = _copy_finished(runs, tmp_path / "capped")
    cfg = load_config(run / "config.yaml", ["train.max_steps=4"])
    save_config(cfg, run / "config.yaml")
    RunDir(run).mark_done(cfg, step=4, epochs_done=1)
    (row,) = run_status.collect([run])
    assert not row.done and row.phase == "max_steps" and row.eta_s == 0 and row.epochs_done == 1
    assert row.note.startswith("ended at train.max_steps=4 after 1 of 3 epochs: predict and evaluate take it as "
                               "unfinished"), row.note
