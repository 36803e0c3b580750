"""A real cohort goes in as it is: the TR from the header or the BIDS sidecar (units checked),
subjects without a diagnosis stored for prediction, and one geometry contract between store,
model and trained run (masan/data/contract.py), enforced with exit 2 before anything is written.

The heterogeneous cohorts are written here with nibabel (scanners with other voxel sizes,
orientations and TRs), converted by the real converter into real stores."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from masan.config import RunConfig, load_config
from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.data.contract import ContractError, Geometry, mismatches, resolve_inputs, store_geometry, unchecked_tr
from masan.data.dataset import UNLABELED, select_subjects
from masan.store.cohort import CohortStore

REPO = Path(__file__).resolve().parents[1]
T1 = (10, 12, 10)
BOLD = (6, 6, 6, 5)


def _affine(zoom: float, flip_x: bool = False) -> np.ndarray:
    a = np.diag([-zoom if flip_x else zoom, zoom, zoom, 1.0])
    a[:3, 3] = -np.array(T1) * zoom / 2
    return a


def write_subject(bids: Path, sid: str, *, zoom: float = 2.0, flip_x: bool = False, tr: float = 2.0,
                  time_unit: str = "sec", sidecar: dict | None = None, frames: int = BOLD[3], seed: int = 0) -> None:
    """One subject's T1 and BOLD (int16, random) as a scanner wrote them."""
    rng = np.random.default_rng(seed)
    anat, func = bids / sid / "anat", bids / sid / "func"
    anat.mkdir(parents=True), func.mkdir(parents=True)
    t1 = nib.Nifti1Image(rng.integers(0, 1000, T1, dtype=np.int16), _affine(zoom, flip_x))
    nib.save(t1, anat / f"{sid}_T1w.nii.gz")
    bold = nib.Nifti1Image(rng.integers(0, 1000, BOLD[:3] + (frames,), dtype=np.int16), _affine(2 * zoom, flip_x))
    bold.header.set_xyzt_units("mm", time_unit)
    bold.header["pixdim"][4] = tr
    nib.save(bold, func / f"{sid}_task-rest_bold.nii.gz")
    if sidecar is not None:
        (func / f"{sid}_task-rest_bold.json").write_text(json.dumps(sidecar))


def write_table(bids: Path, labels: dict[str, str]) -> None:
    rows = "".join(f"{s}\t{dx}\n" for s, dx in labels.items())
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\n" + rows)


def convert(bids: Path, out: Path, **opts) -> tuple[CohortStore, object]:
    report = convert_cohort(discover_bids(bids), out, ConvertOptions(patch_grid=(1, 1, 1), **opts),
                            classes=("NC", "AD"), progress=False)
    return CohortStore(out), report


def test_the_tr_comes_from_the_sidecar_or_the_header_and_a_unit_error_fails_the_subject(tmp_path):
    bids = tmp_path / "bids"
    write_subject(bids, "sub-hdr", tr=2.0)
    write_subject(bids, "sub-ms", tr=800.0, time_unit="msec")  # NIfTI's own unit: converted
    write_subject(bids, "sub-json", tr=0.0, sidecar={"RepetitionTime": 0.8})
    write_subject(bids, "sub-both", tr=3.0, sidecar={"RepetitionTime": 2.5})
    write_subject(bids, "sub-badjson", sidecar={"RepetitionTime": 800})
    write_subject(bids, "sub-badhdr", tr=3000.0)  # milliseconds labelled seconds: the TR is unknown
    write_subject(bids, "sub-listjson", sidecar=[{"RepetitionTime": 2.0}])  # valid JSON, not BIDS's object
    write_table(bids, {s: "NC" for s in ("sub-hdr", "sub-ms", "sub-json", "sub-both", "sub-badjson", "sub-badhdr",
                                         "sub-listjson")})
    store, report = convert(bids, tmp_path / "s.zarr")

    tr = {s: (store.row(s)["fmri"]["tr_seconds"], store.meta(s, "fmri")["tr_source"]) for s in store.subjects}
    assert tr == {"sub-hdr": (2.0, "header"), "sub-ms": (0.8, "header"), "sub-json": (0.8, "sidecar"),
                  "sub-both": (2.5, "sidecar"), "sub-badhdr": (None, None)}
    assert any("sub-both" in w and "used the sidecar" in w for w in report.warnings), report.warnings
    assert any("sub-badhdr" in w and "unit error" in w and "sidecar" in w for w in report.warnings)
    failed = {f.subject: f.error for f in report.failed}
    assert sorted(failed) == ["sub-badjson", "sub-listjson"]
    assert "sub-badjson_task-rest_bold.json" in failed["sub-badjson"] and "seconds" in failed["sub-badjson"]
    assert "sub-listjson_task-rest_bold.json: the BOLD sidecar is a JSON list, not an object" in failed["sub-listjson"]


def test_a_task_sidecar_at_the_top_of_the_bids_folder_is_inherited(tmp_path):
    bids = tmp_path / "bids"
    write_subject(bids, "sub-01", tr=0.0)
    (bids / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
    write_table(bids, {"sub-01": "AD"})
    store, report = convert(bids, tmp_path / "s.zarr")
    assert not report.failed and store.row("sub-01")["fmri"]["tr_seconds"] == 1.5
    store, report = convert(bids, tmp_path / "s.zarr")  # unchanged sources and sidecar: skipped
    assert report.skipped == ["sub-01"] and store.row("sub-01")["fmri"]["tr_seconds"] == 1.5

    (bids / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 0.72}))  # edited: reconverted
    store, report = convert(bids, tmp_path / "s.zarr")
    assert report.converted == ["sub-01"] and store.row("sub-01")["fmri"]["tr_seconds"] == 0.72


def test_subjects_without_a_diagnosis_are_stored_for_prediction_and_left_out_of_training(tmp_path):
    bids = tmp_path / "bids"
    for i in range(3):
        write_subject(bids, f"sub-{i}", seed=i)
    write_table(bids, {"sub-0": "NC", "sub-1": "AD", "sub-2": "n/a"})
    _, report = convert(bids, tmp_path / "refused.zarr")
    assert [f.subject for f in report.failed] == ["sub-2"] and "--allow-unlabeled" in report.failed[0].error

    store, report = convert(bids, tmp_path / "s.zarr", allow_unlabeled=True)
    assert not report.failed and store.label("sub-2") is None
    cfg = RunConfig().data
    cfg.classes = ["NC", "AD"]
    with pytest.warns(UserWarning, match="sub-2") as caught:
        subjects, labels, _ = select_subjects(store, cfg)
    assert subjects == ["sub-0", "sub-1"] and "no diagnosis" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours, not a library's deprecations
        subjects, labels, _ = select_subjects(store, cfg, unlabeled=True)
    assert subjects == ["sub-0", "sub-1", "sub-2"] and labels == [0, 1, UNLABELED]


@pytest.mark.parametrize(("planted", "message"), [
    ({"zoom": 2.4}, "voxel sizes"),
    ({"flip_x": True}, "--canonical"),
    ({"sidecar": {"RepetitionTime": 0.8}}, "different TRs"),
])
def test_a_store_mixing_scanners_breaks_the_contract(tmp_path, planted, message):
    """One subject from another scanner (voxel size, a mirrored LAS storage, another TR): the
    store trains nowhere, with the groups of subjects and the conversion option named."""
    bids = tmp_path / "bids"
    write_subject(bids, "sub-a", seed=1)
    write_subject(bids, "sub-b", seed=2)
    write_subject(bids, "sub-odd", seed=3, **planted)
    write_table(bids, {"sub-a": "NC", "sub-b": "AD", "sub-odd": "AD"})
    store, report = convert(bids, tmp_path / "s.zarr")
    assert not report.failed
    with pytest.raises(ContractError, match=message) as e:
        store_geometry(store, store.subjects, ["t1", "fmri"])
    assert "sub-odd" in str(e.value)

    same = store_geometry(store, ["sub-a", "sub-b"], ["t1", "fmri"])
    assert same.t1_shape == list(T1) and same.fmri_shape == list(BOLD[:3]) and same.orientation == "RAS"
    assert same.t1_spacing_mm == [2.0, 2.0, 2.0] and same.tr_seconds == 2.0 and same.frames_min == BOLD[3]


def _geometry(**kw) -> Geometry:
    return Geometry(**{"t1_shape": [32, 32, 32], "fmri_shape": [16, 16, 16], "frames_min": 6, "frames_max": 8,
                       "store": "s.zarr", "shortest": "sub-3", **kw})


def _blob_subject(bids: Path, sid: str, zoom: float, perm: tuple[int, int, int], flip: bool,
                  centre_mm: np.ndarray) -> None:
    """A T1 and BOLD whose voxel axes are world axes ``perm`` (flipped with ``flip``) at ``zoom``
    mm, holding one bright ball at world ``centre_mm`` (what resampling must keep in place)."""
    shape = (24, 26, 22)
    affine = np.zeros((4, 4))
    for vox_axis, world_axis in enumerate(perm):
        affine[world_axis, vox_axis] = -zoom if (flip and vox_axis == 0) else zoom
    affine[3, 3] = 1.0
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    ball = (np.linalg.norm(world - centre_mm, axis=-1) < 6).astype(np.int16) * 1000
    anat, func = bids / sid / "anat", bids / sid / "func"
    anat.mkdir(parents=True), func.mkdir(parents=True)
    nib.save(nib.Nifti1Image(ball, affine), anat / f"{sid}_T1w.nii.gz")
    bold = nib.Nifti1Image(np.repeat(ball[::2, ::2, ::2, None], 3, axis=3), affine @ np.diag([2, 2, 2, 1]))
    bold.header.set_xyzt_units("mm", "sec")
    bold.header["pixdim"][4] = 2.0
    nib.save(bold, func / f"{sid}_task-rest_bold.nii.gz")


def test_scanners_with_other_voxel_sizes_and_orientations_resample_onto_one_grid(tmp_path):
    """RAS at 2 mm, LAS at 2.4 mm and a sagittal PSR-like acquisition at 2 mm: ``--spacing``
    (0: the cohort's most common) stores all on one RAS grid, the contract holds, and a ball at
    a world position stays there (the affine is true)."""
    bids, centre = tmp_path / "bids", np.array([5.0, -4.0, 3.0])
    _blob_subject(bids, "sub-ras", 2.0, (0, 1, 2), False, centre)
    _blob_subject(bids, "sub-las", 2.4, (0, 1, 2), True, centre)
    _blob_subject(bids, "sub-psr", 2.0, (1, 2, 0), False, centre)
    write_table(bids, {"sub-ras": "NC", "sub-las": "AD", "sub-psr": "AD"})
    _, report = convert(bids, tmp_path / "asis.zarr", canonical=True, t1_shape=(24, 24, 24), fmri_shape=(12, 12, 12))
    with pytest.raises(ContractError, match="voxel sizes"):
        store_geometry(CohortStore(tmp_path / "asis.zarr"), ["sub-ras", "sub-las", "sub-psr"], ["t1", "fmri"])

    store, report = convert(bids, tmp_path / "s.zarr", canonical=True, spacing=(0.0, 0.0), t1_shape=(24, 24, 24),
                            fmri_shape=(12, 12, 12))
    assert not report.failed and any("resampled to 2 mm" in w for w in report.warnings), report.warnings
    geo = store_geometry(store, store.subjects, ["t1", "fmri"])
    assert geo.orientation == "RAS" and geo.t1_spacing_mm == [2.0, 2.0, 2.0] and geo.fmri_spacing_mm == [4.0] * 3
    for s in store.subjects:
        t1 = store.read_t1(s, normalize=False)
        ijk = np.argwhere(t1 > 500).mean(axis=0)
        world = store.affine(s, "t1")[:3, :3] @ ijk + store.affine(s, "t1")[:3, 3]
        assert np.linalg.norm(world - centre) < 1.0, (s, world)
        assert store.meta(s, "t1")["transform"]["resampled_to_mm"] == 2.0


def test_model_input_shapes_come_from_the_store_and_one_frame_count_rules():
    cfg = RunConfig()
    cfg.model.t1_shape = cfg.model.fmri_shape = cfg.model.fmri_frames = None
    cfg.data.fmri_frames = 6
    filled = resolve_inputs(cfg, _geometry())
    assert cfg.model.t1_shape == [32, 32, 32] and cfg.model.fmri_shape == [16, 16, 16]
    assert cfg.model.fmri_frames == 6 and "model.fmri_frames=6" in filled

    cfg = RunConfig()  # the paper's 240x256x176 on a 32^3 store
    with pytest.raises(ContractError, match=r"model.t1_shape=\[240, 256, 176\].*set model.t1_shape=\[32,32,32\]"):
        resolve_inputs(cfg, _geometry())
    cfg = RunConfig()
    cfg.model.t1_shape, cfg.model.fmri_shape, cfg.model.fmri_frames, cfg.data.fmri_frames = None, None, 6, 5
    with pytest.raises(ContractError, match="data.fmri_frames=5 but model.fmri_frames=6"):
        resolve_inputs(cfg, _geometry())
    cfg.data.fmri_frames = 7
    cfg.model.fmri_frames = None
    with pytest.raises(ContractError, match="sub-3 of s.zarr has 6 fMRI frames"):
        resolve_inputs(cfg, _geometry())
    cfg.model.patch_grid = [3, 3, 3]  # 32 voxels do not cut into 3 regions
    cfg.data.fmri_frames = 6
    with pytest.raises(ContractError, match=r"model.patch_grid=\[3, 3, 3\] does not fit the t1 images"):
        resolve_inputs(cfg, _geometry())
    cfg.model.patch_grid = [4, 4, 4]
    cfg.data.fmri_frames = None  # runs of 6-8 frames and no count: which frames?
    with pytest.raises(ContractError, match="6-8 frames; set data.fmri_frames"):
        resolve_inputs(cfg, _geometry())


def test_a_store_is_compared_with_the_geometry_a_run_trained_on():
    trained = _geometry(t1_spacing_mm=[1.0, 1.0, 1.0], orientation="RAS", tr_seconds=2.0).to_json()
    assert mismatches(trained, _geometry(t1_spacing_mm=[1.004, 1.0, 1.0], orientation="RAS", tr_seconds=2.01), 6) == []
    registered = {"type": "syn", "template": "mni152", "t1_grid": [[48, 56, 48]], "fmri_grid": [[12, 14, 12]]}
    both = {**trained, "registration": registered}
    assert mismatches(both, _geometry(orientation="RAS", tr_seconds=2.0, registration=dict(registered)), 6) == []
    assert len(mismatches(both, _geometry(orientation="RAS", tr_seconds=2.0,
                                          registration={**registered, "type": "rigid"}), 6)) == 1
    found = mismatches(trained, _geometry(t1_shape=[28, 32, 32], t1_spacing_mm=[1.2, 1.2, 1.2], orientation="LAS",
                                          tr_seconds=0.8, frames_min=4, registration={"type": "syn"}), 6)
    assert len(found) == 6, found
    for text in ("T1 grid 28x32x32", "voxel size", "orientation LAS", "TR 0.8 s", "4 fMRI frames", "registered"):
        assert any(text in f for f in found), (text, found)


def test_a_tr_recorded_on_one_side_only_is_named_as_unchecked():
    timed, untimed = _geometry(tr_seconds=2.0), _geometry()
    assert mismatches(timed.to_json(), untimed, 6) == [] and mismatches(untimed.to_json(), timed, 6) == []
    assert "the run trained on 2 s, s.zarr holds runs without a TR" in unchecked_tr(timed.to_json(), untimed)
    assert "the run trained on runs without a TR, s.zarr holds 2 s" in unchecked_tr(untimed.to_json(), timed)
    assert unchecked_tr(timed.to_json(), timed) is None and unchecked_tr(untimed.to_json(), untimed) is None
    assert unchecked_tr(timed.to_json(), _geometry(fmri_shape=None)) is None  # no fMRI read: nothing to say


# ---------------------------------------------------------------------- the real entry points


def _train(cfg_path: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch/train_local.py"), "--config", str(cfg_path),
                           f"run_dir={run}", *overrides], capture_output=True, text=True, timeout=600, cwd=REPO,
                          check=False)


def _predict(run: Path, store: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "masan.predict", str(run), "--store", str(store), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_config) -> Path:
    """A tiny run whose input shapes and frame count are all null: taken from the store."""
    run = tmp_path_factory.mktemp("contract") / "run"
    res = _train(tiny_config, run, "model.t1_shape=null", "model.fmri_shape=null", "model.fmri_frames=null",
                 "data.fmri_frames=null", "train.pretrain_epochs=1", "train.joint_epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow  # real training starts
def test_training_takes_its_input_shapes_from_the_store_and_records_them(trained_run, tiny_store):
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["model"]["t1_shape"] == [32, 32, 32] and cfg["model"]["fmri_frames"] == 6
    geo = json.loads((trained_run / "store_geometry.json").read_text())
    assert geo["t1_shape"] == [32, 32, 32] and geo["fmri_shape"] == [16, 16, 16] and geo["frames_min"] == 6
    assert geo["orientation"] and geo["tr_seconds"] == 2.0 and geo["store"] == str(tiny_store)


@pytest.mark.parametrize("override", ["model.t1_shape=[24,24,24]", "data.fmri_frames=9", "model.fmri_frames=4",
                                      "model.patch_grid=[3,3,3]"])
@pytest.mark.slow  # real training starts
def test_a_start_that_breaks_the_contract_exits_2_and_writes_nothing(tmp_path, tiny_config, override):
    run = tmp_path / "run"
    res = _train(tiny_config, run, override)
    assert res.returncode == 2, res.stderr[-3000:]
    key = override.split("=")[0]
    assert "Traceback" not in res.stderr and key in res.stderr, res.stderr[-3000:]
    assert not run.exists(), sorted(p.name for p in run.iterdir())


@pytest.mark.slow  # real training starts
def test_predict_refuses_another_geometry_and_scores_unlabeled_subjects(tmp_path, trained_run, tiny_store):
    from masan.synth.phantom import synthesize_cohort

    bids = synthesize_cohort(tmp_path / "bids", n_per_class=2, classes=("NC", "AD"), frames=6, seed=5)
    other = convert_cohort(discover_bids(bids), tmp_path / "cropped.zarr",
                           ConvertOptions(patch_grid=(2, 2, 2), t1_shape=(28, 28, 28)), classes=("NC", "AD"),
                           progress=False)
    assert not other.failed
    res = _predict(trained_run, tmp_path / "cropped.zarr", tmp_path / "p1")
    assert res.returncode == 2 and "T1 grid 28x28x28" in res.stderr and "32x32x32" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "p1").exists()

    table = (bids / "participants.tsv").read_text().splitlines()
    table[1:3] = [f"{line.split(chr(9))[0]}\tn/a" for line in table[1:3]]  # two new patients
    (bids / "participants.tsv").write_text("\n".join(table) + "\n")
    report = convert_cohort(discover_bids(bids), tmp_path / "new.zarr",
                            ConvertOptions(patch_grid=(2, 2, 2), allow_unlabeled=True), classes=("NC", "AD"),
                            progress=False)
    assert not report.failed
    res = _predict(trained_run, tmp_path / "new.zarr", tmp_path / "p2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 without a diagnosis" in res.stdout
    rows = (tmp_path / "p2" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5 and sum(r.split(",")[2] == "" for r in rows[1:]) == 2
    metrics = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert metrics["n_unlabeled"] == 2 and metrics["n"] == 2


def _placed(**kw) -> Geometry:
    """:func:`_geometry` with voxel sizes and an orientation."""
    return _geometry(**{"t1_spacing_mm": [1.0] * 3, "fmri_spacing_mm": [3.0] * 3, "orientation": "RAS", **kw})


def test_a_run_trained_on_another_fmri_grid_or_voxel_size_is_a_mismatch():
    trained = _placed().to_json()
    assert mismatches(trained, _placed(), 6) == []
    assert any("fMRI grid 16x16x12" in m for m in mismatches(trained, _placed(fmri_shape=[16, 16, 12]), 6))
    assert any("fMRI voxel size" in m for m in mismatches(trained, _placed(fmri_spacing_mm=[2.0] * 3), 6))


def test_a_store_registered_onto_another_grid_is_a_mismatch():
    reg = {"type": "syn", "template": "mni152", "t1_grid": [[48, 56, 48]], "fmri_grid": [[12, 14, 12]]}
    trained = _placed(registration=reg).to_json()
    for key, grid in (("t1_grid", [[24, 28, 24]]), ("fmri_grid", [[6, 7, 6]])):
        assert len(mismatches(trained, _placed(registration={**reg, key: grid}), 6)) == 1, key


class _Store:
    """The part of a CohortStore that store_geometry reads, for two T1 images of other shapes."""

    path, attrs = "s.zarr", {}

    def __init__(self, shapes):
        self.shapes = shapes

    def shape(self, s, m):
        return self.shapes[s]

    def row(self, s):
        return {"t1": {"voxel_mm": [1.0, 1.0, 1.0], "axcodes": "RAS"}}


def test_t1_images_of_different_shapes_break_the_contract():
    store = _Store({"sub-a": (32, 32, 32), "sub-b": (32, 32, 30)})
    with pytest.raises(ContractError, match="differ in shape"):
        store_geometry(store, ["sub-a", "sub-b"], ["t1"])
    assert store_geometry(store, ["sub-a"], ["t1"]).t1_shape == [32, 32, 32]


def test_runs_of_several_lengths_fix_the_frames_the_data_gives():
    """Runs of 6-8 frames and only model.fmri_frames=6 set: the data must give 6 frames too."""
    cfg = load_config(None, [])
    cfg.model.t1_shape = cfg.model.fmri_shape = None
    cfg.model.fmri_frames, cfg.data.fmri_frames = 6, None
    filled = resolve_inputs(cfg, _placed())
    assert cfg.data.fmri_frames == 6 and "data.fmri_frames=6" in filled
