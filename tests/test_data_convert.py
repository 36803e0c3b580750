"""to_zarr on real NIfTI files (nibabel's), bad inputs, reruns, --verify and a killed conversion."""

import csv
import gzip
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from masan.convert.sources import (
    DEFAULT_CLASSES,
    ConvertError,
    check_sources,
    discover_bids,
    parse_label_map,
    read_manifest,
)
from masan.store.cohort import REPORT, STAGING, SUBJECTS, CohortStore
from masan.synth.phantom import synthesize_cohort

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(nib.__file__).parent / "tests" / "data"
_spec = importlib.util.spec_from_file_location("to_zarr", ROOT / "data_tools" / "to_zarr.py")
to_zarr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(to_zarr)
_spec = importlib.util.spec_from_file_location("inspect_store", ROOT / "data_tools" / "inspect_store.py")
inspect_store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inspect_store)

REAL = {  # subject -> (t1, fmri, label): every real file nibabel ships that fits a modality
    "s1": ("anatomical.nii", "functional.nii", "NC"),       # big-endian int16 + scaled int16 4D
    "s2": ("standard.nii.gz", "example4d.nii.gz", "AD"),    # uint8 mask + gzip 4D
    "s3": ("reoriented_anat_moved.nii", "example_nifti2.nii.gz", "CN"),  # float32 + NIfTI-2
    "s4": ("resampled_anat_moved.nii", "", "LMCI"),         # float32 with NaN background, no fMRI
}


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "t1", "fmri", "label"])
        w.writerows(rows)
    return path


def real_manifest(tmp):
    return write_manifest(tmp / "real.csv", [(s, DATA / t1, DATA / fm if fm else "", lab)
                                             for s, (t1, fm, lab) in REAL.items()])


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    rc = to_zarr.main(["--manifest", str(real_manifest(tmp)), "--out", str(tmp / "s.zarr"), "--require", "t1",
                       "--nan", "zero", "--no-progress", "--keep-orientation"])  # the files' own voxels, exactly
    assert rc == 0
    return CohortStore(tmp / "s.zarr")


def test_real_files_read_back_exactly(real_store):
    assert real_store.subjects == ["s1", "s2", "s3", "s4"]
    assert real_store.label("s3") == "NC"  # ADNI's CN maps to NC
    for s, (t1, fm, _) in REAL.items():
        for modality, name in (("t1", t1), ("fmri", fm)):
            if not name:
                assert not real_store.has(s, modality)
                continue
            img = nib.load(DATA / name)
            want = np.nan_to_num(np.asarray(img.dataobj))  # --nan zero stored NaN as 0
            raw = real_store.read_raw(s, modality)
            got = (real_store.read_t1(s, normalize=False) if modality == "t1"
                   else real_store.read_fmri(s, normalize=False))
            if modality == "fmri":  # the store keeps time first
                raw, got = np.moveaxis(raw, 0, 3), np.moveaxis(got, 0, 3)
            assert np.array_equal(raw, np.nan_to_num(img.dataobj.get_unscaled())), (s, modality)
            meta = real_store.meta(s, modality)["nifti"]
            assert (meta["scl_slope"], meta["scl_inter"]) == (float(img.dataobj.slope), float(img.dataobj.inter))
            assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32)), (s, modality)
            assert np.array_equal(real_store.affine(s, modality), img.affine)
    assert real_store.meta("s1", "fmri")["nifti"]["tr_seconds"] == 2.0
    assert real_store.meta("s4", "t1")["nan_replaced"] == 153
    warnings = real_store.report()["warnings"]
    # its header says 2000 sec: a unit error, so no TR is stored rather than a wrong one
    assert any("example4d.nii.gz" in w and "TR 2000 s" in w and "unit error" in w for w in warnings)
    assert real_store.row("s2")["fmri"]["tr_seconds"] is None


def test_scaled_file_normalisation_uses_conversion_stats(real_store):
    want = np.asarray(nib.load(DATA / "functional.nii").dataobj)  # float64, scaled
    nonzero = want[np.asarray(nib.load(DATA / "functional.nii").dataobj.get_unscaled()) != 0]
    z = np.moveaxis(real_store.read_fmri("s1"), 0, 3)
    assert np.allclose(z, (want - nonzero.mean()) / nonzero.std(), atol=1e-4)


def test_canonical_and_crop_pad_keep_the_affine_true(tmp_path):
    man = write_manifest(tmp_path / "m.csv", [("a", DATA / "anatomical.nii", DATA / "functional.nii", "AD")])
    out = tmp_path / "c.zarr"
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--canonical", "--t1-shape", "40", "36", "24",
                         "--fmri-shape", "16", "24", "4", "--no-progress"]) == 0
    store = CohortStore(out)
    for modality, name in (("t1", "anatomical.nii"), ("fmri", "functional.nii")):
        img = nib.load(DATA / name)
        src = np.asarray(img.dataobj)
        got = store.read_t1("a", normalize=False) if modality == "t1" else np.moveaxis(
            store.read_fmri("a", normalize=False), 0, 3)
        aff = store.affine("a", modality)
        assert nib.aff2axcodes(aff) == ("R", "A", "S")
        # every stored voxel sits where the source voxel with the same world position was
        idx = np.indices(got.shape[:3]).reshape(3, -1)
        world = aff @ np.vstack([idx, np.ones(idx.shape[1])])
        vox = np.rint(np.linalg.inv(img.affine) @ world)[:3].astype(int)
        inside = np.all((vox >= 0) & (vox < np.array(src.shape[:3])[:, None]), axis=0)
        stored = got.reshape(-1, *got.shape[3:])
        assert np.array_equal(stored[inside], src[tuple(vox[:, inside])].astype(np.float32))
        assert np.all(stored[~inside] == (0 if modality == "t1" else np.float32(img.dataobj.inter)))
        assert 0 < inside.sum() < inside.size  # both cropped and padded
    assert store.meta("a", "t1")["transform"]["reoriented_to"] == "RAS"


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_every_bad_input_fails_alone_with_file_and_fix(tmp_path):
    good_t1, good_fmri = DATA / "anatomical.nii", DATA / "example4d.nii.gz"
    cut = tmp_path / "cut_bold.nii.gz"
    blob = good_fmri.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    junk = tmp_path / "junk_T1w.nii.gz"
    with gzip.open(junk, "wb") as f:
        f.write(os.urandom(4000))
    inf = np.ones((6, 6, 6), np.float32)
    inf[2, 2, 2] = np.inf
    inf_file = _nifti(tmp_path / "inf_T1w.nii", inf)

    def own(path, subject):  # each subject its own copy: one file listed for two subjects is refused
        folder = tmp_path / "own" / subject
        folder.mkdir(parents=True, exist_ok=True)
        return shutil.copy(path, folder / Path(path).name)

    rows = [
        ("good", good_t1, good_fmri, "AD"),
        ("truncated", good_t1, cut, "AD"),
        ("corrupt", junk, good_fmri, "AD"),
        ("t1_is_4d", DATA / "functional.nii", good_fmri, "AD"),
        ("fmri_is_3d", good_t1, DATA / "anatomical.nii", "AD"),
        ("nan", DATA / "resampled_anat_moved.nii", good_fmri, "AD"),
        ("inf", inf_file, good_fmri, "AD"),
        ("no_fmri", good_t1, "", "AD"),
        ("absent_file", tmp_path / "nope.nii", good_fmri, "AD"),
        ("unknown_label", good_t1, good_fmri, "MCI"),
        ("no_label", good_t1, good_fmri, ""),
        ("dup", good_t1, good_fmri, "AD"),
        ("dup", good_t1, good_fmri, "NC"),
        ("../evil", good_t1, good_fmri, "AD"),
        ("a b", good_t1, good_fmri, "AD"),
    ]
    shared = (good_t1, good_fmri)
    rows = [rows[0]] + [(s, *(own(f, s) if f in shared else f for f in (t1, fm)), lab) for s, t1, fm, lab in rows[1:]]
    man = write_manifest(tmp_path / "bad.csv", rows)
    out = tmp_path / "bad.zarr"
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--no-progress"]) == 1
    store = CohortStore(out)
    assert store.subjects == ["good"]  # every good subject is still converted
    failed = {f["subject"]: f for f in store.report()["failed"]}
    expect = {  # subject -> fragments of the message (what was wrong + what to do)
        "truncated": ["cut_bold.nii.gz", "truncated or corrupt", "re-download"],
        "corrupt": ["junk_T1w.nii.gz", "not a readable NIfTI", "re-export"],
        "t1_is_4d": ["functional.nii", "must be a 3D volume", "right file"],
        "fmri_is_3d": ["anatomical.nii", "must be 4D"],
        "nan": ["resampled_anat_moved.nii", "153 of 1071 voxels are NaN", "--nan zero"],
        "inf": ["inf_T1w.nii", "Inf", "re-export"],
        "no_fmri": ["bad.csv row 9", "no fmri", "--require t1"],
        "absent_file": ["nope.nii", "does not exist", "fix the path"],
        "unknown_label": ["'MCI'", "--label-map"],
        "no_label": ["no label", "diagnosis"],
        "dup": ["appears 2 times", "row 13, bad.csv row 14", "one row"],
        "../evil": ["not a safe name", "letters, digits"],
        "a b": ["not a safe name"],
    }
    assert set(failed) == set(expect)
    for subject, fragments in expect.items():
        for frag in fragments:
            assert frag in failed[subject]["error"], (subject, frag, failed[subject]["error"])
    assert failed["truncated"]["file"].endswith("cut_bold.nii.gz")
    assert store.attrs["last_conversion"]["failed"]  # also visible from the store itself
    assert not (out / SUBJECTS / "truncated").exists() and not (out / STAGING).exists()
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--no-progress", "--allow-failures"]) == 0


def test_unusable_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    man = real_manifest(tmp_path)
    assert to_zarr.main(["--manifest", str(man), "--out", str(tmp_path / "other"), "--no-progress"]) == 2
    assert "not a cohort store" in capsys.readouterr().err
    bad = tmp_path / "cols.csv"
    bad.write_text("id,t1\nx,y\n")
    assert to_zarr.main(["--manifest", str(bad), "--out", str(tmp_path / "o.zarr")]) == 2
    assert "lacks column(s)" in capsys.readouterr().err


def _synth(tmp, n=2, **kw):
    return synthesize_cohort(tmp / "bids", n, t1_shape=(16, 16, 16), fmri_shape=(8, 8, 8), frames=6, **kw)


def test_rerun_skips_unchanged_redoes_changed_and_verify_repairs(tmp_path):
    bids = _synth(tmp_path)
    out = tmp_path / "s.zarr"
    args = ["--bids", str(bids), "--out", str(out), "--no-progress"]
    assert to_zarr.main(args) == 0
    store = CohortStore(out)
    assert store.attrs["planted_effect"]["cells"]["4x4x4"] == [1, 1, 1]
    assert len(store.subjects) == 8 and store.report()["converted"] == store.subjects
    assert to_zarr.main(args) == 0
    assert CohortStore(out).report()["skipped"] == store.subjects

    t1 = bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
    os.utime(t1)  # touched, same bytes: still skipped (sha256 decides)
    other = _synth(tmp_path / "other", seed=5)
    shutil.copy(other / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz",
                bids / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz")
    rows = (bids / "participants.tsv").read_text().splitlines()
    (bids / "participants.tsv").write_text("\n".join(r for r in rows if not r.startswith("sub-008")) + "\n")
    shutil.rmtree(bids / "sub-008")
    assert to_zarr.main(args) == 0
    rep = CohortStore(out).report()
    assert rep["converted"] == ["sub-002"] and rep["kept"] == ["sub-008"] and len(rep["skipped"]) == 6
    assert "sub-008" in CohortStore(out).subjects  # unlisted: kept until --prune says otherwise
    assert to_zarr.main(args + ["--prune"]) == 0
    assert CohortStore(out).report()["removed"] == ["sub-008"] and not (out / SUBJECTS / "sub-008").exists()
    fresh = np.moveaxis(np.asarray(nib.load(bids / "sub-002/func/sub-002_task-rest_bold.nii.gz").dataobj), 3, 0)
    assert np.array_equal(CohortStore(out).read_raw("sub-002", "fmri"), fresh)

    # damage one stored chunk file: inspect --verify finds it, to_zarr --verify reconverts it
    t1_dir = out / CohortStore(out).group_path("sub-003") / "t1"
    chunk = next(p for p in t1_dir.rglob("*") if p.is_file() and p.name != "zarr.json")
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    assert inspect_store.main([str(out), "--verify"]) == 1
    assert to_zarr.main(args + ["--verify"]) == 0
    assert CohortStore(out).report()["converted"] == ["sub-003"]
    assert inspect_store.main([str(out), "--verify"]) == 0
    assert inspect_store.main([str(out), "--subject", "sub-003"]) == 0


def test_bids_sessions_runs_label_column_and_map(tmp_path):
    bids = _synth(tmp_path, n=1)
    sub = bids / "sub-001"
    for ses in ("ses-01", "ses-02"):
        (sub / ses).mkdir()
        shutil.copytree(sub / "anat", sub / ses / "anat")
    shutil.copytree(sub / "func", sub / "ses-02" / "func")  # only ses-02 has both modalities
    shutil.copy(sub / "ses-02/func/sub-001_task-rest_bold.nii.gz", sub / "ses-02/func/sub-001_task-motor_bold.nii.gz")
    shutil.rmtree(sub / "anat")
    shutil.rmtree(sub / "func")
    (bids / "sub-900").mkdir()  # a folder without a participants.tsv row
    (bids / "participants.tsv").write_text("participant_id\tdx\nsub-001\tCN\nsub-002\tDementia\n"
                                           "sub-003\tLMCI\nsub-004\tn/a\n")
    out = tmp_path / "s.zarr"
    rc = to_zarr.main(["--bids", str(bids), "--out", str(out), "--label-column", "dx", "--label-map",
                       "Dementia=AD", "--no-progress"])
    assert rc == 1
    store = CohortStore(out)
    assert [store.label(s) for s in store.subjects] == ["NC", "AD", "LMCI"]
    assert "/ses-02/func/sub-001_task-rest_bold" in store.row("sub-001")["fmri"]["source"]
    assert any("2 sessions; used ses-02" in w for w in store.report()["warnings"])
    # task-rest preferred among the runs, and the choice said (docs/data-format.md, Inputs)
    assert any("2 BOLD files; used sub-001_task-rest_bold" in w for w in store.report()["warnings"]), \
        store.report()["warnings"]
    failed = {f["subject"]: f["error"] for f in store.report()["failed"]}
    assert set(failed) == {"sub-004", "sub-900"} and "no label" in failed["sub-900"]
    assert to_zarr.main(["--bids", str(bids), "--out", str(tmp_path / "x.zarr"), "--no-progress"]) == 2  # no dx col


def test_killed_conversion_resumes_with_complete_subjects(tmp_path):
    bids = synthesize_cohort(tmp_path / "bids", 3, t1_shape=(48, 48, 48), fmri_shape=(32, 32, 32), frames=40,
                             compresslevel=1)
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, str(ROOT / "data_tools" / "to_zarr.py"), "--bids", str(bids), "--out", str(out),
           "--workers", "2", "--fmri-shard-frames", "16", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # subjects the cohort table lists (published and recorded)
            done = json.loads((out / "zarr.json").read_text())["attributes"].get("cohort", [])
        except (OSError, ValueError, KeyError):
            done = []
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"conversion ended before it could be killed: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-run
    proc.wait()
    before = CohortStore(out).subjects  # published and in the table (a version the table never named is redone)
    half = sorted(p.name.split(".")[0] for p in (out / STAGING).iterdir()) if (out / STAGING).is_dir() else []
    assert 2 <= len(before) < 12 and not set(half) & set(before)
    assert to_zarr.main(cmd[2:]) == 0
    store = CohortStore(out)
    rep = store.report()
    assert sorted(rep["skipped"]) == before  # published subjects were complete
    assert sorted(rep["converted"]) == sorted(set(store.subjects) - set(before))  # the rest, redone
    assert set(half) <= set(rep["converted"])
    assert len(store.subjects) == 12 and not (out / STAGING).exists()
    for s in store.subjects:
        t1 = np.asarray(nib.load(bids / s / "anat" / f"{s}_T1w.nii.gz").dataobj)
        bold = np.asarray(nib.load(bids / s / "func" / f"{s}_task-rest_bold.nii.gz").dataobj)
        assert np.array_equal(store.read_raw(s, "t1"), t1)
        assert np.array_equal(store.read_raw(s, "fmri"), np.moveaxis(bold, 3, 0))
    assert not (out / REPORT).with_suffix(".json.tmp").exists()


_PEAK_RSS = """
import resource, sys
from masan.convert.cohort import ConvertOptions, SubjectSource, convert_cohort
from pathlib import Path
src = [SubjectSource("s", "AD", None, Path(sys.argv[1]), "test")]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = convert_cohort(src, sys.argv[2], ConvertOptions(fmri_shard_frames=8, fmri_chunk_frames=8, require=("fmri",)),
                        progress=False)
assert not report.failed, report.failed
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_fmri_streams_in_bounded_memory(tmp_path):
    """A run 8x longer must not need 8x the memory: the conversion holds one shard of frames."""
    from masan.convert.nifti import write_nifti_slabs

    shape, rng = (40, 40, 40), np.random.default_rng(0)
    peaks, sizes = [], []
    for frames in (75, 600):
        path = tmp_path / f"run{frames}_bold.nii.gz"
        slabs = (rng.integers(0, 16, shape + (25,), dtype=np.int16) for _ in range(frames // 25))
        write_nifti_slabs(path, np.eye(4), shape + (frames,), np.int16, slabs, (2.0, 2.0, 2.0, 2.0), compresslevel=1)
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(tmp_path / f"s{frames}.zarr")],
                             capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.split()[-1]) * 1024)  # ru_maxrss is in KiB on Linux
        sizes.append(np.prod(shape) * frames * 2)
    assert peaks[1] - peaks[0] < 0.25 * (sizes[1] - sizes[0]), (peaks, sizes)


def _open_to_all(tree):
    """Sources readable by everyone (644 files, 755 folders), the usual download."""
    for p in [tree, *tree.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _store_mode(out):
    """(file modes, folder modes) found in a store."""
    paths = [p for p in out.rglob("*")] + [out]
    return ({stat.S_IMODE(p.stat().st_mode) & 0o777 for p in paths if p.is_file()},
            {stat.S_IMODE(p.stat().st_mode) & 0o777 for p in paths if p.is_dir()})


def test_label_table_counts_among_the_sources_for_the_store_access(tmp_path):
    """A private participants.tsv / manifest with public images: the store (which holds every
    diagnosis) is private too."""
    os.chmod(tmp_path, 0o755)  # pytest's 700 would close everything below it: the table must decide
    bids = _synth(tmp_path, n=1)
    _open_to_all(bids)
    man = write_manifest(tmp_path / "m.csv", [
        (s, bids / s / "anat" / f"{s}_T1w.nii.gz", bids / s / "func" / f"{s}_task-rest_bold.nii.gz", "AD")
        for s in ("sub-001", "sub-002")])
    os.chmod(man, 0o644)
    old = os.umask(0o022)
    try:
        assert to_zarr.main(["--bids", str(bids), "--out", str(tmp_path / "open.zarr"), "--no-progress"]) == 0
        assert _store_mode(tmp_path / "open.zarr") == ({0o644}, {0o755})  # the control: all sources open
        os.chmod(bids / "participants.tsv", 0o600)
        assert to_zarr.main(["--bids", str(bids), "--out", str(tmp_path / "b.zarr"), "--no-progress"]) == 0
        assert _store_mode(tmp_path / "b.zarr") == ({0o600}, {0o700})
        os.chmod(bids / "participants.tsv", 0o644)
        os.chmod(man, 0o600)
        assert to_zarr.main(["--manifest", str(man), "--out", str(tmp_path / "m.zarr"), "--no-progress"]) == 0
        assert _store_mode(tmp_path / "m.zarr") == ({0o600}, {0o700})
        os.chmod(man, 0o644)  # an open manifest in a folder only its owner may enter: private too
        (tmp_path / "home").mkdir(mode=0o700)
        moved = Path(shutil.copy(man, tmp_path / "home" / "m.csv"))  # absolute image paths: still valid
        assert to_zarr.main(["--manifest", str(moved), "--out", str(tmp_path / "h.zarr"), "--no-progress"]) == 0
        assert _store_mode(tmp_path / "h.zarr") == ({0o600}, {0o700})
    finally:
        os.umask(old)


def test_subject_without_any_image_is_not_sent_round_the_require_flags(tmp_path):
    man = write_manifest(tmp_path / "m.csv", [("empty", "", "", "AD"),
                                              ("anat_only", DATA / "anatomical.nii", "", "AD")])
    sources = read_manifest(man)
    for require in (("t1", "fmri"), ("t1",), ("fmri",)):
        _, failed = check_sources(sources, parse_label_map(None, DEFAULT_CLASSES), require)
        errors = {f.subject: f.error for f in failed}
        assert "--require" not in errors["empty"], errors
        assert "add its images" in errors["empty"] and "remove its row from m.csv" in errors["empty"]
        if "fmri" in require:
            assert "--require t1" in errors["anat_only"]
        else:
            assert "anat_only" not in errors


def test_participant_ids_without_the_sub_prefix_are_refused_with_the_fix(tmp_path, capsys):
    bids = _synth(tmp_path, n=1)
    table = bids / "participants.tsv"
    table.write_text(table.read_text().replace("sub-", ""))
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for frag in (str(table), "row 2 '001' (folder sub-001)", "'sub-' prefix", "write e.g. sub-001"):
        assert frag in err, (frag, err)
    assert not out.exists()  # refused before anything was written


def test_session_matching_no_folder_is_refused(tmp_path):
    bids = _synth(tmp_path, n=1)
    with pytest.raises(ConvertError, match="no session folders"):  # a cohort without sessions
        discover_bids(bids, session="nosuch")
    for s, sessions in (("sub-001", ("ses-01", "ses-02")), ("sub-002", ("ses-01",))):
        for ses in sessions:
            shutil.copytree(bids / s / "anat", bids / s / ses / "anat")
            shutil.copytree(bids / s / "func", bids / s / ses / "func")
    with pytest.raises(ConvertError, match="its sessions are ses-01, ses-02: pass one of those"):
        discover_bids(bids, session="03")
    # in some subjects only: they fail and say why, the others are converted from it
    jobs, failed = check_sources(discover_bids(bids, session="02"), parse_label_map(None, DEFAULT_CLASSES),
                                 ("t1", "fmri"))
    errors = {f.subject: f.error for f in failed}
    assert "/ses-02/anat/" in next(j for j in jobs if j.subject == "sub-001").sources["t1"]
    assert set(errors) == {"sub-002"} and "no ses-02 folder; its sessions: ses-01" in errors["sub-002"]
    assert any("--session 02 not applied" in n for j in jobs if j.subject == "sub-003" for n in j.notes)


def test_out_that_is_a_file_or_read_only_exits_2(tmp_path, capsys):
    man = real_manifest(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, frag in ((afile, "is a file, not a folder"), (afile / "s.zarr", f"{afile} is a file")):
        assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and frag in err, err
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes in a 555 folder: only a read-only mount refuses it
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot mount a read-only file system here")
        want = "read-only file system"
    else:
        os.chmod(ro, 0o555)
        want = "you may not write in"
    try:
        assert to_zarr.main(["--manifest", str(man), "--out", str(ro / "s.zarr"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--out {ro / 's.zarr'}" in err and want in err and "Traceback" not in err, err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
        os.chmod(ro, 0o755)


def test_singular_affine_fails_the_subject_naming_the_file_and_fix(tmp_path):
    affine = np.diag([1.0, 1.0, 0.0, 1.0])  # the sform's third row is zero: no z axis
    img = nib.Nifti1Image(np.ones((6, 6, 6), np.int16), None)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    bad = tmp_path / "flat_T1w.nii.gz"
    nib.save(img, bad)
    man = write_manifest(tmp_path / "m.csv", [("flat", bad, "", "AD"), ("good", DATA / "anatomical.nii", "", "NC")])
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--require", "t1", "--no-progress"]) == 1
    store = CohortStore(out)
    assert store.subjects == ["good"]
    (failure,) = store.report()["failed"]
    for frag in (str(bad), "affine (from its sform) is singular", "fix the header's sform/qform"):
        assert frag in failure["error"], (frag, failure["error"])


def test_mixed_voxel_sizes_are_warned_at_conversion(tmp_path, capsys):
    bids = _synth(tmp_path, n=1)
    t1 = bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz"
    img = nib.load(t1)
    affine = img.affine.copy()
    affine[:3, 2] *= 3  # one scanner's thicker slices
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), t1)
    args = ["--bids", str(bids), "--no-progress"]
    assert to_zarr.main(args + ["--out", str(tmp_path / "s.zarr")]) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if "training will refuse" in line)
    for frag in ("t1 voxel sizes", "sub-001", "--spacing", "most common voxel size"):
        assert frag in warning, (frag, warning)
    # also kept in the store's report, for whoever opens the store later
    assert warning.removeprefix("  warning: ") in CohortStore(tmp_path / "s.zarr").report()["warnings"]
    assert to_zarr.main(args + ["--out", str(tmp_path / "r.zarr"), "--spacing", "--t1-shape", "16", "16", "16",
                                "--fmri-shape", "8", "8", "8"]) == 0
    assert "training will refuse" not in capsys.readouterr().out
    assert not any("training will refuse" in w for w in CohortStore(tmp_path / "r.zarr").report()["warnings"])


def _run(bids, old, new):
    """Rename a subject's BOLD run (another session or entity): (old relative path, new)."""
    (bids / new).parent.mkdir(parents=True, exist_ok=True)
    (bids / old).rename(bids / new)


def test_the_tr_follows_bids_inheritance_nearest_sidecar_first(tmp_path, capsys):
    bids = _synth(tmp_path, n=1)  # sub-001..004, header TR 2 s
    (bids / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 3.0}))
    (bids / "task-rest_acq-fast_bold.json").write_text(json.dumps({"RepetitionTime": 0.8}))  # acq-fast runs only
    (bids / "sub-001" / "sub-001_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
    (bids / "sub-002/func/sub-002_task-rest_bold.json").write_text(json.dumps({"EchoTime": 0.03}))  # no TR here
    for modality, suffix in (("anat", "T1w.nii.gz"), ("func", "task-rest_bold.nii.gz")):
        _run(bids, f"sub-003/{modality}/sub-003_{suffix}", f"sub-003/ses-01/{modality}/sub-003_ses-01_{suffix}")
    (bids / "sub-003/ses-01/sub-003_ses-01_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.5}))
    _run(bids, "sub-004/func/sub-004_task-rest_bold.nii.gz", "sub-004/func/sub-004_task-rest_acq-fast_bold.nii.gz")
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0
    store = CohortStore(out)
    assert {s: store.row(s)["fmri"]["tr_seconds"] for s in store.subjects} == {
        "sub-001": 1.5, "sub-002": 3.0, "sub-003": 2.5, "sub-004": 0.8}
    assert {store.meta(s, "fmri")["tr_source"] for s in store.subjects} == {"sidecar"}
    # the message names the file the TR came from, not the run's own sidecar that lacks it
    warning = next(w for w in store.report()["warnings"] if w.startswith("sub-002:"))
    assert f"sidecar {bids / 'task-rest_bold.json'} 3 s" in warning, warning
    # a manifest listing the BIDS files inherits alike, from the dataset (dataset_description.json) up
    run = bids / "sub-002/func/sub-002_task-rest_bold.nii.gz"
    man = write_manifest(tmp_path / "m.csv", [("sub-002", "", run, "AD")])
    assert read_manifest(man)[0].fmri_sidecar == bids / "task-rest_bold.json"


def test_manifest_reads_the_same_missing_label_spellings_as_bids(tmp_path):
    rows = [(f"s{i}", shutil.copy(DATA / "anatomical.nii", tmp_path / f"s{i}.nii"), "", label)
            for i, label in enumerate(("NA", "nan", "n/a"))]
    sources = read_manifest(write_manifest(tmp_path / "m.csv", rows))
    jobs, failed = check_sources(sources, parse_label_map(None, DEFAULT_CLASSES), ("t1",), allow_unlabeled=True)
    assert not failed and [(j.subject, j.label) for j in jobs] == [("s0", None), ("s1", None), ("s2", None)]
    _, failed = check_sources(sources, parse_label_map(None, DEFAULT_CLASSES), ("t1",))
    assert all("has no label" in f.error for f in failed) and len(failed) == 3


def test_rows_with_every_field_empty_are_not_subjects(tmp_path):
    t1, t1b = (shutil.copy(DATA / "anatomical.nii", tmp_path / f"{s}.nii") for s in ("solo", "bad"))
    man = tmp_path / "m.csv"
    man.write_text(f"subject,t1,fmri,label\n,,,\nsolo,{t1},,NC\n\n , ,,\nbad,{t1b},,MCI\n,,,,,\n")
    sources = read_manifest(man)
    assert [(s.subject, s.origin) for s in sources] == [("solo", "m.csv row 3"), ("bad", "m.csv row 6")]
    jobs, failed = check_sources(sources, parse_label_map(None, DEFAULT_CLASSES), ("t1",))
    assert [j.subject for j in jobs] == ["solo"] and [f.subject for f in failed] == ["bad"]
    assert failed[0].error.startswith("m.csv row 6:")  # the row the user sees in the file

    bids = _synth(tmp_path, n=1)
    table = bids / "participants.tsv"
    table.write_text(table.read_text() + "\t\n\t\n")
    jobs, failed = check_sources(discover_bids(bids), parse_label_map(None, DEFAULT_CLASSES), ("t1", "fmri"))
    assert len(jobs) == 4 and not failed


@pytest.mark.parametrize(("argv", "message"), [
    (["--fmri-chunk-frames", "0"], "argument --fmri-chunk-frames: must be at least 1, got 0"),
    (["--fmri-chunk-frames", "-16"], "argument --fmri-chunk-frames: must be at least 1, got -16"),
    (["--fmri-shard-frames", "0"], "argument --fmri-shard-frames: must be at least 1, got 0"),
    (["--patch-grid", "4", "0", "4"], "argument --patch-grid: must be at least 1, got 0"),
    (["--levels", "0"], "argument --levels: must be at least 1, got 0"),
    (["--t1-shape", "16", "-1", "16"], "argument --t1-shape: must be at least 1, got -1"),
    (["--spacing", "nan"], "argument --spacing: must be at least 0, got nan"),
])
def test_bad_layout_numbers_exit_2_naming_the_option_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "s.zarr"
    try:
        code = to_zarr.main(["--manifest", str(real_manifest(tmp_path)), "--out", str(out), "--no-progress"] + argv)
    except SystemExit as e:  # argparse's usage error
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_layout_and_classes_refused_by_the_options_exit_2(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    base = ["--manifest", str(real_manifest(tmp_path)), "--out", str(out), "--no-progress"]
    for argv, message in ((["--fmri-shard-frames", "24"], "must be a multiple of fmri_chunk_frames (16)"),
                          (["--classes", "NC", "nc", "AD"], "name NC more than once")):
        assert to_zarr.main(base + argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    for bad in ({"fmri_chunk_frames": 0}, {"fmri_shard_frames": -128}):  # not a ZeroDivisionError
        with pytest.raises(ConvertError, match=f"{next(iter(bad))} must be 1 or more frames"):
            to_zarr.ConvertOptions(**bad)


def test_a_modality_missing_in_the_chosen_session_names_the_session(tmp_path):
    bids = _synth(tmp_path, n=1)
    for s in ("sub-001", "sub-002"):
        _run(bids, f"{s}/anat/{s}_T1w.nii.gz", f"{s}/ses-01/anat/{s}_ses-01_T1w.nii.gz")
    _run(bids, "sub-001/func/sub-001_task-rest_bold.nii.gz", "sub-001/ses-01/func/sub-001_ses-01_task-rest_bold.nii.gz")
    _, failed = check_sources(discover_bids(bids, session="01"), parse_label_map(None, DEFAULT_CLASSES),
                              ("t1", "fmri"))
    assert [f.subject for f in failed] == ["sub-002"]
    assert "has no fmri file in ses-01 (" in failed[0].error and "; add it, or convert with --require t1" in \
        failed[0].error
    assert "sub-002_task-rest_bold.nii.gz outside its session folders left out" in failed[0].error  # where it is


def test_help_shows_the_label_column_and_classes_defaults(capsys):
    with pytest.raises(SystemExit):
        to_zarr.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sessions tables (default diagnosis)" in text and "(default NC EMCI LMCI AD)" in text


def test_one_scan_under_two_subject_ids_is_warned_at_conversion_and_training(tmp_path):
    """The same file listed twice is refused (a split would put it in train and test); a copy of
    it under another id is the same leak, seen from the checksums the table records."""
    from masan.data.contract import store_geometry

    rows = []
    for subject, label in (("a", "AD"), ("b", "NC")):
        (tmp_path / subject).mkdir()
        rows.append((subject, shutil.copy(DATA / "anatomical.nii", tmp_path / subject / "t1.nii"), "", label))
    man = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--manifest", str(man), "--out", str(out), "--require", "t1", "--no-progress"]) == 0
    note = "a, b have byte-identical t1 source files (sha256 "
    assert any(note in w and "--prune" in w for w in CohortStore(out).report()["warnings"])
    # a run's start logs the geometry's notes
    assert any(note in n for n in store_geometry(CohortStore(out), ["a", "b"], ["t1"]).notes)


def test_the_cohort_table_is_written_in_batches_and_holds_every_subject(tmp_path, monkeypatch):
    """The table is one JSON of every row: written after each subject it cost O(n^2) bytes. Rows
    join it in batches (a share of its size), and every converted subject is in it at the end."""
    from masan.convert import cohort

    bids = _synth(tmp_path, n=5)  # 5 per class: 20 subjects
    sizes = []
    write = cohort._write_table
    monkeypatch.setattr(cohort, "_write_table", lambda root, rows, *a, **kw: (sizes.append(len(rows)),
                                                                              write(root, rows, *a, **kw)))
    monkeypatch.setattr(cohort, "TABLE_EVERY_FRACTION", 0.5)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0
    store = CohortStore(out)
    assert len(store.subjects) == 20 and sorted(store.report()["converted"]) == store.subjects
    assert all(CohortStore(out).read_t1(s).shape == (16, 16, 16) for s in store.subjects)
    during = sizes[1:-1]  # between the start's write and the end's
    assert len(during) < 10 and sum(during) < 20 * 21 // 2 / 2, sizes


def test_verify_finds_statistics_an_older_version_let_past_float32(tmp_path):
    """A store converted before values past float32's range were refused holds Inf statistics
    (its subject's every prediction NaN): --verify names and reconverts it, inspect_store flags it."""
    from masan.convert.cohort import verify_published

    bids = _synth(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    args = ["--bids", str(bids), "--out", str(out), "--no-progress"]
    assert to_zarr.main(args) == 0
    store = CohortStore(out)
    subject = store.subjects[0]
    meta = out / store.group_path(subject) / "t1" / "zarr.json"
    record = json.loads(meta.read_text())
    record["attributes"]["masan"]["stats"]["std"] = float("inf")
    meta.write_text(json.dumps(record))  # as Python's json writes it: Infinity
    [bad] = verify_published(out, store.group_path(subject))
    assert "t1's normalisation statistics are not finite" in bad and "std inf" in bad
    assert to_zarr.main([*args, "--verify"]) == 0
    assert CohortStore(out).report()["converted"] == [subject]
    assert verify_published(out, CohortStore(out).group_path(subject)) == []
