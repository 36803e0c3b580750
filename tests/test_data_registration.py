"""to_zarr --register: heads moved away from the template land on its grid (T1 and fMRI alike), the
transforms are stored and re-apply, a known shift is recovered in the right direction, the options
fingerprint follows the registration, failures are per subject, --register none is today's store, and
SyN with one ITK thread per worker repeats every byte."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from scipy.spatial.transform import Rotation

from masan.convert import nifti, registration
from masan.convert.cohort import ConvertOptions
from masan.convert.registration import RegistrationError, ras_matrix, template_on_grid, to_ants
from masan.convert.template import grid_affine
from masan.store.cohort import REPORT, CohortStore
from masan.synth.anatomy import Nuisance, synthesize_anatomy_cohort
from test_data_convert import to_zarr, write_manifest

REPO = Path(__file__).resolve().parents[1]
T1_SHAPE, FMRI_SHAPE, FRAMES = (48, 56, 48), (12, 14, 12), 8
GRID_ARGS = ["--t1-shape", *map(str, T1_SHAPE), "--fmri-shape", *map(str, FMRI_SHAPE)]
CENTER = np.array([0.0, -17.0, 5.0])  # about the brain's centre, mm
# Bounds: what these subjects measured, with margin (docs/data-format.md, Registration: Tests).
MIN_CORR_AFTER, MAX_CORR_BEFORE, MAX_T1_ERR_MM, MAX_FMRI_ERR_MM = 0.93, 0.6, 0.5, 2.0


def rigid(deg_xyz, shift_mm):
    """(4, 4) mm -> mm: rotation (degrees about x, y, z) about CENTER, then a shift."""
    m = np.eye(4)
    r = Rotation.from_euler("xyz", deg_xyz, degrees=True).as_matrix()
    m[:3, :3], m[:3, 3] = r, CENTER - r @ CENTER + np.asarray(shift_mm, float)
    return m


def rewrite(src, dst, world=None, blank=False):
    """Copy a NIfTI with its stored values exactly but its affine moved by ``world`` (mm -> mm):
    the head now lies elsewhere in scanner space (``blank``: every voxel 0)."""
    img = nib.load(src)
    slabs = ((np.zeros_like(s) if blank else s) for _, s in nifti.iter_frame_slabs(img, 64))
    affine = img.affine if world is None else world @ img.affine
    nifti.write_nifti_slabs(dst, affine, img.shape, img.get_data_dtype(), slabs, img.header.get_zooms(),
                            scl_slope=float(img.dataobj.slope), scl_inter=float(img.dataobj.inter))
    return dst


def brain_points():
    """(N, 4) homogeneous mm points over the template brain (a coarse sample)."""
    shape, aff = T1_SHAPE, grid_affine(T1_SHAPE)
    _, brain = template_on_grid("mni152", shape, aff)
    idx = np.argwhere(brain)[::7]
    return np.c_[idx @ aff[:3, :3].T + aff[:3, 3], np.ones(len(idx))]


def mean_error_mm(a, b):
    pts = brain_points()
    return float(np.linalg.norm((pts @ a.T - pts @ b.T)[:, :3], axis=1).mean())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two subjects on the template without nuisance, written as they lie (``on``), with the whole
    head (T1 and fMRI alike, one session) rotated and shifted (``moved``), shifted 10 mm to the
    right (``shifted``), and a blank T1 (``blank``). Returns (tmp, manifest rows, truth)."""
    tmp = tmp_path_factory.mktemp("reg")
    bids = synthesize_anatomy_cohort(tmp / "bids", {"NC": 1, "AD": 1}, T1_SHAPE, FMRI_SHAPE, FRAMES,
                                     classes=("NC", "AD"), nuisance=Nuisance(misregistration_mm=0,
                                                                             misregistration_deg=0))
    src = {s: (bids / s / "anat" / f"{s}_T1w.nii.gz", bids / s / "func" / f"{s}_task-rest_bold.nii.gz")
           for s in ("sub-001", "sub-002")}
    truth = {"on": np.eye(4), "moved": rigid((8, -6, 12), (14, -9, 7)), "shifted": rigid((0, 0, 0), (10, 0, 0))}
    rows = []
    for name, subject, label in (("on", "sub-001", "NC"), ("moved", "sub-002", "AD"), ("shifted", "sub-001", "NC")):
        t1, bold = src[subject]
        rows.append((name, rewrite(t1, tmp / f"{name}_T1w.nii.gz", truth[name]),
                     rewrite(bold, tmp / f"{name}_bold.nii.gz", truth[name]), label))
    rows.append(("blank", rewrite(src["sub-002"][0], tmp / "blank_T1w.nii.gz", blank=True),
                 rewrite(src["sub-002"][1], tmp / "blank_bold.nii.gz"), "AD"))
    return tmp, rows, truth, src


def test_ants_images_follow_the_nifti_affine(tmp_path):
    """to_ants places voxels where ANTs' own NIfTI reader does (LPS), and a sheared affine is refused."""
    ants = registration._ants()
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", (20, -10, 35), degrees=True).as_matrix() @ np.diag([2.0, 1.5, 3.0])
    aff[:3, 3] = (10, -20, 5)
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "a.nii.gz")
    theirs, ours = ants.image_read(str(tmp_path / "a.nii.gz")), to_ants(arr, aff)
    assert np.array_equal(theirs.numpy(), ours.numpy())
    for key in ("origin", "spacing", "direction"):
        assert np.allclose(getattr(theirs, key), getattr(ours, key), atol=1e-5), key
    sheared = aff.copy()
    sheared[0, 1] += 0.5
    with pytest.raises(RegistrationError, match="shear"):
        to_ants(arr, sheared, "x.nii")
    # an ANTs translation of +3 mm in LPS x is 3 mm to the left: -3 in RAS x
    assert np.allclose(ras_matrix([1, 0, 0, 0, 1, 0, 0, 0, 1, 3, 0, 0], [0, 0, 0])[:3, 3], [-3, 0, 0])


@pytest.fixture(scope="module")
def registered(cohort):
    """The on/moved/shifted subjects converted with --register rigid (sources 640: nothing for others)."""
    tmp, rows, _, _ = cohort
    for _, t1, bold, _ in rows:
        os.chmod(t1, 0o640)
        os.chmod(bold, 0o640)
    store = tmp / "rigid.zarr"
    rc = to_zarr.main(["--manifest", str(write_manifest(tmp / "three.csv", rows[:3])), "--out", str(store),
                       "--register", "rigid", *GRID_ARGS, "--no-progress"])
    assert rc == 0
    return CohortStore(store)


def test_moved_heads_land_on_the_template_grid(registered, cohort):
    store, (_, _, truth, _) = registered, cohort
    assert store.attrs["registration"]["type"] == "rigid" and store.attrs["registration"]["template"] == "mni152"
    tpl, brain = template_on_grid("mni152", T1_SHAPE, grid_affine(T1_SHAPE))
    for s in ("on", "moved", "shifted"):
        assert store.shape(s, "t1") == T1_SHAPE and store.shape(s, "fmri") == (FRAMES,) + FMRI_SHAPE
        assert np.allclose(store.affine(s, "t1"), grid_affine(T1_SHAPE))
        assert np.allclose(store.affine(s, "fmri"), grid_affine(FMRI_SHAPE))
        t1 = store.read_t1(s, normalize=False)
        corr = registration.correlation(t1, tpl, brain)
        rec = store.meta(s, "t1")["registration"]["template_correlation"]
        assert corr > MIN_CORR_AFTER and abs(corr - rec["after"]) < 0.01, (s, corr, rec)
        reg = dict(zarr.open_group(str(store.path / store.group_path(s) / "registration"), mode="r").attrs)["masan"]
        assert reg["itk_threads"] == registration.threads() >= 1
        # ANTs' forward transform maps template points to subject points: the head's move itself
        found = np.asarray(reg["t1_to_template"]["affine"]["matrix_ras"])
        assert mean_error_mm(found, truth[s]) < MAX_T1_ERR_MM, s
        # the fMRI moved with the head: its fit to the T1 is (nearly) the identity
        assert mean_error_mm(np.asarray(reg["fmri_to_t1"]["affine"]["matrix_ras"]), np.eye(4)) < MAX_FMRI_ERR_MM, s
    for s in ("moved", "shifted"):
        assert store.meta(s, "t1")["registration"]["template_correlation"]["before"] < MAX_CORR_BEFORE
    # a head 10 mm to the right is found 10 mm to the right
    shift = np.asarray(dict(zarr.open_group(str(store.path / store.group_path("shifted") / "registration"),
                                            mode="r").attrs)["masan"]["t1_to_template"]["affine"]["matrix_ras"])
    assert np.allclose(shift[:3, 3], [10, 0, 0], atol=0.5) and np.allclose(shift[:3, :3], np.eye(3), atol=0.01)


def test_fmri_lands_where_its_t1_landed(registered, cohort):
    """The moved run, registered, matches the run that lay on the template all along."""
    store, (_, _, _, src) = registered, cohort
    _, brain = template_on_grid("mni152", FMRI_SHAPE, grid_affine(FMRI_SHAPE))
    truth = np.asarray(nib.load(src["sub-002"][1]).dataobj, dtype=np.float32).mean(axis=3)
    got = store.read_fmri("moved", normalize=False).mean(axis=0)
    assert registration.correlation(got, truth, brain) > 0.97
    rec = store.meta("moved", "fmri")["registration"]["brain_dice"]
    assert rec["after"] > 0.85 and rec["after"] > rec["before"] + 0.05, rec


def test_transforms_are_stored_with_the_store_permissions_and_reapply(registered, cohort, tmp_path):
    store, (_, rows, _, _) = registered, cohort
    ants = registration._ants()
    group = zarr.open_group(str(store.path / store.group_path("moved")), mode="r")
    lists = registration.transform_files(group, tmp_path / "tx")
    src = nib.load(rows[1][1])
    fixed = to_ants(np.zeros(T1_SHAPE, np.float32), grid_affine(T1_SHAPE))
    moving = to_ants(np.asarray(src.dataobj.get_unscaled(), np.float32), src.affine)
    again = ants.apply_transforms(fixed, moving, lists["t1"], whichtoinvert=[False] * len(lists["t1"])).numpy()
    stored = store.read_raw("moved", "t1").astype(np.float32)
    assert np.abs(again - stored).max() <= 1.0 + 1e-3 * np.abs(stored).max()  # int16 rounding, float32 ANTs
    assert len(lists["fmri"]) == len(lists["t1"]) + 1
    back = ants.apply_transforms(moving, to_ants(stored, grid_affine(T1_SHAPE)), lists["t1_inverse"],
                                 whichtoinvert=[True]).numpy()  # the template-space T1 back onto the subject's
    head = (moving.numpy() > 100) & (back > 100)
    assert np.corrcoef(back[head], moving.numpy()[head])[0, 1] > 0.9
    t1_mode = (store.path / store.group_path("moved") / "t1" / "zarr.json").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in store.path.rglob("*")
             if p.is_file() and "registration" in p.parts}
    assert modes and set(modes.values()) == {t1_mode} and not t1_mode & 0o007, (modes, t1_mode)
    assert not any(p.name.endswith(".ants") for p in store.path.rglob("*"))  # ANTs' scratch files are gone


def test_fingerprint_follows_the_registration():
    today = {"canonical", "t1_shape", "fmri_shape", "patch_grid", "fmri_chunk_frames", "fmri_shard_frames",
             "codec", "clevel", "shuffle", "levels", "nan", "format_version"}
    none = ConvertOptions().fingerprint()
    assert set(none) == today and ConvertOptions(register="none", threads=3).fingerprint() == none
    rigid_fp = ConvertOptions(register="rigid").fingerprint()
    assert rigid_fp["registration"]["type"] == "rigid" and rigid_fp["registration"]["template"] == "mni152"
    assert len({str(ConvertOptions(register=k).fingerprint()) for k in registration.TYPES}) == 4
    assert ConvertOptions(register="rigid", t1_shape=(40, 48, 40)).fingerprint() != rigid_fp
    assert ConvertOptions(register="rigid", threads=1).fingerprint() == rigid_fp


def test_rerun_skips_then_redoes_with_other_settings_and_none_drops_registration(registered, cohort):
    tmp, rows, _, _ = cohort
    path = tmp / "rerun.zarr"
    shutil.copytree(registered.path, path)  # the other tests keep the registered store
    args = ["--manifest", str(tmp / "three.csv"), "--out", str(path), *GRID_ARGS, "--no-progress"]
    assert to_zarr.main([*args, "--register", "rigid"]) == 0
    report = json.loads((path / REPORT).read_text())
    assert sorted(report["skipped"]) == ["moved", "on", "shifted"] and not report["converted"]
    assert to_zarr.main(args) == 0  # --register none (the default): every subject redone, unregistered
    report = json.loads((path / REPORT).read_text())
    assert sorted(report["converted"]) == ["moved", "on", "shifted"]
    store = CohortStore(path)
    assert "registration" not in store.attrs
    assert not list(path.rglob("registration"))
    assert np.allclose(store.affine("moved", "t1"), nib.load(rows[1][1]).affine @ np.eye(4))


def test_failed_registration_fails_its_subject_only(cohort, capsys):
    tmp, rows, _, _ = cohort
    store = tmp / "fail.zarr"
    rc = to_zarr.main(["--manifest", str(write_manifest(tmp / "fail.csv", [rows[0], rows[3]])), "--out", str(store),
                       "--register", "affine", *GRID_ARGS, "--workers", "2", "--no-progress"])
    assert rc == 1
    st = CohortStore(store)
    assert st.subjects == ["on"] and st.meta("on", "t1")["registration"]["type"] == "affine"
    (failure,) = st.report()["failed"]
    assert failure["subject"] == "blank" and failure["file"] == str(rows[3][1])
    assert "registration of subject blank failed" in failure["error"] and "--register" in failure["error"]
    assert "FAILED blank" in capsys.readouterr().err


def test_register_none_is_the_store_without_registration(cohort):
    """Byte for byte (but for version names and times), --register none writes what no flag writes."""
    tmp, rows, _, _ = cohort
    csv_path = write_manifest(tmp / "one.csv", rows[1:2])
    for name, extra in (("plain", []), ("none", ["--register", "none"])):
        assert to_zarr.main(["--manifest", str(csv_path), "--out", str(tmp / f"{name}.zarr"), "--no-progress",
                             *extra]) == 0

    def files(store):
        out = {}
        for p in sorted(store.rglob("*")):
            if p.is_file() and p.name not in (REPORT, ".lock", ".lock.workers"):
                rel = "/".join("v" if part.startswith("v1") else part for part in p.relative_to(store).parts)
                text = p.read_bytes()
                if p.name == "zarr.json":
                    meta = json.loads(text)
                    for row in meta.get("attributes", {}).get("cohort", []):
                        row.pop("group")
                    meta.get("attributes", {}).pop("last_conversion", None)
                    meta.get("attributes", {}).get("masan", {}).pop("current", None)  # a subject group's version
                    text = json.dumps(meta, sort_keys=True).encode()
                out[rel] = text
        return out

    plain, none = files(tmp / "plain.zarr"), files(tmp / "none.zarr")
    assert plain.keys() == none.keys() and all(plain[k] == none[k] for k in plain), \
        [k for k in plain if plain[k] != none.get(k)]
    assert "registration" not in CohortStore(tmp / "none.zarr").attrs


def test_qc_report_draws_the_template_and_flags_a_poor_fit(registered, tmp_path):
    from masan.qc.options import QCOptions
    from masan.qc.report import write_report

    res = write_report(registered.path, tmp_path / "qc", QCOptions(subjects=["moved"], progress=False))
    assert (tmp_path / "qc" / "moved_registration.png").is_file()
    assert "registration" not in res["flagged"].get("moved", [])  # (3 subjects: the cohort z-scores may flag)
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "registration: rigid to mni152" in page and "correlation with the template 0.26" in page
    strict = write_report(registered.path, tmp_path / "qc", QCOptions(subjects=["moved"], progress=False,
                                                                      min_template_corr=0.999, min_brain_dice=0.999))
    assert "registration" in strict["flagged"]["moved"]
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "t1 correlation with the template is 0.98 after registration, under 0.999" in page


def _chunk_bytes(store_path):
    """{path under subjects/<s>/current: bytes} of every array chunk (metadata, which names the
    version folders and times, left out)."""
    out = {}
    for current in sorted(store_path.glob("subjects/*/current")):
        for f in sorted(current.rglob("*")):
            if f.is_file() and f.name != "zarr.json":
                out[str(f.relative_to(store_path))] = f.read_bytes()
    return out


def test_syn_with_one_itk_thread_per_worker_repeats_every_byte(cohort):
    """What experiments.science relies on for a repeatable cohort: SyN with --threads 1 and parallel
    workers, run twice in fresh processes (ITK reads its thread count once per process)."""
    tmp, rows, _, _ = cohort
    manifest = write_manifest(tmp / "two.csv", rows[:2])
    chunks = []
    for copy in ("syn_a.zarr", "syn_b.zarr"):
        subprocess.run([sys.executable, str(REPO / "data_tools/to_zarr.py"), "--manifest", str(manifest),
                        "--out", str(tmp / copy), "--register", "syn", "--template", "mni152", *GRID_ARGS,
                        "--threads", "1", "--workers", "2", "--no-progress"], check=True, cwd=REPO)
        chunks.append(_chunk_bytes(tmp / copy))
    assert len(chunks[0]) > 0 and chunks[0].keys() == chunks[1].keys()
    assert any("registration" in k for k in chunks[0])  # the transforms are compared too
    assert [k for k in chunks[0] if chunks[0][k] != chunks[1][k]] == []
    store = CohortStore(tmp / "syn_a.zarr")
    threads = {dict(zarr.open_group(str(store.path / store.group_path(s) / "registration"), mode="r").attrs)
               ["masan"]["itk_threads"] for s in store.subjects}
    assert threads == {1}, "each subject records the ITK threads that make its bytes repeatable"


def test_a_fit_under_the_qc_floor_or_a_large_move_within_the_session_is_warned_at_conversion(tmp_path):
    """Stored all the same (the QC report shows it; the user decides), but said at conversion, naming
    the subject: a registration can also fail from a poor start (no header placement to compare),
    and a bad T1 fit drags its session's fMRI far off through the within-session rigid fit."""
    reg = registration.SubjectRegistration("rigid", "mni152", T1_SHAPE, FMRI_SHAPE, tmp_path, "sub-9")
    reg._check("t1.nii.gz", "correlation with the template", {"before": None, "after": 0.10},
               registration.MIN_TEMPLATE_CORRELATION)
    reg._check("t1.nii.gz", "correlation with the template", {"before": 0.95, "after": 0.96},
               registration.MIN_TEMPLATE_CORRELATION)
    (under,) = reg.warnings
    assert "the correlation with the template is 0.100, under 0.7" in under and "subject sub-9" in under
    moved = np.eye(4)
    moved[:3, 3] = [-70.0, 48.0, -60.0]
    reg._check_session_motion("bold.nii.gz", moved.tolist(), (32, 38, 32), np.eye(4))
    reg._check_session_motion("bold.nii.gz", np.eye(4).tolist(), (32, 38, 32), np.eye(4))
    assert len(reg.warnings) == 2 and "moves the run's centre 104 mm and turns it 0 degrees" in reg.warnings[1]
