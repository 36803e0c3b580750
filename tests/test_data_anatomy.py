"""The MNI152 validation cohort and its oracle: real anatomy, planted effects that land where
the truth record says (in the store's voxel space too), nuisance that varies, an oracle that
separates NC from AD but not the four classes trivially, and reproducible files."""

import csv
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from sklearn.model_selection import StratifiedKFold, cross_val_score

from masan.convert import template
from masan.evaluate import oracle
from masan.evaluate.oracle import feature_names, oracle_predict, planted_features, planted_masks, planted_region_ranks
from masan.store.cohort import CohortStore
from masan.synth import anatomy, structures
from masan.synth.anatomy import Nuisance, synthesize_anatomy_cohort
from masan.synth.deformation import voxel_centers_mm
from masan.synth.phantom import PlantedEffect, _affine, synthesize_cohort

ROOT = Path(__file__).resolve().parents[1]
T1_SHAPE, FMRI_SHAPE, FRAMES = (48, 56, 48), (12, 14, 12), 16


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _to_zarr(bids, store, *extra):
    assert _tool("to_zarr").main(["--bids", str(bids), "--out", str(store), "--no-progress", *extra]) == 0
    return CohortStore(store)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Default shapes and effect, 8 subjects per class (32), converted by to_zarr.py."""
    tmp = tmp_path_factory.mktemp("mni")
    bids = synthesize_anatomy_cohort(tmp / "bids", 8, T1_SHAPE, FMRI_SHAPE, FRAMES, seed=0)
    store = _to_zarr(bids, tmp / "s.zarr")
    X = planted_features(store, store.subjects)
    y = np.array([store.label(s) for s in store.subjects])
    return bids, store, X, y


def test_cohort_files_and_truth_record(cohort):
    bids, store, _, _ = cohort
    rows = list(csv.DictReader(open(bids / "participants.tsv"), delimiter="\t"))
    assert len(rows) == 32 and rows[:4] == [{"participant_id": f"sub-00{i + 1}", "diagnosis": c}
                                            for i, c in enumerate(("NC", "EMCI", "LMCI", "AD"))]
    t1 = nib.load(bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    bold = nib.load(bids / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz")
    assert t1.shape == T1_SHAPE and t1.get_data_dtype() == np.int16
    assert bold.shape == FMRI_SHAPE + (FRAMES,) and bold.get_data_dtype() == np.int16
    assert bold.header.get_zooms()[3] == 2.0 and bold.header.get_xyzt_units() == ("mm", "sec")
    slope = float(bold.dataobj.slope)  # nibabel moves scl_slope from the header to dataobj
    assert 0 < slope < 1 and store.meta("sub-001", "fmri")["nifti"]["scl_slope"] == slope  # int16 x scl_slope
    assert np.allclose(t1.affine, template.grid_affine(T1_SHAPE))
    # one field of view for both modalities (proportional shapes)
    fov = lambda img: np.diag(img.affine)[:3] * np.array(img.shape[:3])  # noqa: E731
    assert np.allclose(fov(t1), fov(bold))

    effect = store.attrs["planted_effect"]
    assert effect == json.loads((bids / "planted_effect.json").read_text())
    assert effect["anatomy"] == "mni152" and list(effect["structures"]) == ["hippocampus", "amygdala"]
    hippocampus = structures.STRUCTURES["hippocampus"]
    assert effect["structures"]["hippocampus"][1]["center_mm"] == list(hippocampus[1].center_mm)
    assert effect["fmri_effect"] == ["amplitude", "connectivity"] and effect["partner"] == {
        "posterior_cingulate": [e.record() for e in structures.STRUCTURES["posterior_cingulate"]]}
    assert effect["severity"] == {"NC": 0.0, "EMCI": 1 / 3, "LMCI": 2 / 3, "AD": 1.0}
    sev = effect["subject_severity"]
    assert sorted(sev) == store.subjects and all(0 <= v <= 1 for v in sev.values())
    by_class = {c: [sev[s] for s in store.subjects if store.label(s) == c] for c in store.classes}
    means = [np.mean(by_class[c]) for c in ("NC", "EMCI", "LMCI", "AD")]
    assert means == sorted(means) and 0 < np.std(by_class["EMCI"]) < 0.3  # graded and jittered


def test_masks_land_in_the_structures_on_the_store_grid(cohort):
    _, store, _, _ = cohort
    effect, s = store.attrs["planted_effect"], store.subjects[0]
    shape, aff = store.shape(s, "t1"), store.affine(s, "t1")
    gm = template.sample(template.prepared(("gm",), template.voxel_size(aff)), shape, aff)
    brain = template.sample(template.prepared(("brain",), template.voxel_size(aff)), shape, aff)
    masks = planted_masks(effect, shape, aff, "t1")
    assert set(masks) == {"hippocampus", "amygdala"}
    for name, m in masks.items():
        assert m.sum() >= 20, name
        assert gm[m].min() > 0.2 and gm[m].mean() > 0.5, f"{name}: mask must be grey matter"
        assert brain[m].min() > 0.9
    # hippocampus mask voxels are near the hippocampus centres (left and right halves)
    pts = voxel_centers_mm(shape, aff)[masks["hippocampus"]]
    assert (pts[:, 0] < 0).any() and (pts[:, 0] > 0).any()
    assert np.abs(np.abs(pts[:, 0]) - 26).max() < 12 and np.abs(pts[:, 1] + 22).max() < 20
    fmasks = planted_masks(effect, store.shape(s, "fmri"), store.affine(s, "fmri"), "fmri")
    assert all(m.any() for m in fmasks.values())
    # region ranks on the store grid: the record's (no transform here), hippocampus cells first
    ranks = planted_region_ranks(effect, shape, aff, (4, 4, 4))
    assert ranks == effect["region_ranks"]["t1"]["4x4x4"] and len(ranks) >= 2
    counts = structures.region_counts(np.logical_or(*masks.values()), (4, 4, 4))
    assert counts[ranks[0]] == counts.max() and set(np.flatnonzero(counts)) == set(ranks)


def test_planted_features_separate_nc_from_ad_but_not_all_classes(cohort):
    _, store, X, y = cohort
    names = feature_names(store.attrs["planted_effect"])
    assert X.shape == (32, len(names)) == (32, 6) and np.isfinite(X).all()
    nc, ad = X[y == "NC"], X[y == "AD"]
    sd = np.sqrt((nc.var(axis=0, ddof=1) + ad.var(axis=0, ddof=1)) / 2)
    d = (nc.mean(axis=0) - ad.mean(axis=0)) / sd  # NC - AD in pooled between-subject SDs
    for j, n in enumerate(names):
        if n.startswith("t1_mean"):
            assert d[j] > 3, f"{n}: atrophy must lower the z-scored T1 by several SDs (got {d[j]:.2f})"
        elif n.startswith("fmri_std"):
            assert d[j] > 1, f"{n}: fluctuations must be damped in AD (got {d[j]:.2f})"
        else:
            assert d[j] > 0.3, f"{n}: coupling must drop in AD (got {d[j]:.2f})"
    m = np.isin(y, ["NC", "AD"])
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    acc2 = cross_val_score(oracle.oracle_model(), X[m], y[m], cv=cv).mean()
    acc4 = cross_val_score(oracle.oracle_model(), X, y, cv=cv).mean()
    assert acc2 > 0.9, f"oracle NC vs AD accuracy {acc2:.2f}"
    assert 0.35 < acc4 < 0.9, f"4-class accuracy {acc4:.2f}: neighbouring classes must overlap"
    prob = oracle_predict(X[:16], y[:16], X[16:])
    assert prob.shape == (16, 4) and np.allclose(prob.sum(axis=1), 1)


def test_nuisance_varies_between_subjects_and_is_real(cohort):
    _, store, _, _ = cohort
    effect = store.attrs["planted_effect"]
    nui = effect["subject_nuisance"]
    for mod in ("t1", "fmri"):
        gains = [nui[s][mod]["gain"] for s in store.subjects]
        assert 0.02 < np.std(gains) and max(abs(g - 1) for g in gains) <= 0.1
        assert len({tuple(nui[s][mod]["bias_range"]) for s in store.subjects}) == 32
        shifts = np.array([nui[s][mod]["motion"]["translation_mm"] for s in store.subjects])
        rots = np.array([nui[s][mod]["motion"]["rotation_deg"] for s in store.subjects])
        assert np.linalg.norm(shifts, axis=1).max() <= 3 and np.linalg.norm(rots, axis=1).max() <= 3
        assert np.linalg.norm(shifts, axis=1).std() > 0.3 and np.linalg.norm(rots, axis=1).std() > 0.3
    # The brain really moved: its centre of mass in each stored T1 follows -translation.
    com, t = [], []
    for s in store.subjects:
        raw = store.read_raw(s, "t1") > 0
        idx = np.array(ndimage.center_of_mass(raw))
        aff = store.affine(s, "t1")
        com.append(aff[:3, :3] @ idx + aff[:3, 3])
        t.append(nui[s]["t1"]["motion"]["translation_mm"])
    com, t = np.array(com), np.array(t)
    for axis in range(3):
        assert np.corrcoef(com[:, axis], -t[:, axis])[0, 1] > 0.8
    means = [store.meta(s, "t1")["stats"]["mean"] for s in store.subjects]
    assert np.std(means) / np.mean(means) > 0.02  # gain and bias change the intensities


def test_masks_are_right_in_store_space_after_reorient_and_crop(tmp_path):
    """Written in ASL voxel order, converted with --canonical and a crop/pad: the masks from
    the store's affine are the RAS-grid masks shifted by the crop, and the (noise-free)
    AD-minus-NC T1 difference lies inside the T1 mask."""
    t1_shape, f_shape = (40, 48, 40), (10, 12, 10)
    bids = synthesize_anatomy_cohort(
        tmp_path / "bids", {"NC": 1, "AD": 1}, t1_shape, f_shape, 3, severity_sd=0.0, orientation="ASL",
        nuisance=Nuisance(gain=0, bias=0, misregistration_mm=0, misregistration_deg=0, t1_noise=0, epi_noise=0))
    assert nib.aff2axcodes(nib.load(bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz").affine) == ("A", "S", "L")
    store = _to_zarr(bids, tmp_path / "s.zarr", "--canonical", "--t1-shape", "36", "52", "38",
                     "--fmri-shape", "8", "14", "10")
    effect = store.attrs["planted_effect"]
    nc, ad = store.subjects
    assert store.label(ad) == "AD"
    for mod, shape in (("t1", t1_shape), ("fmri", f_shape)):
        tr = store.meta(nc, mod)["transform"]
        assert tr["reoriented_to"] == "RAS"
        out_shape = tuple(tr["out_shape"])
        ref = planted_masks(effect, shape, template.grid_affine(shape), mod)  # on the RAS grid as synthesized
        got = planted_masks(effect, out_shape, store.affine(nc, mod), mod)
        for name in ref:
            want = np.zeros(out_shape, bool)
            src, dst = [], []
            for n_in, n_out, o in zip(shape, out_shape, tr["crop_pad_offset"]):
                s0, d0 = max(o, 0), max(-o, 0)
                n = min(n_in - s0, n_out - d0)
                src.append(slice(s0, s0 + n))
                dst.append(slice(d0, d0 + n))
            want[tuple(dst)] = ref[name][tuple(src)]
            assert got[name].sum() > 0 and np.array_equal(got[name], want), (mod, name)
    masks = planted_masks(effect, store.shape(nc, "t1"), store.affine(nc, "t1"))
    union = np.logical_or.reduce(list(masks.values()))
    diff = store.read_t1(ad, normalize=False) - store.read_t1(nc, normalize=False)
    assert union[np.unravel_index(np.argmin(diff), diff.shape)]
    near = ndimage.binary_dilation(union, iterations=2)
    assert np.abs(diff[near]).sum() > 0.9 * np.abs(diff).sum()


def test_phantom_record_gets_an_oracle_too(tmp_path):
    effect = PlantedEffect().record()
    for shape in ((32, 32, 32), (16, 16, 16), (24, 20, 28)):
        aff, _ = _affine(shape)
        assert np.array_equal(planted_masks(effect, shape, aff)["ball"], PlantedEffect().mask(shape))
    aff, _ = _affine((32, 32, 32))
    assert planted_region_ranks(effect, (32, 32, 32), aff, (4, 4, 4)) == [21]
    assert planted_region_ranks(effect, (32, 32, 32), aff, (2, 2, 2)) == [0]
    bids = synthesize_cohort(tmp_path / "bids", 3)
    store = _to_zarr(bids, tmp_path / "s.zarr", "--canonical", "--t1-shape", "30", "34", "32")
    s = store.subjects[0]
    m = planted_masks(store.attrs["planted_effect"], store.shape(s, "t1"), store.affine(s, "t1"))["ball"]
    want = np.zeros((30, 34, 32), bool)  # centre crop/pad: offsets (1, -1, 0)
    want[:, 1:33, :] = PlantedEffect().mask((32, 32, 32))[1:31]
    assert np.array_equal(m, want)
    X = planted_features(store, store.subjects)
    y = np.array([store.label(s) for s in store.subjects])
    assert feature_names(store.attrs["planted_effect"]) == ["t1_mean:ball", "fmri_std:ball"]
    assert (X[y == "NC"].min(axis=0) > X[y == "AD"].max(axis=0)).all()


def test_run_is_written_in_frame_blocks_and_same_seed_same_files(tmp_path):
    kw = dict(n_per_class={"AD": 1}, t1_shape=(16, 20, 16), fmri_shape=(6, 7, 6), frames=7, slab_frames=3)
    a = synthesize_anatomy_cohort(tmp_path / "a", **kw)
    b = synthesize_anatomy_cohort(tmp_path / "b", **kw)
    c = synthesize_anatomy_cohort(tmp_path / "c", seed=1, **kw)
    bold = "sub-001/func/sub-001_task-rest_bold.nii.gz"
    img = nib.load(a / bold)
    data = np.asarray(img.dataobj)  # 7 frames from three blocks of <= 3
    assert img.shape == (6, 7, 6, 7) and data.shape[3] == 7
    brain = data.mean(axis=3) > 0.5 * data.mean(axis=3).max()
    frame_means = data[brain].mean(axis=0)
    assert np.ptp(frame_means) < 0.02 * frame_means.mean()  # no jump between blocks
    assert all(not np.array_equal(data[..., t], data[..., t + 1]) for t in range(6))
    for f in ("sub-001/anat/sub-001_T1w.nii.gz", bold):
        assert np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(b / f).dataobj))
        assert not np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(c / f).dataobj))
    assert (a / "planted_effect.json").read_text() == (b / "planted_effect.json").read_text()


def test_stages_order_the_modalities_along_the_disease_course(tmp_path):
    """--stages: a modality's effect is 0 before its window and full after it, so with T1
    starting at 0.5 an EMCI subject (severity 1/3) has the T1 and the EPI baseline of an
    unaffected brain, with its fMRI effect unchanged, while an AD subject's T1 is atrophied."""
    assert [anatomy.stage(s, (0.25, 0.75)) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert anatomy.stage(0.4, (0.4, 0.4)) == 1.0 and anatomy.stage(0.3, (0.4, 0.4)) == 0.0
    kw = dict(n_per_class={"EMCI": 1, "AD": 1}, t1_shape=(16, 20, 16), fmri_shape=(6, 7, 6), frames=4,
              severity_sd=0.0, classes=("EMCI", "AD"))
    staged = synthesize_anatomy_cohort(tmp_path / "staged", stages={"t1": (0.5, 1.0)}, **kw)
    no_t1 = synthesize_anatomy_cohort(tmp_path / "no_t1", strength=(0.0, anatomy.DEFAULT_STRENGTH[1]), **kw)

    def img(root, subject, kind):
        sub = {"t1": f"{subject}/anat/{subject}_T1w.nii.gz", "bold": f"{subject}/func/{subject}_task-rest_bold.nii.gz"}
        return np.asarray(nib.load(root / sub[kind]).dataobj)

    assert np.array_equal(img(staged, "sub-001", "t1"), img(no_t1, "sub-001", "t1"))  # EMCI: no atrophy yet
    assert np.array_equal(img(staged, "sub-001", "bold"), img(no_t1, "sub-001", "bold"))
    assert not np.array_equal(img(staged, "sub-002", "t1"), img(no_t1, "sub-002", "t1"))  # AD: atrophied
    assert json.loads((staged / "planted_effect.json").read_text())["stages"] == {"t1": [0.5, 1.0],
                                                                                  "fmri": [0.0, 1.0]}
    with pytest.raises(ValueError, match="stage window"):
        synthesize_anatomy_cohort(tmp_path / "bad", stages={"fmri": (0.8, 0.2)}, **kw)


def test_cli_writes_an_mni152_cohort(tmp_path):
    cli = _tool("synth_cohort")
    assert cli.main(["--anatomy", "mni152", "--out", str(tmp_path / "m"), "--per-class", "1", "--classes", "NC",
                     "AD", "--t1-shape", "16", "20", "16", "--fmri-shape", "6", "7", "6", "--frames", "3",
                     "--structures", "hippocampus", "entorhinal", "--fmri-effect", "amplitude",
                     "--strength", "0.4", "0.5", "--stages", "0.5", "1", "0", "0.5"]) == 0
    effect = json.loads((tmp_path / "m" / "planted_effect.json").read_text())
    assert list(effect["structures"]) == ["hippocampus", "entorhinal"] and effect["fmri_effect"] == ["amplitude"]
    assert (effect["strength_t1"], effect["strength_fmri"]) == (0.4, 0.5)
    assert effect["stages"] == {"t1": [0.5, 1.0], "fmri": [0.0, 0.5]}
    assert feature_names(effect) == ["t1_mean:hippocampus", "t1_mean:entorhinal",
                                     "fmri_std:hippocampus", "fmri_std:entorhinal"]
    assert nib.load(tmp_path / "m" / "sub-002" / "func" / "sub-002_task-rest_bold.nii.gz").shape == (6, 7, 6, 3)
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "p"), "--structures", "hippocampus"])  # phantom has no structures


def test_inspect_store_names_the_planted_structures(cohort, capsys):
    """inspect_store.py on an MNI152 store (it used to read a phantom's ball from every record)."""
    _, store, _, _ = cohort
    assert _tool("inspect_store").main([str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "planted effect: hippocampus, amygdala" in out and "partner posterior_cingulate" in out
