"""The adni-like preset of the MNI152 validation cohort: the paper's class proportions, a
severity per modality drawn independently, a smooth warp and an unregistered head placement
per subject kept in the truth record, and an oracle that measures each subject in its own
space (unregistered store) or the template's (registered store). Small shapes: seconds each."""

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from masan.convert import template
from masan.evaluate import oracle
from masan.store.cohort import CohortStore
from masan.synth import anatomy, deformation, presets
from masan.synth.anatomy import Nuisance, synthesize_anatomy_cohort
from masan.synth.deformation import Geometry, SubjectTransform, Warp, draw_warp, rms_length, transform_from_record
from masan.synth.presets import PAPER_CLASS_COUNTS, PRESETS, class_counts

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--t1-shape", "16", "20", "16", "--fmri-shape", "6", "7", "6"]
QUIET = dict(gain=0.0, bias=0.0, t1_noise=0.0, epi_noise=0.0)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(bids):
    return json.loads((bids / "planted_effect.json").read_text())


def _t1(bids, subject="sub-001"):
    return np.asarray(nib.load(bids / subject / "anat" / f"{subject}_T1w.nii.gz").dataobj).astype(np.float64)


def test_class_counts_follow_the_papers_proportions():
    assert class_counts(96, PAPER_CLASS_COUNTS) == {"NC": 30, "EMCI": 16, "LMCI": 17, "AD": 33}
    assert class_counts(206, PAPER_CLASS_COUNTS) == PAPER_CLASS_COUNTS
    for n in (4, 12, 50, 97, 500):
        counts = class_counts(n, PAPER_CLASS_COUNTS)
        exact = {c: n * v / 206 for c, v in PAPER_CLASS_COUNTS.items()}
        assert sum(counts.values()) == n and all(abs(counts[c] - exact[c]) < 1 for c in counts)
    assert class_counts(10, PAPER_CLASS_COUNTS, ["AD", "NC"]) == {"AD": 5, "NC": 5}
    with pytest.raises(ValueError, match="no class proportion"):
        class_counts(10, PAPER_CLASS_COUNTS, ["NC", "MCI"])
    assert PRESETS["adni-like"].counts(["NC", "EMCI", "LMCI", "AD"]) == class_counts(96, PAPER_CLASS_COUNTS)
    assert PRESETS["easy"].counts(["NC", "AD"]) == {"NC": 16, "AD": 16}


def test_cli_adni_like_writes_the_preset_and_refuses_easy_options(tmp_path):
    cli = _tool("synth_cohort")
    out = tmp_path / "adni"
    assert cli.main(["--anatomy", "mni152", "--preset", "adni-like", "--out", str(out), "--subjects", "12", *TINY]) == 0
    rows = (out / "participants.tsv").read_text().split("\n")[1:-1]
    labels = [r.split("\t")[1] for r in rows]
    assert {c: labels.count(c) for c in PAPER_CLASS_COUNTS} == class_counts(12, PAPER_CLASS_COUNTS)
    rec = _record(out)
    adni = PRESETS["adni-like"]
    assert rec["fmri_effect"] == ["connectivity"] and rec["geometry"] == {
        "warp_rms_mm": 2.5, "warp_control_points": 8, "fmri_offset_mm": 2.0, "fmri_offset_deg": 2.0}
    assert (rec["strength_t1"], rec["strength_fmri"]) == adni.strength
    assert rec["severity_sd"] == dict(zip(("t1", "fmri"), adni.severity_sd))
    assert rec["nuisance"]["misregistration_mm"] == 6.0 and rec["nuisance"]["misregistration_deg"] == 6.0
    assert nib.load(out / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz").shape == (6, 7, 6, 48)
    assert oracle.feature_names(rec)[-2:] == ["fmri_conn:hippocampus", "fmri_conn:amygdala"]
    for bad in (["--preset", "adni-like", "--per-class", "3"], ["--subjects", "12"], ["--warp-rms", "1"],
                ["--preset", "adni-like", "--severity-sd", "0.1", "0.2", "0.3"]):
        with pytest.raises(SystemExit):
            cli.main(["--anatomy", "mni152", "--out", str(tmp_path / "x"), *TINY, *bad])
    with pytest.raises(SystemExit):  # the phantom has no presets
        cli.main(["--out", str(tmp_path / "p"), "--preset", "adni-like"])


def test_preset_easy_is_the_default_and_unchanged(tmp_path):
    cli = _tool("synth_cohort")
    args = ["--anatomy", "mni152", "--per-class", "1", "--classes", "NC", "AD", *TINY, "--frames", "3"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--preset", "easy"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    rec = _record(tmp_path / "a")
    assert "geometry" not in rec and rec["severity_sd"] == 0.15
    assert rec["fmri_effect"] == ["amplitude", "connectivity"]
    assert all(isinstance(v, float) for v in rec["subject_severity"].values())
    nui = rec["subject_nuisance"]["sub-001"]
    assert "warp" not in nui and "matrix" not in nui["t1"]["motion"]
    # the oracle rebuilds an easy subject's rigid misregistration from its record
    tf = transform_from_record(rec, "sub-001", "fmri")
    m = nui["fmri"]["motion"]
    want = deformation.rigid_matrix(m["translation_mm"], np.deg2rad(m["rotation_deg"]), m["rotation_center_mm"])
    assert tf.warp is None and np.allclose(tf.rigid, want)


def test_each_modality_draws_its_own_severity(tmp_path):
    """severity_sd=(t1, fmri): two independent draws, each with its own spread, the T1 effect
    following the first and the fMRI coupling the second (geometry off: fast)."""
    n, k_f = 40, 0.9
    bids = synthesize_anatomy_cohort(tmp_path / "b", {"LMCI": n}, (8, 10, 8), (4, 5, 4), 2, classes=("LMCI",),
                                     severity_sd=(0.05, 0.2), strength=(0.5, k_f), fmri_effect=("connectivity",))
    rec = _record(bids)
    sev = rec["subject_severity"]
    s1 = np.array([sev[s]["t1"] for s in sorted(sev)])
    sf = np.array([sev[s]["fmri"] for s in sorted(sev)])
    assert len(s1) == n and abs(s1.mean() - 2 / 3) < 0.05 and abs(sf.mean() - 2 / 3) < 0.1
    assert 0.03 < s1.std() < 0.08 and 0.13 < sf.std() < 0.3
    assert abs(np.corrcoef(s1, sf)[0, 1]) < 0.4
    coupling = np.array([rec["subject_nuisance"][s]["fmri"]["coupling"] for s in sorted(sev)])
    assert np.allclose(coupling, rec["signal"]["coupling"] * (1 - k_f * sf), atol=1e-5)
    with pytest.raises(ValueError, match="severity_sd"):
        synthesize_anatomy_cohort(tmp_path / "bad", {"AD": 1}, (8, 10, 8), (4, 5, 4), 2, severity_sd=(0.1, 0.1, 0.1))


def test_warp_is_smooth_invertible_and_of_the_asked_size():
    rng = np.random.default_rng(0)
    box, brain = anatomy._warp_frame()
    rms = []
    for _ in range(5):
        w = draw_warp(rng, 2.5, box, 8, brain)
        rms.append(rms_length(w, brain))
        assert np.abs(w(brain).mean(axis=0)).max() < 0.05  # no net translation: the rigid part has it
        # the Jacobian of x -> x + d(x) stays positive (no folding) on a 2 mm brain lattice
        pts = brain[::2]
        jac = np.stack([(w(pts + e) - w(pts - e)) / 0.2 for e in np.eye(3) * 0.1], axis=-1) + np.eye(3)
        assert np.linalg.det(jac).min() > 0.3
        again = Warp.from_record(json.loads(json.dumps(w.record())))
        assert np.array_equal(again(brain), w(brain))  # the record is the warp
    assert np.allclose(rms, 2.5, atol=0.01)


def test_warped_sampling_matches_affine_sampling_without_displacement(monkeypatch):
    """The warp path (slabs of X planes, map_coordinates) and the affine path agree when the
    displacement is zero, and a rigid-only transform takes the affine path bit for bit."""
    shape = (20, 24, 20)
    aff = template.grid_affine(shape)
    src = template.prepared(("t1",), template.voxel_size(aff))
    rigid, _ = deformation.draw_rigid(np.random.default_rng(3), 6.0, 6.0, np.array([0.0, -17.0, 5.0]))
    zero = Warp((0.0, 0.0, 0.0), (10.0, 10.0, 10.0), np.zeros((4, 4, 4, 3)))
    monkeypatch.setattr(deformation, "CACHED_POINTS", 1000)  # several slabs
    warped = deformation.sample_through(src, shape, aff, SubjectTransform(rigid, zero))
    plain = deformation.sample_through(src, shape, aff, rigid)
    assert np.abs(warped - plain).max() < 1e-3 * np.abs(plain).max()
    assert np.array_equal(deformation.sample_through(src, shape, aff, SubjectTransform(rigid)), plain)


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """One AD subject with the adni-like geometry, once with and once without the T1 effect
    (same seed: same placement, warp and noise), noise-free."""
    tmp = tmp_path_factory.mktemp("pair")
    kw = dict(n_per_class={"AD": 2}, t1_shape=(40, 48, 40), fmri_shape=(10, 12, 10), frames=4, classes=("AD",),
              severity_sd=(0.0, 0.0), fmri_effect=("connectivity",),
              nuisance=Nuisance(misregistration_mm=6.0, misregistration_deg=6.0, **QUIET), geometry=Geometry())
    return (synthesize_anatomy_cohort(tmp / "on", strength=(0.6, 0.8), **kw),
            synthesize_anatomy_cohort(tmp / "off", strength=(0.0, 0.8), **kw))


def test_truth_record_keeps_each_subjects_transform(planted_pair):
    on, _ = planted_pair
    rec = _record(on)
    for nui in rec["subject_nuisance"].values():
        assert 2.4 < nui["warp"]["rms_mm"] < 2.6
        assert Warp.from_record(nui["warp"]).displacement_mm.shape == (8, 8, 8, 3)
        t1, f = nui["t1"]["motion"], nui["fmri"]["motion"]
        assert np.linalg.norm(t1["translation_mm"]) <= 6 and np.linalg.norm(t1["rotation_deg"]) <= 6
        off = f["offset"]
        assert np.linalg.norm(off["translation_mm"]) <= 2 and np.linalg.norm(off["rotation_deg"]) <= 2
        e = deformation.rigid_matrix(off["translation_mm"], np.deg2rad(off["rotation_deg"]), off["rotation_center_mm"])
        assert np.allclose(np.asarray(f["matrix"]), np.asarray(t1["matrix"]) @ e, atol=1e-3)  # the record rounds
        assert np.allclose(deformation.rigid_from_record({k: v for k, v in f.items() if k != "matrix"}),
                           np.asarray(f["matrix"]), atol=1e-3)


def test_subject_space_masks_hold_the_effect_of_an_unregistered_subject(planted_pair):
    on, off = planted_pair
    rec = _record(on)
    shape = (40, 48, 40)
    aff = template.grid_affine(shape)
    for subject in ("sub-001", "sub-002"):
        diff = _t1(on, subject) - _t1(off, subject)
        assert diff.min() < -50
        own = np.logical_or.reduce(list(oracle.planted_masks(rec, shape, aff, "t1", subject=subject).values()))
        tpl = np.logical_or.reduce(list(oracle.planted_masks(rec, shape, aff, "t1").values()))
        assert own[np.unravel_index(np.argmin(diff), shape)]
        total = np.abs(diff).sum()
        assert np.abs(diff[ndimage.binary_dilation(own)]).sum() > 0.9 * total
        # the template's masks miss much of it: the subject sits elsewhere in its voxels
        assert np.abs(diff[own]).sum() > np.abs(diff[tpl]).sum() + 0.1 * total


class _Registered:
    """A store whose attributes say it was registered to the template."""

    def __init__(self, store, kind):
        self._store, self.attrs = store, {**store.attrs, "registration": {"type": kind}}

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_oracle_space_follows_the_registration_attribute(planted_pair, tmp_path):
    on, _ = planted_pair
    assert _tool("to_zarr").main(["--bids", str(on), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 0
    store = CohortStore(tmp_path / "s.zarr")
    assert not oracle.is_registered(store)
    auto = oracle.planted_features(store, store.subjects)
    assert np.array_equal(auto, oracle.planted_features(store, store.subjects, space="subject"))
    template = oracle.planted_features(store, store.subjects, space="template")
    assert not np.allclose(auto[:, :2], template[:, :2])
    assert auto[:, :2].mean() < template[:, :2].mean()  # the atrophied GM, found where the subject has it
    for kind in ("none", None):
        fake = _Registered(store, kind)
        assert not oracle.is_registered(fake)
    reg = _Registered(store, "syn")
    assert oracle.is_registered(reg)
    assert np.array_equal(oracle.planted_features(reg, store.subjects), template)
    with pytest.raises(ValueError, match="registered"):
        oracle.planted_features(reg, store.subjects, space="subject")
    with pytest.raises(ValueError, match="space"):
        oracle.planted_features(store, store.subjects, space="mni")


def test_presets_name_every_generator_argument():
    args = PRESETS["adni-like"].generator_arguments()
    assert set(args) == {"frames", "strength", "severity_sd", "fmri_effect", "nuisance", "geometry"}
    assert args["frames"] >= 48 and args["fmri_effect"] == ("connectivity",)
    assert presets.DEFAULT_PRESET == "easy" and PRESETS["easy"].geometry is None


def test_adni_like_writes_its_fmri_at_the_preset_voxel_unless_told():
    """The preset's 6.8 mm fMRI grid (a coupling change in the hippocampus is lost in 13.6 mm voxels)
    is the default of --preset adni-like only; --fmri-shape still wins."""
    cli = _tool("synth_cohort")
    p = cli.build_parser()
    adni = PRESETS["adni-like"]
    sizes = {extra: cli._sizes(p.parse_args(["--anatomy", "mni152", "--out", "x", *extra]),
                               PRESETS["adni-like" if "adni-like" in extra else "easy"])[2]
             for extra in (("--preset", "adni-like"), ("--preset", "adni-like", "--fmri-shape", "6", "7", "6"), ())}
    assert sizes[("--preset", "adni-like")] == adni.fmri_shape == (24, 28, 24)
    assert sizes[("--preset", "adni-like", "--fmri-shape", "6", "7", "6")] == (6, 7, 6)
    assert sizes[()] == (12, 14, 12)
