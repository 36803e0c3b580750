"""The phantom cohort: BIDS files with real headers, and a planted effect that is graded,
confined to the region it claims, and learnable at the demo's small shapes."""

import csv
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.feature_selection import f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from masan.convert.cohort import convert_cohort, discover_bids, planted_effect
from masan.store.cohort import CohortStore
from masan.synth.phantom import PlantedEffect, synthesize_cohort

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default small cohort (T1 32^3, fMRI 16^3 x 8, 12 per class), converted."""
    tmp = tmp_path_factory.mktemp("synth")
    bids = synthesize_cohort(tmp / "bids", 12)
    report = convert_cohort(discover_bids(bids), tmp / "s.zarr", progress=False,
                            extra_attrs={"planted_effect": planted_effect(bids)})
    assert not report.failed
    return bids, CohortStore(tmp / "s.zarr")


def test_bids_layout_and_headers(demo):
    bids, _ = demo
    rows = list(csv.DictReader(open(bids / "participants.tsv"), delimiter="\t"))
    assert len(rows) == 48 and rows[0] == {"participant_id": "sub-001", "diagnosis": "NC"}
    t1 = nib.load(bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    bold = nib.load(bids / "sub-001" / "func" / "sub-001_task-rest_bold.nii.gz")
    assert t1.shape == (32, 32, 32) and t1.get_data_dtype() == np.int16
    assert bold.shape == (16, 16, 16, 8) and bold.header.get_zooms()[3] == 2.0
    assert bold.header.get_xyzt_units() == ("mm", "sec")
    assert np.allclose(np.diag(t1.affine)[:3] * 32, [240, 256, 176])  # same field of view
    assert json.loads((bids / "dataset_description.json").read_text())["BIDSVersion"]


def test_planted_region_is_recorded_and_sits_in_one_cell():
    effect = PlantedEffect()
    assert effect.cell((4, 4, 4)) == (1, 1, 1) and effect.region_index((4, 4, 4)) == 21
    assert effect.cell((2, 2, 2)) == (0, 0, 0) and effect.region_index((2, 2, 2)) == 0
    assert PlantedEffect(center=(0.5, 0.5, 0.5)).cell((4, 4, 4)) is None  # straddles cells
    mask = effect.mask((32, 32, 32))
    assert mask.sum() > 100 and mask[8:16, 8:16, 8:16].sum() == mask.sum()


def test_same_seed_same_files(tmp_path):
    a = synthesize_cohort(tmp_path / "a", 1, t1_shape=(8, 8, 8), fmri_shape=(4, 4, 4), frames=3)
    b = synthesize_cohort(tmp_path / "b", 1, t1_shape=(8, 8, 8), fmri_shape=(4, 4, 4), frames=3)
    for f in ("sub-004/anat/sub-004_T1w.nii.gz", "sub-004/func/sub-004_task-rest_bold.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(a / f).dataobj), np.asarray(nib.load(b / f).dataobj))


def _features(store, grid=(4, 4, 4)):
    """Per subject and grid cell: mean normalised T1, mean temporal std of normalised fMRI."""
    feats, labels = [], []
    for s in store.subjects:
        t1, fmri = store.read_t1(s), store.read_fmri(s).std(axis=0)
        cells = []
        for vol in (t1, fmri):
            g = [n // k for n, k in zip(vol.shape, grid)]
            blocks = vol.reshape(grid[0], g[0], grid[1], g[1], grid[2], g[2])
            cells.append(blocks.mean(axis=(1, 3, 5)).ravel())  # C order = region index
        feats.append(cells)
        labels.append(store.classes.index(store.label(s)))
    return np.array(feats), np.array(labels)


def test_effect_is_graded_located_and_learnable(demo):
    bids, store = demo
    assert store.attrs["planted_effect"]["region_index"]["4x4x4"] == 21
    feats, y = _features(store)
    t1_cell, fmri_cell = feats[:, 0, 21], feats[:, 1, 21]
    t1_means = [t1_cell[y == c].mean() for c in range(4)]
    fmri_means = [fmri_cell[y == c].mean() for c in range(4)]
    assert t1_means == sorted(t1_means, reverse=True)  # NC > EMCI > LMCI > AD (atrophy)
    assert fmri_means == sorted(fmri_means, reverse=True)  # fluctuations damped with severity
    for modality in (0, 1):
        f_stat, _ = f_classif(feats[:, modality], y)
        assert int(np.argmax(f_stat)) == 21, f"modality {modality}: the planted region must rank first"
    f2, _ = f_classif(_features(store, (2, 2, 2))[0][:, 0], y)
    assert int(np.argmax(f2)) == 0
    acc = cross_val_score(LogisticRegression(max_iter=2000), feats.reshape(len(y), -1), y, cv=4).mean()
    assert acc > 0.6, f"4-class accuracy {acc:.2f} should be well above chance (0.25)"


def _cli():
    spec = importlib.util.spec_from_file_location("synth_cohort", ROOT / "data_tools" / "synth_cohort.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


TINY = ["--classes", "NC", "AD", "--t1-shape", "8", "8", "8", "--fmri-shape", "4", "4", "4", "--frames", "3"]


def test_cli_writes_a_cohort(tmp_path):
    cli = _cli()
    assert cli.main(["--out", str(tmp_path / "b"), "--per-class", "1", *TINY]) == 0
    effect = json.loads((tmp_path / "b" / "planted_effect.json").read_text())
    assert effect["severity"] == {"NC": 0.0, "AD": 1.0}
    assert sorted(p.name for p in (tmp_path / "b").glob("sub-*")) == ["sub-001", "sub-002"]


@pytest.mark.parametrize("argv, message", [
    (["--per-class", "0"], "argument --per-class: must be at least 1, got 0"),
    (["--per-class", "-2"], "argument --per-class: must be at least 1, got -2"),
    (["--frames", "0"], "argument --frames: must be at least 1, got 0"),
    (["--frames", "-3"], "argument --frames: must be at least 1, got -3"),
    (["--t1-shape", "0", "16", "16"], "argument --t1-shape: must be at least 1, got 0"),
    (["--t1-shape", "-16", "16", "16"], "argument --t1-shape: must be at least 1, got -16"),
    (["--tr", "0"], "argument --tr: must be a finite number above 0, got 0"),
    (["--tr", "-2"], "argument --tr: must be a finite number above 0, got -2"),
    (["--radius", "-1"], "argument --radius: must be a finite number above 0, got -1"),
    (["--center", "5", "5", "5"], "argument --center: must be between 0 and 1, got 5"),
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["--strength", "3"], "argument --strength: must be between 0 and 1, got 3"),
    (["--classes", "NC", "NC"], "--classes names NC more than once"),
    (["--anatomy", "mni152", "--per-class", "0"], "argument --per-class: must be at least 1, got 0"),
    (["--anatomy", "mni152", "--severity-sd", "-0.1"], "argument --severity-sd: must be at least 0, got -0.1"),
    (["--anatomy", "mni152", "--warp-rms", "-1"], "argument --warp-rms: must be at least 0, got -1"),
    (["--anatomy", "mni152", "--motion", "1", "-2"], "argument --motion: must be at least 0, got -2"),
])
def test_cli_refuses_bad_numbers_before_writing(tmp_path, capsys, argv, message):
    cli = _cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "b"), *TINY, "--per-class", "2", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_refuses_an_out_that_is_a_file_or_someone_elses_folder(tmp_path, capsys):
    cli = _cli()
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for out, message in ((tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "b", f"lies below {tmp_path / 'file'}, which is a file"),
                         (tmp_path / "mine", "holds no planted_effect.json")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--out", str(out), "--per-class", "1", *TINY])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--out {out}" in err and message in err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert (tmp_path / "file").read_text() == "x"


def test_cli_replaces_its_earlier_cohort_whole_and_a_failure_leaves_it_as_it_was(tmp_path, monkeypatch):
    cli, out = _cli(), tmp_path / "b"
    subjects = lambda: sorted(p.name for p in out.glob("sub-*"))  # noqa: E731
    assert cli.main(["--out", str(out), "--per-class", "3", *TINY]) == 0 and len(subjects()) == 6
    assert cli.main(["--out", str(out), "--per-class", "1", *TINY]) == 0
    assert subjects() == ["sub-001", "sub-002"]  # no subject of the 3-per-class cohort left
    rows = list(csv.DictReader(open(out / "participants.tsv"), delimiter="\t"))
    assert [r["participant_id"] for r in rows] == subjects() and not (out / cli.STAGING).exists()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real = cli.synthesize_cohort

    def interrupted(folder, *a, **kw):
        real(folder, 1, (8, 8, 8), (4, 4, 4), 3, classes=("NC",))  # half a cohort written, then stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "synthesize_cohort", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--out", str(out), "--per-class", "2", *TINY])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--out", str(tmp_path / "new"), "--per-class", "2", *TINY])
    assert not (tmp_path / "new").exists()  # nothing that looks like a cohort


def test_cli_takes_the_folder_a_killed_first_run_left(tmp_path):
    cli, out = _cli(), tmp_path / "b"
    (out / cli.STAGING / "sub-001" / "anat").mkdir(parents=True)
    assert cli.main(["--out", str(out), "--per-class", "1", *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset_description.json", "participants.tsv",
                                                      "planted_effect.json", "sub-001", "sub-002"]


@pytest.mark.parametrize("earlier", [False, True])
def test_a_stop_while_the_cohort_moves_in_is_taken_back_by_a_rerun(tmp_path, monkeypatch, capsys, earlier):
    """Stopped after a few subjects had moved in: the folder held them without the tool's mark
    (first run: the rerun refused it as someone else's) or beside the old one (to_zarr then asked
    for a participants.tsv)."""
    from masan.convert.sources import ConvertError, discover_bids

    cli, out = _cli(), tmp_path / "b"
    if earlier:
        assert cli.main(["--out", str(out), "--per-class", "1", *TINY]) == 0
    real, moved = Path.replace, []

    def replace(self, target):
        if self.parent.name == cli.STAGING and len(moved) == 2:
            raise KeyboardInterrupt  # a stop between two moves
        moved.append(self)
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--out", str(out), "--per-class", "2", "--seed", "3", *TINY])
    monkeypatch.setattr(Path, "replace", real)
    with pytest.raises(ConvertError, match="synth_cohort.py was stopped while writing this cohort; run it again"):
        discover_bids(out)
    assert cli.main(["--out", str(out), "--per-class", "2", "--seed", "3", *TINY]) == 0
    assert len(discover_bids(out)) == 4 and not (out / cli.STAGING).exists()
