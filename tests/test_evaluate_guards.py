"""What ``python -m masan.evaluate`` refuses, splits or warns about, so that a Table-2 row only
pools finished, comparable, independent runs and a region map only shows the right T1: runs
stopped by train.max_steps, a --store of another cohort or orientation, runs of other classes
or stores, repeats with one test set, an --out that cannot be created, damaged prediction files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from masan.config import config_from_dict, load_config, save_config
from masan.data.contract import store_geometry
from masan.evaluate.__main__ import main
from masan.evaluate.report import format_cell
from masan.metrics import classification_metrics
from masan.predictions import Predictions, write_predictions
from masan.rundir import RunDir
from masan.store.cohort import CohortStore
from test_evaluate_report import CLASSES, fake_predictions, make_run


def table(out: Path) -> dict[str, dict]:
    return {m["method"]: m for m in json.loads((out / "table.json").read_text())["methods"]}


def test_a_run_stopped_by_max_steps_is_unfinished(tmp_path, capsys):
    make_run(tmp_path / "runs", "r0", ["train.max_steps=5000"], 0, 2)
    make_run(tmp_path / "runs", "r1", ["train.max_steps=5"], 1, 3, epochs_done=1)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert table(tmp_path / "rep")["MASAN"]["runs"] == 1
    assert f"skipped {tmp_path / 'runs' / 'r1'}: unfinished: the run stopped at train.max_steps=5 after 1 of its 800" \
        in err
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep2"), "--no-figures", "--allow-unfinished"]) == 0
    assert table(tmp_path / "rep2")["MASAN"]["runs"] == 2
    # a DONE left empty (a copy cut short, a hand-made marker) records no target: not finished
    (tmp_path / "runs" / "r0" / "DONE").write_text("")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep3"), "--no-figures"]) == 1  # none left
    err = capsys.readouterr().err
    r0 = tmp_path / "runs" / "r0"
    assert f"skipped {r0}: unfinished: the run has not finished ({r0}/DONE is not a record of this config's target " \
        "(empty, damaged" in err


def test_runs_of_other_classes_or_stores_are_separate_rows(tmp_path, capsys):
    root = tmp_path / "runs"
    for r in (0, 1):
        make_run(root, f"three_r{r}", [], r, 2 + r)
        make_run(root, f"elsewhere_r{r}", [f"data.store={tmp_path / 'other.zarr'}"], r, 1 + r)
        run, _ = make_run(root, f"two_r{r}", ["data.classes=[NC, AD]"], r, 0)
        p = fake_predictions(1, seed=r, repeat=r)  # the same subjects, called NC or AD
        keep = p.labels != 1
        two = Predictions([s for s, k in zip(p.subjects, keep) if k], np.where(p.labels[keep] == 2, 1, 0),
                          p.probs[keep][:, [0, 2]] / p.probs[keep][:, [0, 2]].sum(1, keepdims=True),
                          p.region_weights[keep])
        write_predictions(two, run, ["NC", "AD"], "AD")
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--top-k", "3"]) == 0
    err = capsys.readouterr().err
    rows = table(out)
    missing, other = root / "missing.zarr", tmp_path / "other.zarr"
    names = {f"MASAN [classes NC/MCI/AD, store {missing}]", f"MASAN [classes NC/MCI/AD, store {other}]",
             f"MASAN [classes NC/AD, store {missing}]"}
    assert set(rows) == names and all(rows[n]["runs"] == 2 for n in names)
    assert "MASAN: runs differ in data.classes, data.store, so their scores are not comparable" in err
    with (out / "runs.csv").open() as f:
        assert {r["method"] for r in csv.DictReader(f)} == names  # per-run rows name their table row
    rankings = sorted(p.name for p in (out / "figures").glob("*_region_ranking.csv"))
    assert len(rankings) == 3  # one per row, none overwritten


def test_repeats_with_one_test_set_are_named(tmp_path, capsys):
    for r in (3, 9):
        run, _ = make_run(tmp_path / "runs", f"r{r}", [], r, 2)
        write_predictions(fake_predictions(r % 4, seed=r, repeat=0), run, CLASSES, "AD")
    make_run(tmp_path / "runs", "r4", [], 4, 1)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "MASAN: repeats [3, 9] (" in err and "have the same test subjects" in err
    assert "4]" not in err.split("have the same")[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    make_run(tmp_path / "runs", "r0", [], 0, 2)
    assert main([str(tmp_path / "runs"), "--out", "/proc/x", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write the report into /proc/x" in err and "Traceback" not in err


def test_atlas_labels_without_atlas_is_refused(tmp_path, capsys):
    make_run(tmp_path / "runs", "r0", [], 0, 2)
    (tmp_path / "labels.tsv").write_text("1\tHippocampus\n")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--atlas-labels",
                 str(tmp_path / "labels.tsv")]) == 2
    assert "pass --atlas too" in capsys.readouterr().err and not (tmp_path / "rep").exists()


def test_damaged_prediction_files_are_named_with_the_fix(tmp_path, capsys):
    root = tmp_path / "runs"
    cut, short, npy = (make_run(root, name, [], r, 2)[0] for r, name in enumerate(("cut", "short", "npy")))
    make_run(root, "ok", [], 3, 2)
    data = (cut / "predictions.csv").read_bytes()
    (cut / "predictions.csv").write_bytes(data[: len(data) - 20])  # a copy that stopped mid-row
    lines = (short / "predictions.csv").read_bytes().splitlines(keepends=True)
    (short / "predictions.csv").write_bytes(b"".join(lines[:-1]))  # ... or at a row's end
    (npy / "region_weights.npy").write_bytes((npy / "region_weights.npy").read_bytes()[:200])
    assert main([str(root), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {cut}: {cut / 'predictions.csv'} is truncated (its last line is cut off)" in err
    assert f"skipped {short}: {short / 'predictions.csv'} is truncated or damaged: it holds 11 'test' subjects, " \
           "metrics.json counts 12" in err
    assert f"skipped {npy}: {npy / 'region_weights.npy'} is " in err
    assert f"python -m masan.predict {short} --out {root / 'short_predictions_test'}" in err
    assert "different runs" not in err and "Traceback" not in err


def test_missing_region_weights_are_called_missing(tmp_path, capsys):
    make_run(tmp_path / "runs", "r0", [], 0, 2)
    r1, _ = make_run(tmp_path / "runs", "r1", [], 1, 2)
    (r1 / "region_weights.npy").unlink()
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--top-k", "3"]) == 0
    err = capsys.readouterr().err
    assert f"MASAN: region_weights.npy is missing in {r1}; left out of the region figures" in err
    assert "other classes or region counts" not in err


# ---------------------------------------------------------------------- --store against the run


def store_run(root: Path, name: str, store: Path, repeat: int = 0, orientation: str | None = None,
              relabel: bool = False, extra_subject: bool = False) -> Path:
    """A finished NC/AD run tested on four subjects of ``store`` as training leaves it (with the
    store_geometry.json it trained on; ``orientation``: recorded as another one)."""
    run = root / name
    s = CohortStore(store)
    subjects = s.subjects[:4]
    geo = store_geometry(s, subjects, ["t1", "fmri"])
    cfg = config_from_dict({}, [f"run_dir={run}", f"data.store={store}", "data.classes=[NC, AD]",
                                f"split.repeat={repeat}", "model.patch_grid=[2, 2, 2]",
                                f"model.t1_shape={geo.t1_shape}", f"model.fmri_shape={geo.fmri_shape}",
                                f"model.fmri_frames={geo.frames_min}", f"data.fmri_frames={geo.frames_min}"])
    save_config(cfg, run / "config.yaml")
    trained = geo.to_json()
    if orientation:
        trained["orientation"] = orientation
    (run / "store_geometry.json").write_text(json.dumps(trained))
    labels = np.array([["NC", "AD"].index(s.label(x)) for x in subjects])
    if relabel:
        labels = 1 - labels
    if extra_subject:
        subjects = subjects[:3] + ["sub-elsewhere"]
    probs = np.eye(2, dtype=np.float32)[labels] * 0.6 + 0.2
    weights = np.random.default_rng(repeat).random((4, 8)).astype(np.float32)
    write_predictions(Predictions(subjects, labels, probs, weights), run, ["NC", "AD"], "AD")
    RunDir(run).mark_done(load_config(run / "config.yaml"), step=10, epochs_done=800)
    return run


@pytest.mark.parametrize("kind, message", [
    ("orientation", "the run was trained on LAS"),
    ("relabel", "another diagnosis"),
    ("extra_subject", "lacks 1 of the 4 test subjects"),
])
def test_store_of_another_cohort_or_orientation_is_refused(tiny_store, tmp_path, capsys, kind, message):
    run = store_run(tmp_path / "runs", "bad", tiny_store, **({"orientation": "LAS"} if kind == "orientation"
                                                             else {kind: True}))
    out = tmp_path / "rep"
    assert main([str(run), "--out", str(out), "--store", str(tiny_store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --store: store {tiny_store}") and message in err and str(run) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # the run's own store, not named by the user: the tables, and no map over the wrong T1
    assert main([str(run), "--out", str(out), "--views", "axial"]) == 0
    err = capsys.readouterr().err
    assert "no region map" in err and message in err
    assert not list((out / "figures").glob("*_region_map_*")) and list((out / "figures").glob("*_ranking.png"))


def test_store_that_holds_the_runs_subjects_draws_the_map(tiny_store, tmp_path, capsys):
    run = store_run(tmp_path / "runs", "good", tiny_store)
    out = tmp_path / "rep"
    assert main([str(run), "--out", str(out), "--store", str(tiny_store), "--views", "axial"]) == 0, \
        capsys.readouterr().err
    assert len(list((out / "figures").glob("masan_region_map_*.png"))) == 2


def test_runs_whose_regions_are_other_boxes_are_not_pooled_into_one_map(tiny_store, tmp_path, capsys):
    """Repeats of one method trained on the store in another orientation, or on another patch
    grid of as many regions, number other boxes (or the mirrored side) alike: pooled, their mean
    map would paint each weight in two places."""
    root = tmp_path / "runs"
    store_run(root, "r0", tiny_store, repeat=0)
    mirrored = store_run(root, "r1", tiny_store, repeat=1, orientation="LAS")
    other_grid = store_run(root, "r2", tiny_store, repeat=2)
    cfg = load_config(other_grid / "config.yaml")
    cfg.model.patch_grid = [4, 2, 1]
    save_config(cfg, other_grid / "config.yaml")
    RunDir(other_grid).mark_done(load_config(other_grid / "config.yaml"), step=10, epochs_done=800)
    assert main([str(root), "--out", str(tmp_path / "rep"), "--views", "axial"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{mirrored}, {other_grid} have other classes, region counts, patch grids or store geometries" in err
    assert "left out of the region figures" in err and table(tmp_path / "rep")["MASAN"]["runs"] == 3


def test_a_run_older_than_store_geometry_says_what_it_cannot_check(tiny_store, tmp_path, capsys):
    """A run from before store_geometry.json: its own store gives the geometry it trained on; when
    that store is gone, another --store is checked by its shapes alone, and the user is told."""
    gone = tmp_path / "gone.zarr"
    run = store_run(tmp_path / "runs", "old", tiny_store)
    RunDir(run).store_geometry.unlink()
    assert main([str(run), "--out", str(tmp_path / "a"), "--store", str(tiny_store), "--views", "axial"]) == 0
    assert "predates store_geometry.json" not in capsys.readouterr().err  # its own store: all checked
    cfg = load_config(run / "config.yaml")
    cfg.data.store = str(gone)
    save_config(cfg, run / "config.yaml")
    RunDir(run).mark_done(load_config(run / "config.yaml"), step=10, epochs_done=800)
    assert main([str(run), "--out", str(tmp_path / "b"), "--store", str(tiny_store), "--views", "axial"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run} predates store_geometry.json and its store {gone} cannot be read" in err
    assert "not its orientation or voxel size" in err


# ---------------------------------------------------------------------- what the table pools and how


def test_a_run_given_by_two_paths_counts_once(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    make_run(root, "r0", [], 0, 2)
    make_run(root, "r1", [], 1, 4)
    (tmp_path / "link").symlink_to(root)  # a symlinked parent
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rep"
    assert main(["runs/r0", str(root / "r0"), str(tmp_path / "link" / "r0"), "runs", "--out", str(out),
                 "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert table(out)["MASAN"]["runs"] == 2 and table(out)["MASAN"]["repeats"] == [0, 1]
    assert err.count("given more than once") == 1, err
    assert f"run runs/r0 is given more than once (also as {root / 'r0'}, {tmp_path / 'link' / 'r0'}, runs/r0)" in err
    assert "repeat(s) [0] appear more than once" not in err


def test_unfinished_runs_are_named_and_marked_in_every_output(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root, "r0", [], 0, 2)
    late, _ = make_run(root, "r1", [], 1, 3, done=False)
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--no-figures", "--allow-unfinished"]) == 0
    printed = capsys.readouterr()
    assert f"warning: UNFINISHED run {late} reported (--allow-unfinished), marked unfinished in the tables: the run " \
           f"has not finished ({late / 'DONE'} does not exist" in printed.err
    with (out / "runs.csv").open() as f:
        assert {Path(r["run_dir"]).name: r["finished"] for r in csv.DictReader(f)} == {"r0": "True", "r1": "False"}
    runs = {Path(r["run_dir"]).name: r for r in json.loads((out / "table.json").read_text())["runs"]}
    assert runs["r0"]["finished"] is True and "unfinished" not in runs["r0"]
    assert runs["r1"]["finished"] is False and "DONE does not exist" in runs["r1"]["unfinished"]
    assert table(out)["MASAN"]["unfinished"] == 1
    md = (out / "table.md").read_text()
    assert "| MASAN (1 of 2 runs unfinished) | 2 |" in md and f"- {late}: the run has not finished" in md
    assert "| MASAN (1 of 2 runs unfinished) | 2 |" in printed.out


def _binary(run: Path, repeat: int) -> None:
    """Rewrite a run's predictions as NC/AD ones (its MCI subjects dropped)."""
    p = fake_predictions(1, seed=repeat, repeat=repeat)
    keep = p.labels != 1
    probs = p.probs[keep][:, [0, 2]]
    write_predictions(Predictions([s for s, k in zip(p.subjects, keep) if k], np.where(p.labels[keep] == 2, 1, 0),
                                  probs / probs.sum(1, keepdims=True), p.region_weights[keep]), run, ["NC", "AD"], "AD")


def test_rows_of_other_tasks_are_warned_about_and_show_their_classes(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root, "four", [], 0, 2)
    _binary(make_run(root, "add", ["model.fusion=add", "data.classes=[NC, AD]"], 0, 0)[0], 0)
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--no-figures"]) == 0
    printed = capsys.readouterr()
    assert ("warning: the table's rows differ in data.classes (MASAN: NC/MCI/AD; MASAN (fusion=add): NC/AD): their "
            "scores measure different tasks") in printed.err
    md = (out / "table.md").read_text()
    assert "| Method | Runs | Classes | Accuracy |" in md and "| MASAN (fusion=add) | 1 | NC/AD |" in md
    # rows of one task: no warning, no column
    assert main([str(root / "four"), "--out", str(tmp_path / "rep2"), "--no-figures"]) == 0
    assert "rows differ" not in capsys.readouterr().err
    assert "Classes" not in (tmp_path / "rep2" / "table.md").read_text()


def test_an_undefined_recall_is_missing_not_zero_in_the_table(tmp_path, capsys):
    root = tmp_path / "runs"
    made = [make_run(root, f"r{r}", [], r, 2 + r)[1] for r in (0, 1)]
    run, _ = make_run(root, "r2", [], 2, 0)
    p = fake_predictions(0, seed=2, repeat=2)
    keep = p.labels != 2  # a test part without AD: recall undefined
    write_predictions(Predictions([s for s, k in zip(p.subjects, keep) if k], p.labels[keep], p.probs[keep],
                                  p.region_weights[keep]), run, CLASSES, "AD")
    assert json.loads((run / "metrics.json").read_text())["recall"] is None
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--no-figures"]) == 0
    row = table(out)["MASAN"]
    recalls = [classification_metrics(q.labels, q.preds, CLASSES, "AD")["recall"] * 100 for q in made]
    assert row["recall_n"] == 2 and row["recall_mean"] == pytest.approx(np.mean(recalls))
    assert row["binary_accuracy_n"] == 3
    md = (out / "table.md").read_text()
    assert f"{format_cell(row['recall_mean'], row['recall_std'])} (n=2)" in md and "undefined, not 0" in md
    with (out / "runs.csv").open() as f:
        assert [r["recall"] for r in csv.DictReader(f)][2] == ""


def test_metrics_json_that_disagrees_with_the_predictions_is_named_and_not_used(tmp_path, capsys):
    root = tmp_path / "runs"
    run, preds = make_run(root, "r0", [], 0, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    truth = metrics["precision"]
    (run / "metrics.json").write_text(json.dumps({**metrics, "precision": 0.99, "recall": None}))
    out = tmp_path / "rep"
    assert main([str(run), "--out", str(out), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run / 'metrics.json'} disagrees with {run / 'predictions.csv'} in precision 0.99 " \
           f"(predictions.csv: {truth!r}), recall None (predictions.csv: {metrics['recall']!r}): the table uses the " \
           "values recomputed from predictions.csv" in err
    assert table(out)["MASAN"]["precision_mean"] == pytest.approx(truth * 100)


def test_a_folder_without_runs_and_a_null_metrics_json_are_named(tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "table.md").write_text("an old report")
    run, _ = make_run(tmp_path / "runs", "null", [], 0, 2)
    (run / "metrics.json").write_text("null")
    make_run(tmp_path / "runs", "ok", [], 1, 2)
    assert main([str(tmp_path / "reports"), str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                 "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'reports'}: not a run directory: no config.yaml in it or in any folder below" in err
    assert f"skipped {run}: {run / 'metrics.json'} holds null, not the metrics of a run" in err
    assert f"python -m masan.predict {run} --out" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_top_k_must_be_a_positive_integer(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--out", str(tmp_path / "rep"), "--top-k", value])
    assert e.value.code == 2 and "argument --top-k" in capsys.readouterr().err


def test_a_subject_in_no_test_part_is_refused_before_writing(tiny_store, tmp_path, capsys):
    """A typo in --subject drew the report without that subject's map, exit 0 and one warning."""
    run = store_run(tmp_path / "runs", "good", tiny_store)
    out = tmp_path / "rep"
    assert main([str(run), "--out", str(out), "--views", "axial", "--subject", "sub-999"]) == 2
    err = capsys.readouterr().err
    assert "--subject sub-999 is in no run's test part (its subjects: sub-" in err and not out.exists()


def _atlas(path: Path, store: Path, shift_mm: float, cells: int) -> Path:
    """A label volume on the store's T1 grid, moved by ``shift_mm`` along x, labelling the first
    ``cells`` of each axis's 4 quarters."""
    s = CohortStore(store)
    subject = s.subjects[0]
    shape, affine = s.read_t1(subject).shape, s.affine(subject, "t1").copy()
    labels = np.zeros(shape, np.int16)
    labels[tuple(slice(0, n * cells // 4) for n in shape)] = 7
    affine[0, 3] += shift_mm
    nib.save(nib.Nifti1Image(labels, affine), path)
    return path


def test_an_atlas_that_misses_the_t1_is_refused_or_warned_about(tiny_store, tmp_path, capsys):
    run = store_run(tmp_path / "runs", "good", tiny_store)
    far = _atlas(tmp_path / "far.nii.gz", tiny_store, 10_000.0, 4)
    out = tmp_path / "rep"
    assert main([str(run), "--out", str(out), "--views", "axial", "--atlas", str(far)]) == 2
    err = capsys.readouterr().err
    assert f"error: atlas {far} gives no region of the T1 of sub-" in err
    assert "one world space (e.g. both MNI152)" in err
    assert not out.exists()
    corner = _atlas(tmp_path / "corner.nii.gz", tiny_store, 0.0, 1)  # 1/64 of the grid: one region of 8
    assert main([str(run), "--out", str(out), "--views", "axial", "--atlas", str(corner)]) == 0
    err = capsys.readouterr().err
    assert f"warning: atlas {corner} covers 100% of the T1 grid of sub-" in err
    assert "leaves 7 of its 8 regions without a label ('background')" in err and "MNI152" in err
    whole = _atlas(tmp_path / "whole.nii.gz", tiny_store, 0.0, 4)
    assert main([str(run), "--out", str(tmp_path / "rep2"), "--views", "axial", "--atlas", str(whole)]) == 0
    assert "atlas" not in capsys.readouterr().err
