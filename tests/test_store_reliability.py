"""Issue 12, the store half: races, killed parents and workers, silent corruption, readers under
reconversion, input that is missing rather than bad, run-directory nesting and access rights.

Every scenario runs on real stores on disk and real processes (tiny phantom cohorts keep the
whole file within a few minutes on two cores).
"""

import gzip
import json
import logging
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tool import load_tool
from disks import fill, small_disk
from masan import access
from masan.config import load_config
from masan.convert import nifti
from masan.store.cohort import REPORT, STAGING, SUBJECTS, CohortStore, StoreError
from masan.synth.phantom import synthesize_cohort
from masan.train.run import store_contract
from processes import children, gone
from test_data_convert import write_manifest

pytestmark = pytest.mark.slow  # every test converts cohorts with killed and racing processes

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_per_class": {"NC": 1, "AD": 1}, "t1_shape": (12, 12, 12), "fmri_shape": (8, 8, 8), "frames": 4,
        "compresslevel": 1}
RACE_TRIALS = 20
KILL_TRIALS = 3
WORKER_KILL_TRIALS = 2  # each pays two pool start-ups (the rebuilt pool), ~15 s on two busy cores
BUSY = ("--fmri-shard-frames", "8", "--fmri-chunk-frames", "4")
"""Small shards: a busy run writes many slabs, so a kill lands mid-subject."""


_load = load_tool


to_zarr = _load("to_zarr")
inspect_store = _load("inspect_store")


def _tiny(folder, **kw):
    return synthesize_cohort(folder, **{**TINY, **kw})


def _args(bids, out, *more):
    return ["--bids", str(bids), "--out", str(out), "--no-progress", *more]


def _sources(bids, subject):
    t1 = np.asarray(nib.load(bids / subject / "anat" / f"{subject}_T1w.nii.gz").dataobj)
    bold = np.asarray(nib.load(bids / subject / "func" / f"{subject}_task-rest_bold.nii.gz").dataobj)
    return t1, np.moveaxis(bold, 3, 0)


def _exact(bids, out):
    """The store verifies, its table lists exactly the subject folders on disk, and every
    subject reads back as its source files."""
    assert inspect_store.main([str(out), "--verify"]) == 0
    store = CohortStore(out)
    on_disk = sorted(p.name for p in (out / SUBJECTS).iterdir() if p.is_dir())
    assert store.subjects == on_disk == sorted(p.name for p in bids.glob("sub-*"))
    for s in store.subjects:
        t1, bold = _sources(bids, s)
        assert np.array_equal(store.read_raw(s, "t1"), t1) and np.array_equal(store.read_raw(s, "fmri"), bold)
    return store


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# ====================================================================== 1. two converters, new store


def _main_at(args, start_at):
    """In a pool process: call to_zarr at a given instant (both racers start together);
    ``["--version"]`` only loads it (warm-up)."""
    main = _load("to_zarr").main
    time.sleep(max(start_at - time.time(), 0))
    return None if args == ["--version"] else main(args)


def test_concurrent_conversions_into_a_new_store_one_refuses(tmp_path, capfd):
    bids = _tiny(tmp_path / "bids", frames=24)
    outcomes = []
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as racers:
        list(racers.map(_main_at, [["--version"]] * 2, [time.time() + 3] * 2))  # both started and imported
        for trial in range(RACE_TRIALS):
            out = tmp_path / f"race{trial}.zarr"
            start = time.time() + 0.25
            futs = [racers.submit(_main_at, _args(bids, out), start) for _ in range(2)]
            rcs = sorted(f.result() for f in futs)
            outcomes.append(rcs)
            _exact(bids, out)
    err = capfd.readouterr().err
    assert outcomes == [[0, 2]] * RACE_TRIALS, outcomes  # one refused, the other completed
    assert "another conversion (pid" in err


# ====================================================================== 2/3. kill -9: parent, one worker


def _children(pid):
    """Live child processes of ``pid`` that are pool workers (not the resource tracker)."""
    out = []
    for child in children(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and b"spawn_main" in cmd:
            out.append(child)
    return out


def _start_busy(bids, out):
    """A 2-worker conversion, returned once both workers are converting (staging in use)."""
    cmd = [sys.executable, str(ROOT / "data_tools" / "to_zarr.py"), *_args(bids, out, "--workers", "2", *BUSY)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) == 2 and (out / STAGING).is_dir() and any((out / STAGING).iterdir()):
            return proc, workers
        time.sleep(0.01)
    raise AssertionError(f"conversion ended before it could be killed: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def busy_bids(tmp_path_factory):
    """Subjects big enough that a 2-worker run is still converting when killed."""
    return synthesize_cohort(tmp_path_factory.mktemp("busy") / "bids", {"NC": 2, "AD": 2}, t1_shape=(32, 32, 32),
                             fmri_shape=(24, 24, 24), frames=64, compresslevel=1)


def test_kill_parent_workers_die_and_rerun_is_correct(busy_bids, tmp_path):
    for trial in range(KILL_TRIALS):
        out = tmp_path / f"k{trial}.zarr"
        proc, workers = _start_busy(busy_bids, out)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must not go on alone
        proc.wait()
        assert all(map(gone, workers)), "workers outlived their killed parent"
        assert to_zarr.main(_args(busy_bids, out, *BUSY)) == 0  # correct on the first rerun
        _exact(busy_bids, out)


def test_kill_one_worker_fails_only_its_subject_and_run_goes_on(busy_bids, tmp_path):
    for trial in range(WORKER_KILL_TRIALS):
        out = tmp_path / f"w{trial}.zarr"
        proc, workers = _start_busy(busy_bids, out)
        os.kill(workers[0], signal.SIGKILL)  # like the OOM killer
        _, err = proc.communicate(timeout=120)
        report = json.loads((out / REPORT).read_text())  # always written
        assert "BrokenProcessPool" not in err.decode() and report["aborted"] is None
        done = set(report["converted"])
        failed = {f["subject"]: f["error"] for f in report["failed"]}
        assert proc.returncode == (1 if failed else 0)
        assert done | set(failed) == {p.name for p in busy_bids.glob("sub-*")} and len(failed) <= 1
        assert all("worker process converting it died" in e for e in failed.values())
        assert to_zarr.main(_args(busy_bids, out, *BUSY)) == 0
        assert sorted(CohortStore(out).report()["converted"]) == sorted(failed)  # only the lost one is redone
        _exact(busy_bids, out)


def test_subject_whose_worker_dies_alone_is_failed_by_name_and_redone_on_rerun(busy_bids, tmp_path):
    """Kill a worker, then kill the one-worker pool that reruns the suspects one at a time:
    the subject it held is the culprit (as an OOM subject would be), failed by name."""
    out = tmp_path / "twice.zarr"
    proc, first = _start_busy(busy_bids, out)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        fresh = [p for p in _children(proc.pid) if p not in first]
        if fresh:
            os.kill(fresh[0], signal.SIGKILL)  # the rebuilt pool's worker, holding one suspect alone
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    report = json.loads((out / REPORT).read_text())
    (failure,) = report["failed"]
    assert proc.returncode == 1 and "worker process converting it died" in failure["error"]
    assert failure["subject"] in err.decode() and len(report["converted"]) == 3
    assert to_zarr.main(_args(busy_bids, out, *BUSY)) == 0
    assert CohortStore(out).report()["converted"] == [failure["subject"]]
    _exact(busy_bids, out)


# ====================================================================== 4. gzip CRC / ISIZE


@pytest.mark.parametrize("where,what", [(-8, "CRC"), (-4, "length")])
def test_gzip_trailer_damage_is_refused_naming_the_file(tmp_path, where, what):
    bids = _tiny(tmp_path / "bids")
    bold = bids / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz"
    blob = bytearray(bold.read_bytes())
    blob[where] ^= 0xFF  # the stream still inflates; only the trailer disagrees
    bold.write_bytes(bytes(blob))
    with gzip.open(bold) as f:  # what nibabel's reader sees up to the end of the voxel data: fine
        f.read(352 + 8 * 8 * 8 * 4 * 2)
    with pytest.raises(nifti.NiftiError, match=f"{bold.name}.*{what}"):
        list(nifti.iter_frame_slabs(nifti.open_image(bold), 2))
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 1
    store = CohortStore(out)
    assert store.subjects == ["sub-001"]
    (fail,) = store.report()["failed"]
    assert fail["subject"] == "sub-002" and str(bold) in fail["error"] and "re-download" in fail["error"]


# ====================================================================== 5. reader under reconversion


def _reader(path, bids, stop, reads, result):
    """Read sub-001 over and over (one long-lived handle, as a DataLoader does, and fresh ones);
    count reads (``reads``, shared) and anything that is not the exact source (zeros, missing
    subject, errors)."""
    t1, bold = _sources(Path(bids), "sub-001")
    kept = CohortStore(path)
    bad = []
    while not stop.is_set():
        for store in (kept, CohortStore(path)):
            try:
                ok = (np.array_equal(store.read_raw("sub-001", "t1"), t1)
                      and np.array_equal(store.read_raw("sub-001", "fmri"), bold))
                if not ok:
                    bad.append("wrong voxels")
            except Exception as e:  # noqa: BLE001 - every failure is a finding here
                bad.append(f"{type(e).__name__}: {e}")
            with reads.get_lock():
                reads.value += 1
    result.put((bad[:5], len(bad)))


def test_reader_never_sees_a_missing_or_zeroed_subject_during_reconversions(tmp_path):
    bids = _tiny(tmp_path / "bids", frames=16)
    out = tmp_path / "s.zarr"
    args = _args(bids, out, "--fmri-shard-frames", "4", "--fmri-chunk-frames", "2")
    assert to_zarr.main(args) == 0
    ctx = mp.get_context("spawn")
    stop, reads, result = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(out), str(bids), stop, reads, result))
    reader.start()
    deadline = time.monotonic() + 300  # a loaded machine imports slowly: wait for reading, not a fixed time
    while reads.value == 0 and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    start, rounds = reads.value, 0
    # a changed option reconverts every subject; at least 8 rounds, and as many as it takes for
    # the reader to have read during them (it may get little CPU beside the converter)
    while rounds < 8 or (reads.value - start < 20 and rounds < 80):
        assert to_zarr.main(args + ["--clevel", str(1 + rounds % 2)]) == 0
        assert CohortStore(out).report()["converted"] == ["sub-001", "sub-002"]
        rounds += 1
    during = reads.value - start
    stop.set()
    examples, n_bad = result.get(timeout=60)
    reader.join(30)
    print(f"reader: {during} reads of sub-001 during {rounds} reconversions, {n_bad} wrong")
    assert n_bad == 0, examples
    assert during >= 20
    _exact(bids, out)


# ====================================================================== 6. missing input is not an order to delete


def test_empty_input_exits_2_and_changes_nothing(tmp_path, capsys):
    bids = _tiny(tmp_path / "bids")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 0
    before = _snapshot(out)
    empty = tmp_path / "empty.csv"
    empty.write_text("subject,t1,fmri,label\n")
    assert to_zarr.main(["--manifest", str(empty), "--out", str(out), "--no-progress"]) == 2
    assert "lists no subject" in capsys.readouterr().err
    (tmp_path / "nobody").mkdir()
    (tmp_path / "nobody" / "participants.tsv").write_text("participant_id\tdiagnosis\n")
    assert to_zarr.main(_args(tmp_path / "nobody", out, "--prune")) == 2
    assert _snapshot(out) == before
    assert to_zarr.main(["--manifest", str(empty), "--out", str(tmp_path / "new.zarr")]) == 2
    assert not (tmp_path / "new.zarr").exists()


def test_missing_source_keeps_its_copy_and_prune_is_explicit(tmp_path):
    bids = _tiny(tmp_path / "bids")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 0
    t1 = bids / "sub-002" / "anat" / "sub-002_T1w.nii.gz"
    aside = tmp_path / "aside.nii.gz"
    t1.rename(aside)  # moved away for a moment
    assert to_zarr.main(_args(bids, out)) == 1
    rep = CohortStore(out).report()
    assert rep["kept"] == ["sub-002"] and rep["removed"] == [] and "sub-002" in CohortStore(out).subjects
    assert any("sub-002: kept its earlier conversion" in w for w in rep["warnings"])
    aside.rename(t1)
    assert to_zarr.main(_args(bids, out)) == 0
    assert CohortStore(out).report()["skipped"] == ["sub-001", "sub-002"]  # nothing was lost or redone
    _exact(bids, out)


# ====================================================================== 7. run directories and stores do not nest


def test_run_directory_inside_store_and_store_inside_run_directory_are_refused(tmp_path, capsys):
    bids = _tiny(tmp_path / "bids")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 0
    run = out / SUBJECTS / "my-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    assert to_zarr.main(_args(bids, out, "--prune")) == 2
    assert "is a training run directory" in capsys.readouterr().err
    assert (run / "config.yaml").is_file()
    shutil.rmtree(run)
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "config.yaml").write_text("model:\n  channels: 8\ndata:\n  store: x\n")  # a run not yet saved
    (tmp_path / "config.yaml").write_text("editor: vim\n")  # any other config.yaml is no run directory
    assert to_zarr.main(_args(bids, tmp_path / "fine.zarr")) == 0
    assert to_zarr.main(_args(bids, rundir / "cohort.zarr")) == 2
    assert "inside the training run directory" in capsys.readouterr().err
    assert not (rundir / "cohort.zarr").exists()


# ====================================================================== 10. missing chunk


def test_missing_chunk_raises_naming_subject_and_array(tmp_path):
    bids = _tiny(tmp_path / "bids", frames=8)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out, "--fmri-shard-frames", "4", "--fmri-chunk-frames", "2")) == 0
    store = CohortStore(out)
    shard = next((out / store.group_path("sub-001") / "fmri" / "0" / "c").rglob("*"))  # level 0
    while shard.is_dir():
        shard = next(shard.iterdir())
    shard.unlink()
    with pytest.raises(StoreError, match=r"fmri of subject sub-001.*chunk file .* is missing"):
        CohortStore(out).read_fmri("sub-001")
    assert inspect_store.main([str(out), "--verify"]) == 1


# ====================================================================== 12. access


PROBE = "masan-probe"


def _probe_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user and read as it (CI runs tests as root)")
    try:
        pwd.getpwnam(PROBE)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PROBE], check=True)
    return PROBE


def _can_read(user, path):
    return subprocess.run(["runuser", "-u", user, "--", "cat", str(path)], capture_output=True).returncode == 0


def test_store_is_no_more_open_than_owner_only_sources(tmp_path):
    user = _probe_user()
    base = Path(tempfile.mkdtemp(prefix="masan-access-", dir="/tmp"))  # others may enter it: a real test
    try:
        os.chmod(base, 0o755)
        control = base / "public.txt"
        control.write_text("x")
        os.chmod(control, 0o644)
        assert _can_read(user, control)  # the probe user can read what is open to it
        bids = _tiny(base / "bids")
        for p in [bids, *bids.rglob("*")]:  # sources readable by their owner only
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
        out = base / "s.zarr"
        old = os.umask(0o022)  # the usual umask: the store must not follow it
        try:
            assert to_zarr.main(_args(bids, out)) == 0
        finally:
            os.umask(old)
        assert access.more_open_than(out, 0o600) == []
        files = [p for p in out.rglob("*") if p.is_file()]
        assert files and stat.S_IMODE(out.stat().st_mode) & 0o777 == 0o700
        os.chmod(out, 0o755)  # even with the root folder opened by mistake, no file is readable
        assert not any(_can_read(user, f) for f in files)
        # share on purpose, then a default rerun tightens it again and says so
        assert to_zarr.main(_args(bids, out, "--mode", "644")) == 0
        chunk = next(f for f in out.rglob("*") if f.is_file() and "/c/" in str(f))
        assert _can_read(user, chunk)
        assert to_zarr.main(_args(bids, out)) == 0
        warn = " ".join(CohortStore(out).report()["warnings"])
        assert "more open than the sources allow" in warn and str(out) in warn
        assert not _can_read(user, chunk) and access.more_open_than(out, 0o600) == []
        assert to_zarr.main(_args(bids, out, "--mode", "400")) == 2  # the owner must write
    finally:
        shutil.rmtree(base)


def test_sources_in_a_closed_folder_or_linked_from_one_make_an_owner_only_store():
    """A BIDS folder of 644 files in a 0700 home, converted onto open scratch, or T1s that are
    symbolic links into a 0700 folder: nobody else could read the sources, so nobody else may
    read the store (the folders above the sources' common folder used to be ignored)."""
    user = _probe_user()
    base = Path(tempfile.mkdtemp(prefix="masan-access-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        bids = _tiny(home / "bids")
        for p in [bids, *bids.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(home, 0o700)
        linked = base / "linked"  # an open copy whose T1s lead into the closed home
        shutil.copytree(bids, linked, symlinks=True)
        for t1 in linked.rglob("*_T1w.nii*"):
            t1.unlink()
            t1.symlink_to(bids / t1.relative_to(linked))
        old = os.umask(0o022)
        try:
            for source, out in ((bids, base / "home.zarr"), (linked, base / "linked.zarr")):
                assert to_zarr.main(_args(source, out)) == 0
                files = [p for p in out.rglob("*") if p.is_file()]
                assert files and access.more_open_than(out, 0o600) == [], source
                assert not any(_can_read(user, f) for f in files), source
                why = " ".join(CohortStore(out).report()["warnings"])  # and the report says why
                assert f"because of the folders on the way to them: {home} (mode 700" in why, why
            os.chmod(home, 0o711)  # others may pass through the home (not list it): the store opens again
            assert to_zarr.main(_args(bids, base / "open.zarr")) == 0
            chunk = next(f for f in (base / "open.zarr").rglob("*") if f.is_file() and "/c/" in str(f))
            assert _can_read(user, chunk)
        finally:
            os.umask(old)
    finally:
        shutil.rmtree(base)


def test_access_helpers(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    f = d / "a.nii"
    f.write_text("x")
    os.chmod(f, 0o644)
    os.chmod(d, 0o755)
    assert access.restrictive_mode([f, d])[0] == 0o644
    os.chmod(d, 0o711)  # others may enter but not list: counted as closed to them (the safe side)
    assert access.restrictive_mode([f, d])[0] == 0o600
    os.chmod(d, 0o700)  # nobody else may enter: f's 644 shares nothing
    assert access.restrictive_mode([f, d]) == (0o600, os.stat(d).st_gid)
    assert access.restrictive_mode([f]) == (0o600, os.stat(d).st_gid)  # d, on the way to f, counts alone too
    os.chmod(d, 0o710)  # only d's group may pass: f's readers are that group's members
    assert access.restrictive_mode([f]) == (0o640, os.stat(d).st_gid)
    os.chmod(d, 0o711)  # everyone may pass (not list): f's own bits decide
    assert access.restrictive_mode([f])[0] == 0o644
    link = tmp_path / "link.nii"
    link.symlink_to(f)
    os.chmod(d, 0o700)  # the link's target lies in a closed folder
    assert access.restrictive_mode([link])[0] == 0o600
    assert access.dir_mode(0o640) == 0o750
    with access.creation_umask(0o600):
        (tmp_path / "new").write_text("x")
        (tmp_path / "newdir").mkdir()
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "newdir").stat().st_mode) == 0o700
    os.chmod(tmp_path, 0o700)
    os.chmod(tmp_path / "new", 0o644)
    assert access.more_open_than(tmp_path, 0o600) == [tmp_path / "new", f]
    access.apply_access(tmp_path, 0o600)
    assert access.more_open_than(tmp_path, 0o600) == []


def test_tighten_reports_what_it_closed_and_leaves_settled_folders_unentered(tmp_path):
    os.chmod(tmp_path, 0o700)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/f", "b/g"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o644)
    os.chmod(tmp_path / "b", 0o755)
    assert access.tighten(tmp_path, 0o600, settled=[tmp_path / "b"]) == (
        0o600, None, [tmp_path / "a", tmp_path / "a" / "f", tmp_path / "b"])
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700  # the settled folder itself is closed
    assert stat.S_IMODE((tmp_path / "b" / "g").stat().st_mode) == 0o644  # its contents were not visited
    assert access.more_open_than(tmp_path, 0o600) == [tmp_path / "b" / "g"]


def test_a_refused_chmod_is_raised_and_leaves_the_group_its_access(tmp_path, monkeypatch):
    """Only a refused chown means "not a member of the group": a colleague's file whose mode this
    user may not change made tighten drop the group's bits from everything else, then fail anyway."""
    gid = os.getgid()
    os.chmod(tmp_path, 0o750)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for f in (mine, theirs):
        f.write_text("x")
        os.chmod(f, 0o664)
    chmod = os.chmod

    def refuse_theirs(path, mode, *a, **kw):
        if Path(path) == theirs:
            raise PermissionError(1, "Operation not permitted", str(path))
        chmod(path, mode, *a, **kw)
    monkeypatch.setattr(os, "chmod", refuse_theirs)
    with pytest.raises(PermissionError):
        access.tighten(tmp_path, 0o640, gid)
    monkeypatch.undo()
    # whatever the walk reached first: the group keeps what it had (a retry without the group closed it)
    assert stat.S_IMODE(mine.stat().st_mode) & 0o040 and stat.S_IMODE(tmp_path.stat().st_mode) & 0o050 == 0o050


def test_rerun_gives_a_reconverted_subject_the_store_mode_without_walking_the_unchanged(tmp_path, monkeypatch):
    """A store of thousands of subjects on a parallel file system pays for every lstat: a rerun
    walks the store once to close it, then only what it wrote, whatever the user's umask."""
    bids = _tiny(tmp_path / "bids", n_per_class={"NC": 2, "AD": 1})
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out, "--mode", "640")) == 0
    subjects = CohortStore(out).subjects
    changed = subjects[0]
    t1 = bids / changed / "anat" / f"{changed}_T1w.nii.gz"
    img = nib.load(t1)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), t1)
    walked = []
    walk = access._walk

    def recording(root, settled=()):
        for p, st in walk(root, settled):
            walked.append(p)
            yield p, st
    monkeypatch.setattr(access, "_walk", recording)
    old = os.umask(0o077)  # new files are made owner-only: the final pass must open them to the store's mode
    try:
        assert to_zarr.main(_args(bids, out, "--mode", "640")) == 0
    finally:
        os.umask(old)
    for subject in subjects:
        folder = out / SUBJECTS / subject
        inside = [p for p in walked if folder in p.parents]
        files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in files), subject
        if subject != changed:  # entered once, by the pass that closes the store, not by the final one
            assert inside and len(inside) == len(set(inside)), subject
    assert access.more_open_than(out, 0o640) == []


# ====================================================================== 13. small conversion-side items


def test_small_input_cases(tmp_path, capsys):
    bids = _tiny(tmp_path / "bids")
    table = bids / "participants.tsv"
    text = table.read_text()
    table.write_text("\ufeff" + text, encoding="utf-8")  # Excel's "UTF-8 CSV"
    assert to_zarr.main(_args(bids, tmp_path / "bom.zarr")) == 0

    table.write_bytes(text.replace("NC", "NC\u00e9").encode("latin-1"))
    assert to_zarr.main(_args(bids, tmp_path / "latin.zarr")) == 2
    err = capsys.readouterr().err
    assert str(table) in err and "not UTF-8" in err and "iconv" in err
    table.write_text(text)

    t1 = lambda s: bids / s / "anat" / f"{s}_T1w.nii.gz"  # noqa: E731
    bold = lambda s: bids / s / "func" / f"{s}_task-rest_bold.nii.gz"  # noqa: E731
    twice = write_manifest(tmp_path / "twice.csv", [("a", t1("sub-001"), bold("sub-001"), "NC"),
                                               ("b", t1("sub-001"), bold("sub-002"), "AD")])
    assert to_zarr.main(["--manifest", str(twice), "--out", str(tmp_path / "twice.zarr"), "--no-progress"]) == 1
    failed = {f["subject"]: f["error"] for f in CohortStore(tmp_path / "twice.zarr").report()["failed"]}
    assert set(failed) == {"a", "b"} and all("listed for subjects a, b" in e for e in failed.values())

    one = _tiny(tmp_path / "one", frames=1, n_per_class={"NC": 1})
    assert to_zarr.main(_args(one, tmp_path / "one.zarr")) == 0
    assert any("single frame" in w for w in CohortStore(tmp_path / "one.zarr").report()["warnings"])

    elsewhere = tmp_path / "elsewhere_T1w.nii.gz"
    shutil.move(t1("sub-002"), elsewhere)
    t1("sub-002").symlink_to(elsewhere)
    assert to_zarr.main(_args(bids, tmp_path / "link.zarr")) == 0
    assert CohortStore(tmp_path / "link.zarr").row("sub-002")["t1"]["source"] == str(t1("sub-002"))


# ====================================================================== 14. damaged metadata


def _damage(path):
    """Overwrite a few bytes inside a metadata file, as a failing disk or a stray write would."""
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"XXXX")


def test_damaged_subject_metadata_is_found_and_reconverted_by_verify(tmp_path, capsys):
    bids = _tiny(tmp_path / "bids")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 0
    for where in ("{v}/t1/0/zarr.json", "{v}/fmri/zarr.json", "{v}/zarr.json"):  # an array, an image, the version
        rel = where.format(v=CohortStore(out).group_path("sub-002"))
        _damage(out / rel)
        capsys.readouterr()
        assert inspect_store.main([str(out), "--verify"]) == 1
        assert f"DAMAGED sub-002: {rel} is damaged (not JSON)" in capsys.readouterr().err
        assert to_zarr.main(_args(bids, out, "--verify")) == 0
        assert f"warning: sub-002: {rel} is damaged (not JSON); reconverted" in capsys.readouterr().out
        assert CohortStore(out).report()["converted"] == ["sub-002"]
        _exact(bids, out)
    # the subject's own group file holds only the name of its version: any rerun rewrites it
    _damage(out / SUBJECTS / "sub-002" / "zarr.json")
    assert inspect_store.main([str(out), "--verify"]) == 1
    assert f"DAMAGED sub-002: {SUBJECTS}/sub-002/zarr.json is damaged" in capsys.readouterr().err
    assert to_zarr.main(_args(bids, out)) == 0
    _exact(bids, out)
    # a rerun without --verify cannot read a damaged version's own group either: it reconverts it, and says so
    rel = f"{CohortStore(out).group_path('sub-001')}/zarr.json"
    _damage(out / rel)
    assert to_zarr.main(_args(bids, out)) == 0
    assert f"warning: sub-001: {rel} is damaged (not JSON); reconverted" in capsys.readouterr().out
    assert CohortStore(out).report()["converted"] == ["sub-001"]
    _exact(bids, out)


def test_damaged_root_metadata_is_refused_naming_the_file_and_the_fix_works(tmp_path, capsys):
    bids = _tiny(tmp_path / "bids")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(_args(bids, out)) == 0
    os.truncate(out / "zarr.json", 100)
    data = lambda: {k: v for k, v in _snapshot(out).items() if not k.startswith(".lock")}  # noqa: E731
    before = data()
    assert to_zarr.main(_args(bids, out)) == 2
    err = capsys.readouterr().err
    assert f"{out / 'zarr.json'} cannot be read" in err and "root metadata" in err and "damaged" in err
    assert f"mv {out} {out}.damaged" in err and "Traceback" not in err
    assert data() == before  # refused before anything was written (but its lock file: the holder's pid)
    assert inspect_store.main([str(out)]) == 2
    assert f"mv {out} {out}.damaged" in capsys.readouterr().err  # the tools give the same advice
    with pytest.raises(StoreError, match=f"{out / 'zarr.json'} cannot be read.*root metadata"):
        _ = CohortStore(out).subjects  # what training's start sees
    out.rename(f"{out}.damaged")  # the advice, followed
    assert to_zarr.main(_args(bids, out)) == 0
    _exact(bids, out)


# ====================================================================== 15. Ctrl-C and SIGTERM


@pytest.fixture(scope="module")
def many_bids(tmp_path_factory):
    """Enough subjects that a run is still converting when the first one is published."""
    return synthesize_cohort(tmp_path_factory.mktemp("many") / "bids", {"NC": 6, "AD": 6}, t1_shape=(24, 24, 24),
                             fmri_shape=(16, 16, 16), frames=48, compresslevel=1)


SETTLE_PROBE = """
import os, signal, sys, threading
import numpy as np, zarr
from masan.store import publish
array = zarr.create_array(sys.argv[1], shape=(16, 128, 128), chunks=(1, 32, 32), dtype="f4")
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    with publish.stop_signals():
        while True:  # the main thread waits inside zarr almost all the time: the signal lands there
            array[:] = np.ones(array.shape, "f4")
except publish.Interrupted:
    print("stopped", file=sys.stderr)
"""


def test_a_signal_inside_a_zarr_write_ends_without_zarr_noise(tmp_path):
    """A stop signal in the main thread leaves zarr's writes running in its I/O thread; the
    converter, QC and evaluation wait for them as they stop (``stop_signals``), so the one line
    each prints is all the user sees, not a thousand "Task was destroyed but it is pending!"
    from the interpreter's exit."""
    res = subprocess.run([sys.executable, "-c", SETTLE_PROBE, str(tmp_path / "a.zarr")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stderr == "stopped\n", res.stderr[-2000:]


@pytest.mark.parametrize("sig,to_group,workers", [(signal.SIGINT, True, 2), (signal.SIGTERM, False, 2),
                                                  (signal.SIGTERM, True, 1)],
                         ids=["ctrl-c-workers", "kill-workers", "slurm-in-process"])
def test_a_stop_signal_ends_the_conversion_cleanly_and_a_rerun_resumes(many_bids, tmp_path, capsys, caplog, sig,
                                                                       to_group, workers):
    """Ctrl-C signals the whole process group, ``kill`` the converter alone, SLURM every process
    of the job: each time one line says how far it got, the exit status is 128 + the signal,
    the report is written, the workers are gone and the store reads; a rerun finishes it."""
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, str(ROOT / "data_tools" / "to_zarr.py"), *_args(many_bids, out, "--workers", str(workers))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((out / SUBJECTS).glob("*/current")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    pool = _children(proc.pid)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    report = json.loads((out / REPORT).read_text())
    done, total = len(report["converted"]), len(list(many_bids.glob("sub-*")))
    assert proc.returncode == 128 + sig, err
    assert err.strip() == (f"to_zarr: interrupted by {sig.name}: {done} of {total} subjects were converted; the "
                           f"store is consistent: rerun the same command to resume (details: {out / REPORT})")
    assert 0 < done < total and report["aborted"] == f"interrupted by {sig.name}" and not report["failed"]
    assert all(map(gone, pool))
    store = CohortStore(out)
    assert len(store.subjects) == done and inspect_store.main([str(out), "--verify"]) == 0
    assert f"NOT FINISHED: the last conversion of {out} did not finish (interrupted by {sig.name}) after " \
           f"converting {done} of {total} subjects" in capsys.readouterr().out
    if sig == signal.SIGINT:  # a training start on it says so too (once, from rank 0's store check)
        with caplog.at_level(logging.WARNING, logger="masan.train.run"):
            store_contract(load_config(None, [f"data.store={out}", "data.classes=[NC, AD]", "data.fmri_frames=48",
                                              "model.t1_shape=null", "model.fmri_shape=null",
                                              "model.fmri_frames=null"]))
        assert f"the last conversion of {out} did not finish" in caplog.text
    assert to_zarr.main(_args(many_bids, out, "--workers", str(workers))) == 0
    assert CohortStore(out).report()["skipped"] == sorted(report["converted"])  # nothing redone
    assert _exact(many_bids, out).unfinished_conversion() is None


def test_a_full_store_disk_stops_the_conversion_and_prunes_nothing(tmp_path):
    """A full disk failed every remaining subject as if its input were bad, and --prune then
    removed every earlier good subject (they 'failed now')."""
    bids = _tiny(tmp_path / "bids")
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "s.zarr"
        assert to_zarr.main(_args(bids, out)) == 0
        before = {s: _sources(bids, s) for s in CohortStore(out).subjects}
        filler = fill(disk, 8 * 1024)
        res = subprocess.run([sys.executable, str(ROOT / "data_tools/to_zarr.py"), *_args(bids, out, "--codec", "zstd",
                                                                                          "--prune", "--workers", "2")],
                             capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "no space left on the device" in res.stderr and "nothing was pruned" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        store = CohortStore(out)
        assert store.subjects == sorted(before)  # the earlier conversion, whole
        for s, (t1, _) in before.items():
            np.testing.assert_array_equal(store.read_t1(s, normalize=False), t1)
        filler.unlink()
        assert to_zarr.main(_args(bids, out, "--codec", "zstd", "--prune")) == 0
        assert CohortStore(out).subjects == sorted(before)


def square(job: int) -> int:
    """A conversion worker's stand-in (imported by spawned workers from this module)."""
    return job * job


def test_a_worker_dying_as_the_next_subject_is_handed_out_costs_no_subject(tmp_path, monkeypatch):
    """A worker killed while the parent recorded a finished subject broke the pool for the next
    submit(), which was unguarded: the whole conversion stopped with a traceback; and a subject
    already converted when the pool broke was taken for the one that broke it."""

    from masan.store.publish import run_pool

    real, calls = ProcessPoolExecutor.submit, []

    def submit(pool, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # a worker dies now, every job handed out so far done: the pool breaks
            deadline = time.monotonic() + 60
            while pool._pending_work_items and time.monotonic() < deadline:
                time.sleep(0.01)
            proc = next(iter(pool._processes.values()))
            os.kill(proc.pid, signal.SIGKILL)
            while not pool._broken and time.monotonic() < deadline:  # marked by the executor's own thread
                time.sleep(0.01)
        return real(pool, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit)
    results, dead = [], []
    run_pool(list(range(8)), square, (), 2, tmp_path, results.append, lambda job, why: dead.append(job))
    # no job was running on the killed worker: none is failed, and none converted is lost
    assert (sorted(results), dead) == ([j * j for j in range(8)], [])
