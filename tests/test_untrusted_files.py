"""Files that a colleague with write access to a shared folder, a damaged copy or an unusual
checkout may have put where the tools look: a table row naming a path, a link in place of a
file or folder, a pipe in /dev/shm. Nothing the tools delete, overwrite or open reaches outside
the folder it belongs to, and no run waits forever on such a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import as_second_user, second_user
from masan import access
from masan.config import ConfigError
from masan.evaluate.report_folder import MANIFEST_NAME, ReportFolder
from masan.store.cohort import CohortStore, StoreError
from masan.train.runlock import RunLock
from test_data_convert import ROOT, _synth, to_zarr


def _add_row(store: Path, subject: str) -> None:
    """Edit a row naming ``subject`` into the store's cohort table (a copy of the first row)."""
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    rows = doc["attributes"]["cohort"]
    rows.append(dict(rows[0], subject=subject))
    meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("subject", ["../../victim", "."])
def test_a_table_row_naming_a_path_is_refused_and_prune_deletes_nothing(tmp_path, capsys, subject):
    """--prune removed subjects/<id> for a row the input no longer lists: '../../victim' deleted
    a folder beside the store, '.' every subject's data."""
    bids = _synth(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    args = ["--bids", str(bids), "--out", str(out), "--no-progress"]
    assert to_zarr.main(args) == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("mine")
    _add_row(out, subject)
    assert to_zarr.main([*args, "--prune"]) == 2
    assert "its cohort table has a row whose subject is" in capsys.readouterr().err
    assert (victim / "data.txt").read_text() == "mine"
    assert len(list((out / "subjects").iterdir())) == 5  # four subjects and the group's zarr.json
    with pytest.raises(StoreError, match="the table was edited or damaged"):
        CohortStore(out).label("sub-001")


def test_a_subject_linked_in_from_outside_the_store_is_not_read(tmp_path):
    """Outputs follow the access of the store's root: a version folder linked to another (closed)
    store's put that store's images into a QC report as open as this one."""
    bids = _synth(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0
    closed = Path(shutil.copytree(out, tmp_path / "closed.zarr"))
    version = Path(CohortStore(out).group_path("sub-001")).name
    shutil.rmtree(out / "subjects" / "sub-001" / version)
    (out / "subjects" / "sub-001" / version).symlink_to(closed / "subjects" / "sub-001" / version)
    store = CohortStore(out)
    with pytest.raises(StoreError, match="outside the store"):
        store.read_t1("sub-001")
    assert store.read_t1("sub-002").shape == (16, 16, 16)


def test_an_output_folder_given_as_a_link_is_closed_like_the_folder_itself(tmp_path):
    """tighten skipped a root that is a symbolic link: the store, report or run directory behind
    `--out link` stayed as open as it was while the tool said it was closed."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "f").write_text("x")
    os.chmod(real, 0o755)
    os.chmod(real / "sub", 0o755)
    os.chmod(real / "sub" / "f", 0o644)
    link = tmp_path / "link"
    link.symlink_to("real")
    assert access.more_open_than(link, 0o600)
    access.tighten(link, 0o600)
    assert not access.more_open_than(link, 0o600)
    assert oct((real / "sub" / "f").stat().st_mode & 0o777) == oct(0o600)
    assert oct(real.stat().st_mode & 0o777) == oct(0o700)


def test_a_report_subfolder_replaced_by_a_link_loses_nothing_elsewhere(tmp_path):
    """The list of an earlier report's files is followed to remove what a new report no longer
    writes: through a figures/ that is a link it deleted files outside the report folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    report = tmp_path / "report"
    report.mkdir()
    (report / "figures").symlink_to(elsewhere)
    (report / "old.png").write_text("old")
    (report / MANIFEST_NAME).write_text(json.dumps(["figures/notes.txt", "old.png"]))
    folder = ReportFolder(report)
    folder.begin()
    removed = folder.finish()
    assert removed == [report / "old.png"]
    assert (elsewhere / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("take", ["take", "take_existing"])
def test_a_run_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, take):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="is not a plain file"):
        getattr(RunLock(run), take)()
    assert victim.read_text() == "mine"
    (run / "run.lock").unlink()
    os.mkfifo(run / "run.lock")
    with pytest.raises(ConfigError, match="is not a plain file"):
        RunLock(run).take()


def test_a_pipe_planted_in_the_shared_cache_folder_does_not_hang_a_start(tmp_path):
    """/dev/shm is writable by every user: a folder named like a cache with a pipe as its owner
    file blocked every data.cache=host start of the node in the sweep of stale caches."""
    planted = tmp_path / "masan-cache-planted"
    planted.mkdir()
    os.mkfifo(planted / "owner")
    other = tmp_path / "masan-cache-linked"
    other.mkdir()
    (other / "owner").symlink_to(planted / "owner")
    code = ("import sys; from pathlib import Path; from masan.data.cache import sweep_stale; "
            "print(sweep_stale(Path(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert planted.is_dir() and other.is_dir()


def test_the_job_script_sources_the_cluster_environment_from_a_path_with_spaces(tmp_path, monkeypatch):
    """Unquoted, `source /x/my proj/...` failed and the job trained on without its environment."""
    from launch.slurm import submission
    from launch.slurm.plan import Resources

    env = tmp_path / "my proj $(touch pwned)" / "cluster_env.sh"
    env.parent.mkdir()
    env.write_text("export MASAN_ENV_READ=yes\n")
    monkeypatch.setattr(submission, "ENV_SCRIPT", env)
    ex = submission.make_executor(tmp_path / "logs", Resources(), max_requeues=0)
    text = ex._make_submission_file_text("echo run", "uid")
    line = next(x for x in text.splitlines() if "cluster_env.sh" in x)
    shown = subprocess.run(["bash", "-c", f"{line}\necho $MASAN_ENV_READ"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert shown.stdout.strip() == "yes", (line, shown.stderr)
    assert not (tmp_path / "pwned").exists()
    env.unlink()
    gone = subprocess.run(["bash", "-c", f"{line}\necho trained"], capture_output=True, text=True, cwd=tmp_path)
    assert gone.returncode != 0 and "trained" not in gone.stdout
    shutil.rmtree(env.parent)


@pytest.fixture
def shared(tmp_path):
    """A folder outside pytest's (which only root may enter) that a second user may reach."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as a second user")
    top = Path(tempfile.mkdtemp(prefix="masan-shared-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_group_members_files_are_left_as_they_are_when_closed_enough(shared):
    """A resume of a colleague's run chmod-ed their files back to the run's mode (DeepSpeed gives
    its zero_to_fp32.py an owner x bit at every save) and crashed on every start: only the owner
    may chmod."""
    _, gid = second_user()
    run = shared / "run"
    (run / "checkpoints").mkdir(parents=True)
    script = run / "checkpoints" / "zero_to_fp32.py"
    script.write_text("")
    for path, mode in ((run, 0o2770), (run / "checkpoints", 0o2770), (script, 0o760)):
        os.chown(path, 0, gid)
        path.chmod(mode)
    code, out = as_second_user(lambda: access.tighten(run, 0o660, gid) and 0)
    assert code == 0, out
    assert script.stat().st_mode & 0o777 == 0o760
    script.chmod(0o764)  # readable by every user: not the run's to leave so, and not ours to change
    code, out = as_second_user(lambda: access.tighten(run, 0o660, gid) and 0)
    assert code != 0 and "belongs to root and is more open than" in out and "AccessError" in out, out


def test_sources_any_user_may_write_give_outputs_only_their_owner_and_group_may(tmp_path):
    """Files copied from a CIFS share or an archive come as 666: a store, run directory or
    checkpoint as open would let any user of the node change labels or swap a checkpoint."""
    source, shared_only = tmp_path / "t1.nii.gz", tmp_path / "bold.nii.gz"
    for path, mode in ((source, 0o666), (shared_only, 0o664)):
        path.write_text("")
        path.chmod(mode)
    tmp_path.chmod(0o777)
    assert access.restrictive_mode([source]) == access.restrictive_mode([shared_only])  # reading stays as shared
    assert access.restrictive_mode([source])[0] & 0o002 == 0
    tmp_path.chmod(0o700)


def test_a_group_members_live_local_run_counts_as_running(shared):
    """Signalling another user's process is refused: that meant dead, and a second submission
    queued behind a colleague's live run (to be refused at its start, after its wait)."""
    import socket

    from launch.slurm import jobs

    job = {"job_id": str(os.getpid()), "host": socket.gethostname()}
    code, out = as_second_user(lambda: 0 if jobs._local_alive(job) else 1)
    assert code == 0, out


def test_the_run_lock_records_its_start_with_the_time_zone(tmp_path):
    """Written without its offset, a user in another zone read a stop as older or newer than the
    start and status got a stopped run wrong."""
    from datetime import datetime

    from masan.train.runlock import holder_record

    lock = RunLock(tmp_path)
    lock.take()
    since = datetime.fromisoformat(holder_record(tmp_path / "run.lock")["since"])
    assert since.tzinfo is not None


def test_a_path_behind_a_folder_closed_to_the_user_is_one_line_naming_it(shared):
    """pathlib raises on a folder the user may not enter: every tool ended in a traceback."""
    from data_tools import inspect_store
    from launch import status
    from masan.evaluate import __main__ as evaluate

    closed = shared / "alice"
    (closed / "runs" / "r1").mkdir(parents=True)
    closed.chmod(0o700)
    mine = shared / "bob"
    mine.mkdir(mode=0o777)
    mine.chmod(0o777)
    for main, args in ((status.main, [str(closed / "runs")]),
                       (evaluate.main, [str(closed / "runs" / "r1"), "--out", str(mine / "report")]),
                       (inspect_store.main, [str(closed / "c.zarr")])):
        code, out = as_second_user(lambda main=main, args=args: main(args))
        assert code == 2 and "Traceback" not in out, out
        assert f"{closed} (owner root, group root, mode 700) is not open to you" in out, out


def test_a_file_system_without_locks_is_named_and_a_submission_goes_on(tmp_path, monkeypatch, capsys, caplog):
    """NFS without its lock daemon, Lustre without -o flock: to_zarr said the disk could not be
    written (it could), and submit.py crashed with a traceback after printing its plan."""
    import errno
    import fcntl

    from launch.slurm import jobs

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    bids = _synth(tmp_path, n=1)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert to_zarr.main(["--bids", str(bids), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot lock files (flock: No locks available)" in err and "reading a store needs no lock" in err, err
    with jobs._record_lock(tmp_path / "run"):
        pass
    assert "cannot lock files" in caplog.text


def test_a_run_dir_of_a_colleague_names_its_owner_not_chmod(shared):
    """'chmod u+wx' cannot help a user who does not own the folder."""
    from masan.train.run import check_writable

    run = shared / "alice-run"
    run.mkdir(mode=0o755)

    def start() -> int:
        try:
            check_writable(run)
        except ConfigError as e:
            print(e)
            return 2
        return 0

    code, out = as_second_user(start)
    assert code == 2 and "it belongs to root: choose a run_dir=... in a folder you may write" in out, out
