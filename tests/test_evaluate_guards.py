"""What ``python -m masan.evaluate`` refuses, splits or warns about, so that a Table-2 row only
pools finished, comparable, independent runs and a region map only shows the right T1: runs
stopped by train.max_steps, a --store of another cohort or orientation, runs of other classes
or stores, repeats with one test set, an --out that cannot be created, damaged prediction files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from masan.config import config_from_dict, load_config, save_config
from masan.data.contract import store_geometry
from masan.evaluate.__main__ import main
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
