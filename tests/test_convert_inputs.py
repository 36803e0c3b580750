"""What to_zarr takes from a cohort's folders and headers when they hold more, or other, than
the scans it needs: look-alike files beside a scan, task runs, impossible TRs, sform and qform
that disagree, a header promising more voxels than its file holds; and the messages that say
what was wrong with a table or an argument."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from masan.convert.sources import DEFAULT_CLASSES, ConvertError, check_sources, discover_bids, parse_label_map
from masan.store.cohort import CohortStore
from masan.store.publish import LOCK_FILES
from test_data_convert import DATA, ROOT, _synth, to_zarr, write_manifest

LABELS = parse_label_map(None, DEFAULT_CLASSES)


def _check(bids: Path, require: tuple[str, ...] = ("t1", "fmri"), **kw):
    """(subject -> Job, subject -> failure message) of a BIDS folder as to_zarr would check it."""
    jobs, failed = check_sources(discover_bids(bids, **kw), LABELS, require)
    return {j.subject: j for j in jobs}, {f.subject: f.error for f in failed}


def test_look_alike_files_beside_a_scan_are_never_taken(tmp_path):
    """Backups, checksums and macOS's ._ copies sort before the scan (``.nii.bak`` < ``.nii.gz``):
    taken, they converted the wrong data or failed the subject with wrong advice."""
    bids = _synth(tmp_path, n=1)
    anat, func = bids / "sub-001" / "anat", bids / "sub-001" / "func"
    other = nib.load(bids / "sub-002" / "anat" / "sub-002_T1w.nii.gz")
    nib.save(other, anat / "sub-001_T1w.nii.bak.nii.gz")  # a readable NIfTI, but not named *_T1w.nii.gz
    for name in ("sub-001_T1w.nii.bak", "sub-001_T1w.nii.gz.bak", "sub-001_T1w.nii.gz.md5", "._sub-001_T1w.nii.gz"):
        (anat / name).write_bytes(b"not the scan")
    (func / "sub-001_task-rest_bold.nii.gz.bak").write_bytes(b"not the run")
    shutil.copy(bids / "sub-002/anat/sub-002_T1w.nii.gz", bids / "sub-002/anat/sub-002_T1w.nii.bak")

    jobs, failed = _check(bids)
    assert not failed, failed
    for s in ("sub-001", "sub-002"):
        assert Path(jobs[s].sources["t1"]).name == f"{s}_T1w.nii.gz"
    assert Path(jobs["sub-001"].sources["fmri"]).name == "sub-001_task-rest_bold.nii.gz"
    assert not any("T1w files" in n or "BOLD files" in n for n in jobs["sub-001"].notes), jobs["sub-001"].notes
    (note,) = [n for n in jobs["sub-001"].notes if n.startswith("ignored")]  # one note names them
    assert note.startswith("ignored 6 files in sub-001 that only look like images (._sub-001_T1w.nii.gz, "
                           "sub-001_T1w.nii.bak, sub-001_T1w.nii.bak.nii.gz and 3 more)"), note


def test_task_runs_are_not_taken_as_resting_state(tmp_path):
    """MASAN models resting-state fMRI: a task label containing 'rest' (any case) is one; a subject
    whose runs are all another task fails naming them and the ways on, unless --bold-task names
    that task, or fMRI is optional (then it is stored without fMRI, with a note)."""
    bids = _synth(tmp_path, n=1)

    def rename(subject: str, task: str, keep: bool = False) -> None:
        run = bids / subject / "func" / f"{subject}_task-rest_bold.nii.gz"
        (shutil.copy if keep else os.rename)(run, run.with_name(f"{subject}_task-{task}_bold.nii.gz"))

    rename("sub-001", "nback")  # only a task run
    rename("sub-002", "RestingState")
    rename("sub-003", "nback", keep=True)  # rest and nback
    rename("sub-004", "rs")  # a common abbreviation of resting state
    jobs, failed = _check(bids)
    assert set(failed) == {"sub-001"}, failed
    assert Path(jobs["sub-004"].sources["fmri"]).name == "sub-004_task-rs_bold.nii.gz"
    for frag in ("sub-001_task-nback_bold.nii.gz", "task nback", "not resting-state", "--bold-task nback",
                 "rename it (and its JSON sidecar) to task-rest", "--require t1"):
        assert frag in failed["sub-001"], (frag, failed["sub-001"])
    assert Path(jobs["sub-002"].sources["fmri"]).name == "sub-002_task-RestingState_bold.nii.gz"
    assert Path(jobs["sub-003"].sources["fmri"]).name == "sub-003_task-rest_bold.nii.gz"
    assert any("task nback left out: not resting-state" in n for n in jobs["sub-003"].notes), jobs["sub-003"].notes

    jobs, failed = _check(bids, require=("t1",))  # fMRI optional: its T1 alone, said
    assert not failed and "fmri" not in jobs["sub-001"].sources
    assert any(n.startswith("stored without fMRI: its BOLD runs are not resting-state") for n in jobs["sub-001"].notes)

    jobs, failed = _check(bids, bold_task="NBack")  # a named task, any case
    assert {s: Path(j.sources["fmri"]).name for s, j in jobs.items()} == {
        "sub-001": "sub-001_task-nback_bold.nii.gz", "sub-003": "sub-003_task-nback_bold.nii.gz"}
    assert "no BOLD run of task 'NBack' (--bold-task); its runs: sub-002_task-RestingState_bold.nii.gz " \
           "(task RestingState)" in failed["sub-002"], failed["sub-002"]


def test_bold_task_reaches_the_conversion_and_is_checked(tmp_path, capsys):
    """--bold-task is an option of to_zarr (help, a BIDS label only), and applies to a manifest's
    BIDS-named runs too."""
    bids = _synth(tmp_path, n=1)
    run = bids / "sub-001" / "func" / "sub-001_task-nback_bold.nii.gz"
    os.rename(bids / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz", run)
    man = write_manifest(tmp_path / "m.csv", [("a", bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz", run, "AD")])
    base = ["--manifest", str(man), "--no-progress"]
    assert to_zarr.main(base + ["--out", str(tmp_path / "rest.zarr")]) == 1
    (failure,) = CohortStore(tmp_path / "rest.zarr").report()["failed"]
    assert "not resting-state" in failure["error"] and "--bold-task nback" in failure["error"], failure
    assert to_zarr.main(base + ["--out", str(tmp_path / "nback.zarr"), "--bold-task", "nback"]) == 0
    assert CohortStore(tmp_path / "nback.zarr").row("a")["fmri"]["source"] == str(run)

    assert to_zarr.main(base + ["--out", str(tmp_path / "x.zarr"), "--bold-task", "n-back"]) == 2
    assert "BIDS task label, letters and digits only" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(SystemExit):
        to_zarr.parse_args(["--help"])
    assert "--bold-task LABEL" in capsys.readouterr().out


# ---- one small conversion: each subject's files carry one header problem ----------------------

BOLD_SHAPE = (4, 4, 4, 3)
T1_SHAPE = (6, 6, 6)
HUGE_SHAPE = (30000, 30000, 30000)


def _image(path: Path, shape: tuple[int, ...], sform: np.ndarray | None = None, qform: np.ndarray | None = None,
           tr: float = 2.0, time_unit: str = "sec") -> Path:
    """A small int16 NIfTI with sform and qform set (code 1; the same 2 mm RAS affine unless given)."""
    rng = np.random.default_rng(len(path.name))
    img = nib.Nifti1Image(rng.integers(1, 100, shape).astype(np.int16), None)
    default = np.diag([2.0, 2.0, 2.0, 1.0])
    img.set_sform(default if sform is None else sform, code=1)
    img.set_qform(default if qform is None else qform, code=1)
    img.header.set_xyzt_units("mm", time_unit)
    if len(shape) == 4:
        img.header["pixdim"][4] = tr
    nib.save(img, path)
    return path


def _huge(path: Path) -> Path:
    """A NIfTI whose header promises HUGE_SHAPE int16 voxels (54 TB) over 300 KB of zeros."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(HUGE_SHAPE)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_data_offset(352)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        hdr.write_to(f)  # 348 header bytes + 4 extension bytes = vox_offset 352
        f.write(b"\0" * 300_000)
    return path


def _float_t1(path: Path, dtype: str, extreme: float) -> Path:
    """A float T1 (a brain of 100 +- 10) with one voxel at ``extreme`` (16^3 voxels: one outlier
    lies at most sqrt(n) std from the mean)."""
    values = np.random.default_rng(3).normal(100.0, 10.0, (16, 16, 16)).astype(dtype)
    values[0, 0, 0] = extreme
    img = nib.Nifti1Image(values, np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def header_cases(tmp_path_factory):
    """(store, files) after one conversion of a manifest whose subjects each have one header case."""
    tmp = tmp_path_factory.mktemp("headers")
    t1 = lambda s: _image(tmp / f"{s}_t1.nii.gz", T1_SHAPE)  # noqa: E731
    bold = lambda s, **kw: _image(tmp / f"{s}_bold.nii.gz", BOLD_SHAPE, **kw)  # noqa: E731
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[0, 3] = 10.0  # the same voxels as the sform's RAS, seen from the other side
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = [0.0, 5.0, 0.0]
    files = {
        "ok": (t1("ok"), bold("ok")),
        "short_tr": (t1("short_tr"), bold("short_tr", time_unit="msec")),  # pixdim[4] 2 in msec: 0.002 s
        "bool_tr": (t1("bool_tr"), bold("bool_tr")),
        "fast_sidecar": (t1("fast_sidecar"), bold("fast_sidecar")),
        "left_right": (_image(tmp / "left_right_t1.nii.gz", T1_SHAPE, qform=las), ""),
        "shifted": (_image(tmp / "shifted_t1.nii.gz", T1_SHAPE, qform=shifted), ""),
        "huge_gz": (_huge(tmp / "huge_t1.nii.gz"), ""),
        "huge_raw": (_huge(tmp / "huge_t1.nii"), ""),
        "beyond_f32": (_float_t1(tmp / "beyond_f32_t1.nii.gz", "float64", 1e39), ""),
        "hot_voxel": (_float_t1(tmp / "hot_voxel_t1.nii.gz", "float32", 1e30), ""),
    }
    (tmp / "bool_tr_bold.json").write_text(json.dumps({"RepetitionTime": True}))
    (tmp / "fast_sidecar_bold.json").write_text(json.dumps({"RepetitionTime": 0.05}))
    man = write_manifest(tmp / "m.csv", [(s, t, b, "AD") for s, (t, b) in files.items()])
    out = tmp / "s.zarr"
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--require", "t1", "--no-progress"]) == 1
    return CohortStore(out), {s: (str(t), str(b)) for s, (t, b) in files.items()}


def _warnings(store: CohortStore, subject: str) -> list[str]:
    return [w for w in store.report()["warnings"] if w.startswith(f"{subject}: ")]


def _failures(store: CohortStore) -> dict[str, str]:
    return {f["subject"]: f["error"] for f in store.report()["failed"]}


def test_values_past_float32_fail_their_subject_and_a_corrupt_voxel_is_named(header_cases):
    """Training reads float32: a voxel past its range would be Inf there and every prediction of the
    subject NaN (called the first class); one voxel at 1e30 flattens the normalised brain."""
    store, files = header_cases
    failed = _failures(store)
    assert "beyond_f32" in failed and files["beyond_f32"][0] in failed["beyond_f32"]
    assert "1e+39" in failed["beyond_f32"] and "float32's range" in failed["beyond_f32"]
    assert "hot_voxel" in store.subjects and "hot_voxel" not in failed
    [hot] = [w for w in _warnings(store, "hot_voxel") if "standard deviations" in w]
    assert files["hot_voxel"][0] in hot and "1e+30" in hot
    assert not [w for w in _warnings(store, "ok") if "standard deviations" in w]


def test_a_header_tr_faster_than_any_protocol_is_not_stored(header_cases):
    store, files = header_cases
    assert store.row("ok")["fmri"]["tr_seconds"] == 2.0 and not _warnings(store, "ok")
    assert store.row("short_tr")["fmri"]["tr_seconds"] is None
    (warning,) = _warnings(store, "short_tr")
    for frag in (files["short_tr"][1], "header TR 0.002 s (2 msec) is a unit error", "under 0.1 s",
                 "stored without a TR", "RepetitionTime in seconds"):
        assert frag in warning, (frag, warning)


def test_a_sidecar_tr_that_is_not_a_number_of_seconds_fails_naming_the_sidecar(header_cases):
    store, files = header_cases
    failed = _failures(store)
    assert f"{files['bool_tr'][1].replace('.nii.gz', '.json')}: RepetitionTime true is not a TR" in failed["bool_tr"]
    assert "RepetitionTime 0.05 is not a TR in seconds" in failed["fast_sidecar"], failed["fast_sidecar"]
    assert not {"bool_tr", "fast_sidecar"} & set(store.subjects)


def test_sform_and_qform_that_disagree_are_warned_naming_the_one_used(header_cases):
    store, files = header_cases
    (warning,) = _warnings(store, "left_right")
    for frag in (files["left_right"][0], "sform (code 1) and qform (code 1) disagree",
                 "orientation RAS in the sform, LAS in the qform", "used the sform", "fslorient -copysform2qform",
                 "img.set_qform(img.get_sform(), code=1)"):
        assert frag in warning, (frag, warning)
    assert store.meta("left_right", "t1")["nifti"]["axcodes"] == ["R", "A", "S"]  # the sform's
    (warning,) = _warnings(store, "shifted")
    assert "their affines differ by up to 5 mm" in warning, warning


@pytest.mark.parametrize("subject", ["huge_gz", "huge_raw"])
def test_a_header_promising_more_voxels_than_the_file_holds_fails_before_reading(header_cases, subject):
    store, files = header_cases
    error = _failures(store)[subject]
    for frag in (files[subject][0], "voxel data end after 300000 of the 54000000000000 bytes",
                 "shape (30000, 30000, 30000) of int16", "truncated or corrupt: re-export or re-download it"):
        assert frag in error, (frag, error)
    assert "MemoryError" not in error


# ---- messages ------------------------------------------------------------------------------------


def test_a_table_saved_with_the_wrong_separator_says_so(tmp_path):
    (tmp_path / "participants.tsv").write_text("participant_id,diagnosis\nsub-01,AD\n")
    with pytest.raises(ConvertError, match="it looks comma-separated, but this file must be tab-separated"):
        discover_bids(tmp_path)
    man = tmp_path / "m.csv"
    man.write_text("subject\tt1\tfmri\tlabel\na\tx.nii\t\tAD\n")
    with pytest.raises(ConvertError, match="it looks tab-separated, but this file must be comma-separated"):
        to_zarr.read_manifest(man)


def test_participant_ids_in_another_case_than_their_folders_are_refused_with_the_fix(tmp_path):
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\nSUB-01\tAD\n")
    with pytest.raises(ConvertError) as e:
        discover_bids(tmp_path)
    for frag in ("row 2 'SUB-01' (folder sub-01)", "upper/lower case", "write e.g. sub-01"):
        assert frag in str(e.value), (frag, str(e.value))


def test_a_manifest_that_is_a_folder_says_a_csv_file_is_expected(tmp_path, capsys):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\n")
    for folder, frag in ((tmp_path, "CSV file with columns"), (bids, "for a BIDS folder use --bids")):
        assert to_zarr.main(["--manifest", str(folder), "--out", str(tmp_path / "s.zarr")]) == 2
        err = capsys.readouterr().err
        assert f"manifest {folder} is a folder" in err and frag in err and "does not exist" not in err, err


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """As ``to_zarr.py ... | head -1`` once head has exited: the conversion finishes, quietly."""
    man = write_manifest(tmp_path / "m.csv", [("a", DATA / "anatomical.nii", "", "AD")])
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, str(ROOT / "data_tools" / "to_zarr.py"), "--manifest", str(man),
                              "--out", str(tmp_path / "s.zarr"), "--require", "t1", "--no-progress"],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT, check=False)
    finally:
        os.close(write)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 0 and CohortStore(tmp_path / "s.zarr").subjects == ["a"]


def test_a_rerun_keeps_its_warnings_and_a_store_of_another_cohort_is_refused(header_cases, tmp_path, capsys):
    """Subjects a rerun skips still carry their conversion's warnings in the report; a store made
    from another participants.tsv or manifest is not merged into (same ids would be replaced)
    unless --new-input says it is the same cohort."""
    store, files = header_cases
    out = tmp_path / "copy.zarr"
    shutil.copytree(store.path, out)
    man = str(Path(files["ok"][0]).parent / "m.csv")
    before = _warnings(store, "shifted")
    assert before and to_zarr.main(["--manifest", man, "--out", str(out), "--require", "t1", "--no-progress"]) == 1
    again = CohortStore(out)
    assert "shifted" in again.report()["skipped"] and _warnings(again, "shifted") == before

    bids = _synth(tmp_path, n=1)
    def snapshot() -> list:  # but the lock files, which every run takes
        return sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.name not in LOCK_FILES)

    before_refusal = snapshot()
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out} was converted from {man}, and this run reads {bids / 'participants.tsv'} (other content)" in err
    assert "pass --new-input; nothing was changed" in err
    assert snapshot() == before_refusal
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress", "--new-input"]) == 0
    assert {"sub-001", "sub-002", "ok"} <= set(CohortStore(out).subjects)


def test_a_cohort_of_t1_only_and_fmri_only_subjects_converts_with_require_none(tmp_path, capsys):
    """Each subject's failure named another --require than the other's; --require none takes
    every subject with the images it has."""
    bids = _synth(tmp_path, n=2)
    shutil.rmtree(bids / "sub-001" / "func")
    shutil.rmtree(bids / "sub-002" / "anat")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--require t1 to allow this (--require none: every subject with the images it has)" in err
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress", "--require", "none"]) == 0
    store = CohortStore(out)
    assert store.row("sub-001")["fmri"] is None and store.row("sub-002")["t1"] is None
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--require", "none", "t1"]) == 2
    assert "none stands alone" in capsys.readouterr().err


def test_a_store_from_before_inputs_were_recorded_is_not_mixed_with_another_cohort(header_cases, tmp_path, capsys):
    """Stores converted before the label tables were recorded have no ``inputs``: a run whose
    subjects are none of the store's is another cohort, and refused likewise."""
    store, files = header_cases
    bids = _synth(tmp_path, n=1)
    out = tmp_path / "old.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0
    meta = out / "zarr.json"
    record = json.loads(meta.read_text())
    del record["attributes"]["inputs"]  # as an older version wrote it
    meta.write_text(json.dumps(record))
    man = str(Path(files["ok"][0]).parent / "m.csv")
    assert to_zarr.main(["--manifest", man, "--out", str(out), "--require", "t1", "--no-progress"]) == 2
    assert "none of them in the store: converting into it would mix two cohorts" in capsys.readouterr().err
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0, "its own cohort again"
    assert "inputs" in CohortStore(out).attrs


# ---------------------------------------------------------------------- BIDS folders as real cohorts arrive


def test_a_participants_table_with_a_used_column_twice_is_refused(tmp_path):
    """csv.DictReader keeps the last of two same-named columns: a pasted table paired ids with
    another table's rows, and a second diagnosis column relabelled every subject, silently."""
    (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\tage\tdiagnosis\nsub-01\tNC\t70\tAD\n")
    with pytest.raises(ConvertError, match="has the column 'diagnosis' 2 times"):
        discover_bids(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\tparticipant_id\tage\n"
                                               "sub-01\tNC\tsub-02\t7\n")
    with pytest.raises(ConvertError, match="has the column 'participant_id' 2 times"):
        discover_bids(tmp_path)


def test_an_unclosed_quote_that_swallows_rows_is_refused(tmp_path):
    (tmp_path / "participants.tsv").write_text(
        'participant_id\tdiagnosis\tnotes\nsub-01\tNC\t"motion, see QC\nsub-02\tAD\tok\nsub-03\tAD\tok\n')
    with pytest.raises(ConvertError, match="a double quote that is never closed swallows the rows after it"):
        discover_bids(tmp_path)


def test_an_image_named_for_another_subject_or_session_fails_its_subject(tmp_path):
    """A scan copied into the wrong folder would be converted under that folder's diagnosis."""
    bids = _synth(tmp_path, n=1)
    a, b = bids / "sub-001" / "anat", bids / "sub-002" / "anat"
    (a / "sub-001_T1w.nii.gz").rename(tmp_path / "t.nii.gz")
    (b / "sub-002_T1w.nii.gz").rename(a / "sub-002_T1w.nii.gz")
    (tmp_path / "t.nii.gz").rename(b / "sub-001_T1w.nii.gz")
    ses = bids / "sub-003" / "ses-bl"
    ses.mkdir()
    for m in ("anat", "func"):
        (bids / "sub-003" / m).rename(ses / m)
    (ses / "anat" / "sub-003_T1w.nii.gz").rename(ses / "anat" / "sub-003_ses-m12_T1w.nii.gz")
    jobs, failed = _check(bids)
    assert "is named for sub-002 but lies in" in failed["sub-001"] and "sub-001_T1w" in failed["sub-002"]
    assert "is named for ses-m12 but lies in" in failed["sub-003"], failed["sub-003"]
    assert set(jobs) == {"sub-004"}


def _into_sessions(subject: Path, visits: tuple[str, ...]) -> None:
    """Move a subject's scans into a session folder per visit (a copy in each)."""
    for visit in visits:
        for m, name in (("anat", "T1w"), ("func", "task-rest_bold")):
            (subject / f"ses-{visit}" / m).mkdir(parents=True)
            target = subject / f"ses-{visit}" / m / f"{subject.name}_ses-{visit}_{name}.nii.gz"
            shutil.copy(next((subject / m).glob("*.nii.gz")), target)
    for m in ("anat", "func"):
        shutil.rmtree(subject / m)


def test_runs_and_sessions_are_taken_in_natural_order(tmp_path):
    """run-10 sorted before run-2, and ses-M108 (nine years on) before ses-M12, by name."""
    bids = _synth(tmp_path, n=1)
    anat = bids / "sub-001" / "anat"
    shutil.copy(anat / "sub-001_T1w.nii.gz", anat / "sub-001_run-10_T1w.nii.gz")
    (anat / "sub-001_T1w.nii.gz").rename(anat / "sub-001_run-2_T1w.nii.gz")
    _into_sessions(bids / "sub-002", ("M108", "M12"))
    _into_sessions(bids / "sub-003", ("1", "01"))  # equal as numbers: the name decides, not the folder's listing
    jobs, failed = _check(bids)
    assert not failed, failed
    assert Path(jobs["sub-001"].sources["t1"]).name == "sub-001_run-2_T1w.nii.gz"
    assert Path(jobs["sub-003"].sources["t1"]).name == "sub-003_ses-01_T1w.nii.gz"
    from masan.order import natural
    names = ["ses-bl2", "ses-M12", "ses-bl", "ses-M"]
    assert sorted(names, key=lambda n: natural(Path(n))) == ["ses-M", "ses-M12", "ses-bl", "ses-bl2"]
    assert Path(jobs["sub-002"].sources["t1"]).name == "sub-002_ses-M12_T1w.nii.gz"


def _visits(bids: Path, diagnoses: dict[str, dict[str, str]]) -> None:
    """Clinica's ADNI layout: each subject's scans in a session folder per visit, each visit's
    diagnosis in its sessions table, and participants.tsv with the screening one only."""
    rows = ["participant_id\tdiagnosis_sc"]
    for sid, visits in diagnoses.items():
        _into_sessions(bids / sid, tuple(visits))
        rows.append(f"{sid}\tNC")
        (bids / sid / f"{sid}_sessions.tsv").write_text(
            "session_id\tage\tdiagnosis\n" + "".join(f"ses-{v}\t70\t{d}\n" for v, d in visits.items()))
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    for folder in bids.glob("sub-*"):
        if folder.name not in diagnoses:
            shutil.rmtree(folder)


def test_labels_come_from_the_visit_converted_when_the_sessions_tables_hold_them(tmp_path, capsys):
    """ADNI diagnoses change between visits and ADNI's BIDS converters write each visit's in
    sub-X/sub-X_sessions.tsv: participants.tsv without --label-column was refused, and taking its
    screening column would label month-24 AD scans NC."""
    bids = _synth(tmp_path, n=1)
    _visits(bids, {"sub-001": {"M00": "CN", "M24": "AD"}, "sub-002": {"M00": "EMCI", "M24": "LMCI"}})
    jobs, failed = _check(bids)
    assert not failed and {s: j.label for s, j in jobs.items()} == {"sub-001": "NC", "sub-002": "EMCI"}
    jobs, failed = _check(bids, session="M24")
    assert not failed and {s: j.label for s, j in jobs.items()} == {"sub-001": "AD", "sub-002": "LMCI"}
    with pytest.raises(ConvertError, match="the subjects' sessions tables have 'diagnosis': pass --label-source sess"):
        discover_bids(bids, label_source="participants")

    # participants.tsv's column is used when it has it; a visit it contradicts is noted
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-001\tNC\nsub-002\tEMCI\n")
    jobs, _ = _check(bids, session="M24")
    assert jobs["sub-001"].label == "NC"
    assert any("while sub-001/sub-001_sessions.tsv row 3 says AD for ses-M24" in n for n in jobs["sub-001"].notes)
    assert "--label-source sessions" in " ".join(jobs["sub-001"].notes)
    jobs, _ = _check(bids, session="M00")
    assert not any("sessions.tsv" in n for n in jobs["sub-001"].notes)  # CN is NC: the same class
    jobs, _ = _check(bids, session="M24", label_source="sessions")
    assert jobs["sub-001"].label == "AD" and not any("participants.tsv says" in n for n in jobs["sub-001"].notes)

    out = tmp_path / "s.zarr"
    (bids / "sub-002" / "sub-002_sessions.tsv").chmod(0o600)
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress", "--session", "M24",
                         "--label-source", "sessions", "--classes", "NC", "EMCI", "LMCI", "AD"]) == 0
    store = CohortStore(out)
    assert {s: store.label(s) for s in store.subjects} == {"sub-001": "AD", "sub-002": "LMCI"}
    assert str(bids / "sub-002" / "sub-002_sessions.tsv") in {t["path"] for t in store.attrs["inputs"]}
    assert (out / "zarr.json").stat().st_mode & 0o077 == 0  # a label table closed to others closes the store
    assert to_zarr.main(["--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--label-source", "sessions"]) == 2
    assert "--label-source applies to --bids" in capsys.readouterr().err


def test_a_visit_the_sessions_table_cannot_label_fails_its_subject_naming_the_table(tmp_path):
    bids = _synth(tmp_path, n=1)
    _visits(bids, {"sub-001": {"M00": "CN"}, "sub-002": {"M00": "AD"}, "sub-003": {"M00": "AD"},
                   "sub-004": {"M00": "MCI"}})
    (bids / "sub-001" / "sub-001_sessions.tsv").unlink()
    table = bids / "sub-002" / "sub-002_sessions.tsv"
    table.write_text(table.read_text() + "ses-M00\t71\tNC\n")
    table = bids / "sub-003" / "sub-003_sessions.tsv"
    table.write_text(table.read_text().replace("ses-M00", "ses-M06"))
    _, failed = _check(bids)
    assert "sub-001/sub-001_sessions.tsv not found" in failed["sub-001"], failed
    assert "has rows 2, 3 for ses-M00, the session converted; keep one" in failed["sub-002"], failed
    assert "has no row for ses-M00" in failed["sub-003"], failed
    assert "label 'MCI' (sub-004/sub-004_sessions.tsv row 2) is not a known class" in failed["sub-004"], failed


def test_a_bold_run_without_a_task_label_is_used_with_a_note(tmp_path):
    """As documented: taken as resting-state when no run states a task (it failed the subject,
    and with --require t1 was stored while the report said 'stored without fMRI')."""
    bids = _synth(tmp_path, n=1)
    func = bids / "sub-001" / "func"
    (func / "sub-001_task-rest_bold.nii.gz").rename(func / "sub-001_bold.nii.gz")
    for require in (("t1", "fmri"), ("t1",)):
        jobs, failed = _check(bids, require)
        assert not failed, failed
        job = jobs["sub-001"]
        assert Path(job.sources["fmri"]).name == "sub-001_bold.nii.gz"
        assert any("no task label read from the name" in n for n in job.notes), job.notes
        assert not any("without fMRI" in n for n in job.notes), job.notes


def test_a_broken_link_fails_its_subject_naming_the_fetch(tmp_path, capsys):
    """DataLad / git-annex datasets hold links whose content may not be fetched: a sidecar's
    crashed the whole conversion with a traceback."""
    bids = _synth(tmp_path, n=1)
    (bids / "sub-003" / "func" / "sub-003_task-rest_bold.json").symlink_to("../../.git/annex/objects/XX/k.json")
    t1 = bids / "sub-002" / "anat" / "sub-002_T1w.nii.gz"
    t1.unlink()
    t1.symlink_to("../../.git/annex/objects/XX/k.nii.gz")
    assert to_zarr.main(["--bids", str(bids), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 1
    cap = capsys.readouterr()
    out = cap.out + cap.err
    for subject, what in (("sub-003", "fMRI sidecar file"), ("sub-002", "t1 file")):
        line = next(x for x in out.splitlines() if f"FAILED {subject}" in x)
        assert what in line and "does not exist" in line and "datalad get" in line, line
    assert CohortStore(tmp_path / "s.zarr").subjects == ["sub-001", "sub-004"]


def test_a_folder_missing_from_the_table_is_stored_unlabeled_with_a_note(tmp_path):
    bids = _synth(tmp_path, n=1)
    table = bids / "participants.tsv"
    table.write_text(table.read_text().replace("sub-004", "sub-4"))
    jobs, failed = check_sources(discover_bids(bids), LABELS, ("t1", "fmri"), allow_unlabeled=True)
    job = next(j for j in jobs if j.subject == "sub-004")
    assert job.label is None and any("not in participants.tsv: stored unlabeled" in n for n in job.notes)


def test_the_label_map_refuses_a_label_given_twice_or_a_class_emptied():
    with pytest.raises(ConvertError, match="maps 'mci' twice"):
        parse_label_map("Dementia=AD,MCI=LMCI,mci=EMCI", DEFAULT_CLASSES)
    with pytest.raises(ConvertError, match="AD is one of the classes"):
        parse_label_map("AD=NC", DEFAULT_CLASSES)
    assert parse_label_map("AD=NC", ("NC", "LMCI"))["AD"] == "NC"  # merging a class left out is fine
    assert parse_label_map("MCI=LMCI,mci=LMCI", DEFAULT_CLASSES)["MCI"] == "LMCI"


def test_a_table_that_is_nearly_right_is_named(tmp_path):
    (tmp_path / "participants.csv").write_text("participant_id,diagnosis\nsub-01,AD\n")
    with pytest.raises(ConvertError, match="participants.csv is there"):
        discover_bids(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tDiagnosis \nsub-01\tAD\n")
    with pytest.raises(ConvertError, match="'Diagnosis ' differs only in case or spaces"):
        discover_bids(tmp_path)
    with pytest.raises(ConvertError, match=f"pass its folder with --bids {tmp_path}"):
        to_zarr.read_manifest(tmp_path / "participants.tsv")


def test_the_summary_counts_classes_and_names_a_relabelled_subject(tmp_path, capsys):
    bids = _synth(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    args = ["--bids", str(bids), "--out", str(out), "--no-progress"]
    assert to_zarr.main(args) == 0
    assert "subjects by class: NC 1, EMCI 1, LMCI 1, AD 1\n" in capsys.readouterr().out
    table = bids / "participants.tsv"
    lines = table.read_text().splitlines()
    (ad,) = [i for i, line in enumerate(lines) if line.split("\t")[1:2] == ["AD"]]
    subject = lines[ad].split("\t")[0]
    lines[ad] = lines[ad].replace("\tAD", "\tLMCI", 1)
    table.write_text("\n".join(lines) + "\n")
    assert to_zarr.main(args) == 0
    printed = capsys.readouterr().out
    assert "0 converted, 4 unchanged" in printed and "subjects by class: NC 1, EMCI 1, LMCI 2, AD 0\n" in printed
    assert f"warning: {subject}: relabelled AD -> LMCI" in printed


def test_a_rerun_that_takes_another_file_for_a_subject_says_which(tmp_path, capsys):
    """A choice rule or a folder that changed (runs now in natural order) swapped a subject's scan
    with only the usual 'N T1w files; used X' note."""
    bids = _synth(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    args = ["--bids", str(bids), "--out", str(out), "--no-progress"]
    assert to_zarr.main(args) == 0
    anat = bids / "sub-001" / "anat"
    (anat / "sub-001_T1w.nii.gz").rename(anat / "sub-001_run-2_T1w.nii.gz")
    shutil.copy(bids / "sub-002" / "anat" / "sub-002_T1w.nii.gz", anat / "sub-001_run-1_T1w.nii.gz")
    capsys.readouterr()
    assert to_zarr.main(args) == 0
    assert (f"warning: sub-001: its t1 is now {anat / 'sub-001_run-1_T1w.nii.gz'} (was "
            f"{anat / 'sub-001_T1w.nii.gz'}); reconverted") in capsys.readouterr().out
    moved = bids.rename(tmp_path / "moved")  # the same files elsewhere, reconverted for another option
    assert to_zarr.main(["--bids", str(moved), "--out", str(out), "--no-progress", "--clevel", "3"]) == 0
    assert "is now" not in capsys.readouterr().out
