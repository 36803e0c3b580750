"""Table-2 aggregation over run directories written the way training writes them
(config.yaml via save_config, predictions via write_predictions), including unfinished runs."""

from __future__ import annotations

import csv
import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from masan.config import RunConfig, config_from_dict, load_config, save_config
from masan.evaluate.__main__ import main
from masan.evaluate.report import collect_runs, format_cell, group_runs, method_name, summary_table
from masan.metrics import classification_metrics
from masan.predictions import Predictions, write_predictions
from masan.rundir import RunDir

CLASSES = ["NC", "MCI", "AD"]
LABELS = np.repeat([0, 1, 2], 4)  # 12 test subjects
GRID = [2, 2, 2]
PLANTED = 5  # region whose weight is raised in AD subjects


def fake_predictions(errors: int, seed: int, repeat: int = 0) -> Predictions:
    """Right on all but ``errors`` subjects (their prediction moved to the next class); each
    repeat tests other subjects, as repeats of a real cohort's splits do."""
    rng = np.random.default_rng(seed)
    preds = LABELS.copy()
    wrong = rng.choice(len(LABELS), errors, replace=False)
    preds[wrong] = (preds[wrong] + 1) % 3
    probs = np.full((len(LABELS), 3), 0.1, np.float32)
    probs[np.arange(len(LABELS)), preds] = 0.8
    weights = rng.random((len(LABELS), 8)).astype(np.float32) * 0.5
    weights[LABELS == 2, PLANTED] += 1.0
    first = len(LABELS) * repeat
    return Predictions([f"sub-{first + i:03d}" for i in range(len(LABELS))], LABELS.copy(), probs, weights)


def make_run(root, name: str, overrides: list[str], repeat: int, errors: int, done: bool = True,
             epochs_done: int | None = None):
    """A run directory as training leaves it; DONE records ``epochs_done`` (default: all)."""
    run = root / name
    cfg = config_from_dict({}, [f"run_dir={run}", f"split.repeat={repeat}", "data.classes=[NC, MCI, AD]",
                                f"model.patch_grid={GRID}", f"data.store={root / 'missing.zarr'}"] + overrides)
    save_config(cfg, run / "config.yaml")
    preds = fake_predictions(errors, seed=repeat + 10 * len(overrides), repeat=repeat)
    write_predictions(preds, run, CLASSES, "AD")
    if done:
        cfg = load_config(run / "config.yaml")  # DONE's target is the saved config's, as training reads it
        RunDir(run).mark_done(cfg, step=100, epochs_done=sum(cfg.epochs.values()) if epochs_done is None
                              else epochs_done)
    return run, preds


METHODS = {
    "H-FCN": ["model.arch=hfcn"],
    "MASAN": [],
    "MASAN (fusion=add)": ["model.fusion=add"],
}


@pytest.fixture
def runs(tmp_path):
    made = {m: [] for m in METHODS}
    for m, ov in METHODS.items():
        for r, errors in enumerate((2, 4, 3)):
            made[m].append(make_run(tmp_path / "runs", f"{m.replace(' ', '_')}_r{r}", ov, r, errors + len(ov))[1])
    make_run(tmp_path / "runs", "still_training", [], 3, 0, done=False)
    broken = tmp_path / "runs" / "broken"
    make_run(tmp_path / "runs", "broken", [], 4, 0)
    (broken / "metrics.json").write_text("{not json")
    return tmp_path / "runs", made


def test_method_names_follow_the_paper():
    assert method_name(RunConfig().model) == "MASAN"
    assert method_name(config_from_dict({}, ["model.fusion=add"]).model) == "MASAN (fusion=add)"
    assert method_name(config_from_dict({}, ["model.arch=hfcn"]).model) == "H-FCN"
    assert method_name(config_from_dict({}, ["model.modalities=t1"]).model) == "MASAN (T1 only)"


def test_table_is_mean_and_std_over_repeats(runs):
    root, made = runs
    with pytest.warns(UserWarning, match="skipping run"):
        results, skipped = collect_runs([root])
    assert {p.name for p, _ in skipped} == {"still_training", "broken"}
    assert "DONE" in dict((p.name, why) for p, why in skipped)["still_training"]
    rows = {r["method"]: r for r in summary_table(group_runs(results))}
    assert list(rows) == ["H-FCN", "MASAN", "MASAN (fusion=add)"]  # baseline first, like Table 2
    for method, preds in made.items():
        ms = [classification_metrics(p.labels, p.preds, CLASSES, "AD") for p in preds]
        for key in ("binary_accuracy", "precision", "recall", "accuracy"):
            v = np.array([m[key] for m in ms]) * 100
            assert rows[method][f"{key}_mean"] == pytest.approx(v.mean())
            assert rows[method][f"{key}_std"] == pytest.approx(v.std(ddof=1))
        assert rows[method]["runs"] == 3 and rows[method]["repeats"] == [0, 1, 2]


def test_rows_that_tested_other_subjects_in_a_repeat_are_warned_about(tmp_path, recwarn):
    """An H-FCN run with data.use_fmri=false keeps the subjects without fMRI that MASAN leaves out,
    so its repeat 0 is another split: the table says the rows' difference is partly of subjects."""
    make_run(tmp_path, "masan_r0", [], 0, 2)
    make_run(tmp_path, "hfcn_r0", ["model.arch=hfcn"], 0, 2)
    group_runs(collect_runs([tmp_path])[0])
    assert not [w for w in recwarn if "tested different subjects" in str(w.message)]
    p = fake_predictions(2, seed=0)
    more = Predictions(p.subjects + ["sub-999"], np.append(p.labels, 0), np.vstack([p.probs, p.probs[:1]]),
                       np.vstack([p.region_weights, p.region_weights[:1]]))
    write_predictions(more, tmp_path / "hfcn_r0", CLASSES, "AD")
    with pytest.warns(UserWarning, match=r"repeat 0: the rows tested different subjects \(H-FCN: 13; MASAN: 12 test"):
        group_runs(collect_runs([tmp_path])[0])


def test_cli_writes_tables_predictions_and_figures(runs, capsys):
    root, made = runs
    out = root.parent / "report"
    assert main([str(root), "--out", str(out), "--top-k", "5"]) == 0
    printed = capsys.readouterr()
    assert "| H-FCN | 3 |" in printed.out and "±" in printed.out
    assert "skipped" in printed.err and "still_training" in printed.err
    assert "cannot read its T1" in printed.err  # no store: maps skipped, rankings still drawn
    table = json.loads((out / "table.json").read_text())
    assert [m["method"] for m in table["methods"]] == list(METHODS)
    assert {s["run_dir"].split("/")[-1] for s in table["skipped"]} == {"still_training", "broken"}
    md = (out / "table.md").read_text()
    masan = next(m for m in table["methods"] if m["method"] == "MASAN")
    assert format_cell(masan["precision_mean"], masan["precision_std"]) in md
    with (out / "runs.csv").open() as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 9 and "recall/AD" in per_run[0]
    with (out / "predictions.csv").open() as f:
        subjects = list(csv.DictReader(f))
    assert len(subjects) == 9 * len(LABELS)
    assert set(subjects[0]) >= {"run_dir", "method", "repeat", "subject", "label", "pred", "prob_AD"}
    for stem in ("h-fcn", "masan", "masan-fusion-add"):
        assert (out / "figures" / f"{stem}_region_ranking.png").stat().st_size > 5000
        with (out / "figures" / f"{stem}_region_ranking.csv").open() as f:
            top = next(csv.DictReader(f))
        assert top["region"] == str(PLANTED) and top["name"] == "x1-y0-z1"


def test_unfinished_runs_can_be_included_on_request(runs, capsys):
    root, _ = runs
    assert main([str(root), "--out", str(root.parent / "r2"), "--allow-unfinished", "--no-figures"]) == 0
    table = json.loads((root.parent / "r2" / "table.json").read_text())
    assert next(m for m in table["methods"] if m["method"] == "MASAN")["runs"] == 4


def test_no_finished_run_exits_non_zero(tmp_path, capsys):
    make_run(tmp_path, "only", [], 0, 1, done=False)
    assert main([str(tmp_path / "only"), "--out", str(tmp_path / "rep")]) == 1
    assert "nothing to report" in capsys.readouterr().err


def test_single_run_has_no_std():
    assert format_cell(67.5, None) == "67.50 ± n/a"
    assert format_cell(None, None) == "n/a"


def _modes(root):
    """{path relative to root: permission bits (set-gid left out)} of everything below root."""
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) & 0o777 for p in root.rglob("*")}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_report_is_no_more_readable_than_its_runs(runs, tmp_path, umask_022):
    root, _ = runs
    for p in [root, *root.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    new = tmp_path / "new" / "report"  # both folders created by evaluate: they get the mode
    assert main([str(root), "--out", str(new), "--top-k", "3"]) == 0
    modes = _modes(tmp_path / "new")
    assert {"report/predictions.csv", "report/runs.csv", "report/figures/masan_region_ranking.png"} <= set(modes)
    assert {k: v for k, v in modes.items() if v != (0o700 if (tmp_path / "new" / k).is_dir() else 0o600)} == {}
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) & 0o777 == 0o700

    mine = tmp_path / "mine"  # the user's folder: only what evaluate wrote gets the mode
    mine.mkdir(mode=0o755)
    (mine / "notes.txt").write_text("mine")
    (mine / "predictions.csv").write_text("a report of before, written with the umask")
    assert main([str(root), "--out", str(mine), "--top-k", "3"]) == 0
    modes = _modes(mine)
    assert modes.pop("notes.txt") == 0o644 and stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert modes["figures"] == 0o700 and modes["predictions.csv"] == 0o600
    assert {k: v for k, v in modes.items() if v != (0o700 if (mine / k).is_dir() else 0o600)} == {}


def test_bad_atlas_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    root, _ = runs
    (tmp_path / "atlas.nii").write_text("not an image")
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), good)
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "rep", existing):
        assert main([str(root), "--out", str(out), "--atlas", str(tmp_path / "atlas.nii")]) == 2
        assert "cannot read atlas" in capsys.readouterr().err
        assert main([str(root), "--out", str(out), "--atlas", str(good),
                     "--atlas-labels", str(tmp_path / "labels.tsv")]) == 2
        assert f"{tmp_path / 'labels.tsv'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists() and list(existing.iterdir()) == []


def test_out_that_is_a_file_or_a_run_and_missing_runs_are_clear_errors(runs, tmp_path, capsys):
    root, _ = runs
    (tmp_path / "afile").write_text("keep")
    assert main([str(root), "--out", str(tmp_path / "afile")]) == 2
    assert f"--out {tmp_path / 'afile'} is an existing file" in capsys.readouterr().err
    assert main([str(root), "--out", str(tmp_path / "afile" / "rep")]) == 2
    assert f"{tmp_path / 'afile'} is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep"
    run = root / "MASAN_r0"  # a run's own folder: its predictions.csv would be overwritten
    before = (run / "predictions.csv").read_bytes()
    assert main([str(root), "--out", str(run / "report")]) == 2
    err = capsys.readouterr().err
    assert f"inside the training run directory {run}" in err
    assert f"e.g. --out {root / 'MASAN_r0_report'}" in err  # outside the run: not refused in turn
    assert (run / "predictions.csv").read_bytes() == before and not (run / "report").exists()
    # a typo among run directories: refused (it was skipped, and the table lacked that method's row)
    assert main([str(root), str(tmp_path / "nowhere"), "--out", str(tmp_path / "rep")]) == 2
    assert "nowhere does not exist: give run directories" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def _runs(tmp_path, repeats):
    for i, (repeat, errors) in enumerate(repeats):
        make_run(tmp_path / "runs", f"MASAN_{i}", [], repeat, errors)
    return collect_runs([tmp_path / "runs"])[0]


def test_a_single_run_has_no_std_in_the_summary(tmp_path):
    """One run: the std is None ("± n/a"), not NaN printed as a number."""
    row, = summary_table(group_runs(_runs(tmp_path, [(0, 2)])))
    for m in ("binary_accuracy", "precision", "recall", "accuracy"):
        assert row[f"{m}_mean"] is not None and row[f"{m}_std"] is None and row[f"{m}_n"] == 1


def test_one_repeat_given_twice_is_warned_about(tmp_path):
    """Two runs of one repeat are the same split: counted twice they shrink the std."""
    results = _runs(tmp_path, [(0, 2), (0, 3), (1, 1)])
    with pytest.warns(UserWarning, match=r"repeat\(s\) \[0\] appear more than once"):
        group_runs(results)
