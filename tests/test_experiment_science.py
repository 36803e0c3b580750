"""experiments.science: its cohort commands, the paper-exact variant, the rows fitted without training
(oracle, linear baseline) on the runs' split, and end to end at a tiny size: cohort, two trained
variants, the oracle and the linear row, table, raw numbers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from experiments import REPO, baselines, cohort, science, scoring, training
from masan.config import load_config
from masan.synth.presets import PRESETS

# 4 subjects per class on a 32^3 MNI152 grid, one epoch per phase, fp32 (bf16 is far slower on CPUs)
TINY = ["--per-class", "4", "--t1-shape", "32", "32", "32", "--fmri-shape", "8", "8", "8", "--frames", "8",
        "--repeats", "1", "--variants", "masan", "t1_only", "linear",
        "train.pretrain_epochs=1", "train.joint_epochs=1", "split.val_fraction=0", "train.precision=fp32"]
NUMBER = r"\d+\.\d+(?: ± \d+\.\d+)?"


def test_overrides_may_follow_the_variant_list():
    args = science.parse_args(["--variants", "masan", "hfcn", "train.joint_epochs=2", "--repeats", "2"])
    assert args.variants == ["masan", "hfcn"] and args.overrides == ["train.joint_epochs=2"] and args.repeats == 2


def test_a_word_that_is_no_override_is_refused_and_set_is_taken():
    """A value split from its key by a space was dropped without a word: the runs trained at
    the defaults while the user believed otherwise; --set is the overrides' other spelling."""
    with pytest.raises(SystemExit) as e:
        science.parse_args(["--repeats", "1", "train.joint_epochs", "40"])
    assert e.value.code == 2
    args = science.parse_args(["--set", "optim.lr=1e-3", "log.every_steps=2", "--out", "reports/lr=3e-4.md",
                               "deterministic=true"])
    assert args.overrides == ["optim.lr=1e-3", "log.every_steps=2", "deterministic=true"]
    assert str(args.out) == "reports/lr=3e-4.md"
    with pytest.raises(SystemExit):
        science.parse_args(["--set", "optim.lr=1e-3", "oops"])


def test_cells_are_mean_and_sample_std_over_repeats():
    cell = scoring.cell
    assert cell([0.5, 0.7]) == "0.60 ± 0.14"
    assert cell([3, None], 1) == "3.0"
    assert cell([None]) == "-"


def test_one_experiment_per_work_dir(tmp_path, capsys):
    held = science.lock_work(tmp_path)
    assert held is not None and science.lock_work(tmp_path) is None
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    held.close()
    assert science.lock_work(tmp_path) is not None


def test_a_change_of_the_training_code_is_not_scored_with_old_runs(tmp_path, monkeypatch):
    """The run stamp holds a fingerprint of masan/ and launch/: a fix that leaves the config as it
    was (e.g. which parameters a gradient reaches) retrains; documentation does not."""
    (tmp_path / "masan" / "model").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    code = tmp_path / "masan" / "model" / "fusion.py"
    code.write_text("scale_after_fusion = True\n")
    monkeypatch.setattr(training, "REPO", tmp_path)
    before = training.code_fingerprint()
    (tmp_path / "docs" / "notes.md").write_text("measured\n")
    assert training.code_fingerprint() == before
    code.write_text("scale_after_fusion = False\n")
    assert training.code_fingerprint() != before


def test_a_run_still_training_is_not_deleted_and_trainings_end_with_the_benchmark(tmp_path, capsys):
    """A benchmark killed with its trainings still at work, then started again with other code:
    a run folder whose run.lock is held is left alone (it was deleted under the live training);
    the command trains with the benchmark's pid as its launcher (train_local.py then dies with it)."""
    from masan.rundir import RunDir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).bench_stamp.write_text(json.dumps({"code": "older"}))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from masan.train.runlock import RunLock; "
                               f"RunLock({str(run_dir)!r}).take(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        show_pid = [sys.executable, "-c", "import os; print('launcher', os.environ['MASAN_LAUNCHER_PID'])"]
        assert training.train(show_pid, run_dir, {}, dict(os.environ), "h", "new")["status"] == "failed"
        assert RunDir(run_dir).bench_stamp.is_file()  # the folder is as it was
        assert f"FAILED: {run_dir} was made with other arguments, code or cohort, but " in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert training.train(show_pid, run_dir, {}, dict(os.environ), "h", "new")["status"] == "failed"  # no predictions
    assert f"launcher {os.getpid()}" in RunDir(run_dir).train_log.read_text()


def cohort_of(argv: list[str]) -> tuple[object, dict, list[list[str]]]:
    """(args, stamp, [synth_cohort, to_zarr] command) as main() makes them at the science.yaml sizes."""
    args = science.parse_args(argv)
    args.per_class = args.per_class or PRESETS[args.preset].per_class
    args.t1_shape, args.fmri_shape = [48, 56, 48], [12, 14, 12]
    args.frames = args.frames or PRESETS[args.preset].frames
    stamp = cohort.cohort_args(args, [4, 4, 4])
    return args, stamp, cohort.cohort_commands(stamp, Path("bids"), Path("cohort.zarr"))


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_cohort_flags_reach_the_cohort_commands():
    args, easy, (synth, convert) = cohort_of([])
    assert args.work == REPO / "runs/science"
    assert flag(synth, "--preset") == "easy" and flag(synth, "--per-class") == "16" and "--subjects" not in synth
    assert flag(convert, "--register") == "none" and flag(convert, "--template") == "mni152"
    assert "--t1-shape" not in convert  # the synthetic volumes are stored as written
    assert "--threads" not in convert  # nothing registered: nothing to thread

    args, adni, (synth, convert) = cohort_of(["--preset", "adni-like"])
    assert args.work == REPO / "runs/science-adni-like"  # two cohorts do not overwrite each other
    assert flag(synth, "--preset") == "adni-like" and flag(synth, "--subjects") == "96" and "--per-class" not in synth
    assert flag(synth, "--frames") == "48"  # the preset's frames, and the model's (main's shape overrides)
    assert flag(convert, "--register") == "syn" and flag(convert, "--template") == "mni152"
    assert convert[convert.index("--t1-shape") + 1:][:3] == ["48", "56", "48"]  # the template grid is the model's
    assert convert[convert.index("--fmri-shape") + 1:][:3] == ["12", "14", "12"]
    assert flag(convert, "--threads") == "1" and int(flag(convert, "--workers")) >= 1  # a repeatable store
    assert adni["registration_threads"] == 1 and "registration_threads" not in easy  # unregistered copies kept

    _, other, (synth, convert) = cohort_of(["--preset", "adni-like", "--subjects", "40", "--register", "affine",
                                         "--structures", "hippocampus"])
    assert flag(synth, "--subjects") == "40" and flag(convert, "--register") == "affine"
    assert flag(synth, "--structures") == "hippocampus"
    assert len({json.dumps(s, sort_keys=True) for s in (easy, adni, other)}) == 3  # each its own stamp

    for argv in (["--subjects", "40"], ["--preset", "adni-like", "--per-class", "8"]):
        with pytest.raises(SystemExit):
            science.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--per-class", "0"], "argument --per-class: must be at least 1, got 0"),
    (["--frames", "0"], "argument --frames: must be at least 1, got 0"),
    (["--t1-shape", "0", "8", "8"], "argument --t1-shape: must be at least 1, got 0"),
    (["--preset", "adni-like", "--subjects", "3"], "argument --subjects: must be at least 4, got 3"),
    (["--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
])
def test_bad_cohort_numbers_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        science.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_work_and_out_are_checked_before_any_work(tmp_path, capsys):
    """A --work or --out that cannot be written is refused up front, not after the whole experiment."""
    afile, folder = tmp_path / "file", tmp_path / "folder"
    afile.write_text("x")
    folder.mkdir()
    for argv, message in ((["--work", str(afile)], f"--work {afile} is a file, not a folder"),
                          (["--work", str(afile / "w")], f"--work {afile / 'w'} lies below {afile}"),
                          (["--work", str(folder), "--out", str(afile / "t.md")],
                           f"--out {afile / 't.md'}: its folder {afile} is a file"),
                          (["--work", str(folder), "--out", str(folder)], f"--out {folder} is a folder")):
        with pytest.raises(SystemExit) as e:
            science.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert afile.read_text() == "x" and list(folder.iterdir()) == []
    args = science.parse_args(["--work", str(folder), "--out", str(folder / "t.md"), "--per-class", "3",
                               "--frames", "5"])
    science.cohort_sizes(args, load_config(science.CONFIG))
    assert (args.per_class, args.frames) == (3, 5)  # as given, never a default in their place


def test_a_changed_cohort_is_remade(tmp_path, monkeypatch):
    made = []

    def run_step(cmd):
        made.append(cmd)
        if "data_tools/to_zarr.py" in cmd:
            Path(flag(cmd, "--out")).mkdir(parents=True)

    monkeypatch.setattr(cohort, "run_step", run_step)
    _, stamp, _ = cohort_of([])
    cohort.make_cohort(tmp_path, stamp)
    cohort.make_cohort(tmp_path, stamp)
    assert len(made) == 2  # the second call reused it
    cohort.make_cohort(tmp_path, {**stamp, "t1_shape": tuple(stamp["t1_shape"])})
    assert len(made) == 2  # a tuple where the stamp on disk has a list is the same cohort
    cohort.make_cohort(tmp_path, {**stamp, "register": "rigid"})
    assert len(made) == 4 and flag(made[-1], "--register") == "rigid"


def test_paper_exact_config_loads_and_trains_at_the_bench_scale(tmp_path):
    """paper-exact.yaml holds the paper's method; the bench's paper_exact run takes only sizes,
    budgets and plumbing from science.yaml (BENCH_SCALE), so it differs from masan in method only."""
    paper = load_config(training.PAPER_EXACT)
    assert (paper.model.fusion_cells, paper.model.screen_features, paper.model.head_grad_to_encoders) == (1, 0, 1.0)
    assert paper.model.region_weights == "embedding" and paper.split.val_fraction == 0
    assert paper.model.t1_shape == [240, 256, 176] and paper.data.fmri_frames == 976

    args = science.parse_args(["--work", str(tmp_path)])
    science_cfg = load_config(science.CONFIG)
    cfg = {v: training.command_config(training.train_command(args, tmp_path / v, tmp_path / "c.zarr", v, 1,
                                                             ["model.t1_shape=[32,40,32]"], science_cfg))
           for v in ("masan", "paper_exact")}
    exact, ours = cfg["paper_exact"], cfg["masan"]
    assert exact.model.fusion_cells == 1 and exact.model.head_grad_to_encoders == 1.0
    assert exact.model.t1_shape == ours.model.t1_shape == [32, 40, 32]  # the bench's shape overrides too
    for key in training.BENCH_SCALE:
        section, _, name = key.partition(".")
        here = getattr(exact, section) if not name else getattr(getattr(exact, section), name)
        there = getattr(ours, section) if not name else getattr(getattr(ours, section), name)
        assert here == there, key
    assert exact.split.repeat == ours.split.repeat == 1 and exact.run_dir == str(tmp_path / "paper_exact")


def test_linear_row_is_fitted_on_the_runs_split_from_the_store_alone(tiny_store, tmp_path, monkeypatch):
    """The linear baseline reads the store's voxels, never the planted truth (this store has none:
    the oracle cannot run on it), fits on the training part of the split the runs used, and is
    scored on its test part."""
    from masan.config import config_from_dict
    from masan.data.splits import make_split
    from masan.rundir import RunDir
    from masan.store.cohort import CohortStore

    store = CohortStore(tiny_store)
    cfg = config_from_dict({"data": {"classes": ["NC", "AD"], "fmri_frames": 6}})
    row = baselines.LinearBaseline(store, cfg.data, cfg.split, [2, 2, 2], fmri=False)
    subjects = sorted(row.label)
    runs = make_split(subjects, [row.label[s] for s in subjects], type(cfg.split)(repeat=5))
    run_dir = tmp_path / "masan" / "r0"
    run_dir.mkdir(parents=True)
    runs.save(RunDir(run_dir).split)
    split = row.split(0, [tmp_path / "missing", run_dir])
    assert (split.train, split.test) == (runs.train, runs.test)
    assert split.test != make_split(subjects, [row.label[s] for s in subjects], cfg.split).test  # not repeat 0's

    fitted, fit_linear = {}, baselines.fit_linear

    def fit(X, y, seed, blocks, ordinal=False, jobs=1):
        fitted.update(X=X, y=y, ordinal=ordinal)
        return fit_linear(X, y, seed, blocks, ordinal, jobs)

    monkeypatch.setattr(baselines, "fit_linear", fit)
    res = row.score(split)
    voxels = np.stack([store.read_t1(s, normalize=True).ravel() for s in split.train])
    np.testing.assert_array_equal(fitted["X"], voxels)  # the training part's stored T1, nothing else
    assert list(fitted["y"]) == [row.label[s] for s in split.train]
    assert res["n"] == len(split.test) and 0 <= res["accuracy"] <= 1
    assert res["chosen"]["k"]["t1"] in baselines.K_CHOICES and res["chosen"]["C"] in baselines.C_CHOICES
    assert res["region_weights"].shape == (len(split.test), 8)
    with pytest.raises(ValueError, match="planted_effect"):
        baselines.Oracle(store, cfg.data, cfg.split).score(split)

    both = baselines.LinearBaseline(store, cfg.data, cfg.split, [2, 2, 2], fmri=True)
    features = both.features(split.train[:1])
    t1, fmri = store.shape(split.train[0], "t1"), store.shape(split.train[0], "fmri")
    assert features.shape[1] == np.prod(t1) + np.prod(fmri[1:]) + 8 * 7 // 2  # voxels, voxels, region pairs
    assert (both.feature_region == -1).sum() == 8 * 7 // 2 and both.feature_region.max() == 7
    assert both.blocks["t1"].size == np.prod(t1) and both.blocks["fmri"][0] == np.prod(t1)  # one block per modality
    res = both.score(split)
    assert set(res["chosen"]["k"]) == {"t1", "fmri"} and res["n"] == len(split.test)
    ordinal = baselines.LinearBaseline(store, cfg.data, cfg.split, [2, 2, 2], fmri=False, ordinal=True).score(split)
    assert fitted["ordinal"] and ordinal["n"] == len(split.test)
    assert ordinal["region_weights"].shape == (len(split.test), 8)
    for rule in ("argmax", "expected_stage"):  # --fitted-rule: every split called by the rule given
        fixed = baselines.LinearBaseline(store, cfg.data, cfg.split, [2, 2, 2], fmri=False, rule=rule)
        assert fixed.score(split)["decision"] == rule
    assert science.parse_args(["--fitted-rule", "argmax"]).fitted_rule == "argmax"
    assert science.parse_args([]).fitted_rule == "nested"


def test_linear_settings_come_from_cross_validation_on_the_training_part():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    X = rng.normal(size=(30, 2500))
    X[:, 7] += 3 * y  # one informative feature among noise
    pipe, chosen = baselines.fit_linear(X, y, seed=0)
    assert chosen["cv_folds"] == 5 and chosen["k"]["all"] in baselines.K_CHOICES
    assert chosen["k"]["all"] <= 10  # one informative feature: the grid reaches down to a few
    assert chosen["C"] in baselines.C_CHOICES and (pipe.predict(X) == y).mean() > 0.9
    parallel, same = baselines.fit_linear(X, y, seed=0, jobs=2)  # the grid on two processes: the same fit
    assert same == chosen and np.allclose(parallel.predict_proba(X), pipe.predict_proba(X))
    everything = {"all": np.arange(2500)}
    weights = baselines.region_weights(pipe, everything, np.arange(2500), 2500)  # each feature its own region
    assert weights.argmax() == 7 and np.isclose(weights.sum(), 1)
    _, chosen = baselines.fit_linear(X[:21], np.r_[y[:20], 2], seed=0)  # a class of one: nothing to cross-validate
    assert chosen == {"k": {"all": baselines.DEFAULT_K}, "C": baselines.DEFAULT_C, "cv_folds": 0}
    blocks = {"many": np.arange(30, 2500), "few": np.arange(30)}
    pipe, chosen = baselines.fit_linear(X, y, seed=0, blocks=blocks)
    assert chosen["k"]["few"] <= 30  # no more than there are
    weights = baselines.region_weights(pipe, blocks, np.arange(2500), 2500)
    assert weights.argmax() == 7  # found in its own block


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A classifier whose class probabilities are its first features: what a rule makes of them."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        return X[:, :len(self.classes_)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


def test_each_fitted_row_picks_its_decision_rule_inside_the_training_part():
    """Probabilities ordered by stage (split between neighbours) are called better by the expected
    stage; a model that splits subjects between NC and AD is called better by arg-max; a tie keeps
    the rule the trained runs use."""
    y = np.repeat([0, 1, 2, 3], 10)
    ordered = np.zeros((40, 4))
    for i, stage in enumerate(y):  # 0.3 on the truth, 0.35 on each neighbour (the edges keep theirs)
        ordered[i, stage] = 0.3
        for near in (stage - 1, stage + 1):
            ordered[i, min(max(near, 0), 3)] += 0.35
    bimodal = np.eye(4)[y] * 0.4 + 0.6 * np.eye(4)[np.where(y < 2, 3, 0)]
    bimodal[y == 3] = np.eye(4)[3]
    bimodal[y == 0] = np.eye(4)[0]
    bimodal[y == 1] = [0.1, 0.5, 0.0, 0.4]  # a stage-1 subject with weight on AD: expected stage 2.3
    bimodal[y == 2] = [0.4, 0.0, 0.5, 0.1]
    for probs, expected in [(ordered, "expected_stage"), (bimodal, "argmax")]:
        for preferred in ("argmax", "expected_stage"):
            assert baselines.nested_decision(GivenProbabilities(), probs, y, 0, preferred) == expected
    exact = np.eye(4)[y]
    assert baselines.nested_decision(GivenProbabilities(), exact, y, 0, "expected_stage") == "expected_stage"
    assert baselines.nested_decision(GivenProbabilities(), exact, y, 0, "argmax") == "argmax"


def test_ablations_may_run_fewer_repeats_and_the_table_says_so():
    default = science.parse_args([])
    assert all(set(science.MINUTES[p]) == set(science.VARIANTS) for p in PRESETS)  # every run ordered by its cost
    assert (default.repeats, default.ablation_repeats) == (3, 1)  # the default command's size: MASAN on every split
    args = science.parse_args(["--repeats", "3", "--ablation-repeats", "5"])
    assert args.ablation_repeats == 3  # never more than MASAN's
    with pytest.raises(SystemExit):
        science.parse_args(["--ablation-repeats", "0"])
    run = {"accuracy": 0.5, "binary_accuracy": 0.75, "precision": 0.5, "recall": 0.5, "auc": 0.6, "best_rank": 1,
           "top3": True, "minutes": 1.0, "decision": "expected_stage"}
    other = {**run, "decision": "argmax"}
    text = scoring.table({"masan": [run] * 3, "hfcn": [run], "masan (first 1)": [run], "linear": [run, other, other]},
                         [], 3.0, "header")
    assert "| masan | 0.50 ± 0.00 |" in text and "| 3/3 | stage | 3/3 | 1.0 ± 0.0 |" in text
    assert "| arg-max 2, stage 1 |" in text  # each row says how it called the classes
    assert "| hfcn | 0.50 |" in text and "| masan (first 1) |" in text and text.count("| 1/1 | stage | 1/1 |") == 2


def test_rows_are_compared_with_masan_split_by_split():
    def r(acc, auc):
        return {"accuracy": acc, "binary_accuracy": acc, "auc": auc}

    rows = {"linear": [r(0.6, 0.9), r(0.7, None), r(0.5, 0.8)], "masan": [r(0.7, 0.92), r(0.7, 0.93), r(0.6, 0.9)],
            "masan (first 1)": [r(0.7, 0.92)], "hfcn": [r(0.8, 0.9)], "t1_only": [{"status": "failed"}]}
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in scoring.paired(rows, "masan").splitlines()}
    # per split 0.1, 0.0, 0.1: higher on two, the same on one; AUC only where both have one
    assert lines["linear"] == "| linear | 3 | +0.07 ± 0.06 (2/1/0) | +0.07 ± 0.06 (2/1/0) | +0.06 ± 0.06 (2/0/0) |"
    assert lines["hfcn"] == "| hfcn | 1 | -0.10 (0/0/1) | -0.10 (0/0/1) | +0.02 (1/0/0) |"  # only the splits both ran
    assert lines["t1_only"] == "| t1_only | 0 | - | - | - |"  # a failed run compares with nothing
    assert "masan" not in lines and "masan (first 1)" not in lines
    assert scoring.signed([0.1, -0.1001]) == "+0.00 ± 0.14"  # a mean that rounds to zero has no sign of its own


@pytest.mark.slow
def test_science_experiment_end_to_end(tmp_path):
    work = tmp_path / "science"
    cmd = [sys.executable, "-m", "experiments.science", "--work", str(work), *TINY]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "synth_cohort.py --anatomy mni152" in res.stdout and "to_zarr.py" in res.stdout
    table = (work / "science.md").read_text()
    for row in ("oracle", "linear", "masan", "t1_only"):
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {row} |")), None)
        assert line is not None, table
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(re.fullmatch(NUMBER, c) for c in cells[1:5]), line  # 4-class acc, AD acc, precision, recall
        assert cells[9] == "1/1", line  # runs ok
    assert "| masan_add |" not in table and "Chance: always-" in table
    assert re.search(r"^\| t1_only \| 1 \| [+-]\d", table.split("Paired by split")[1], re.M), table
    raw = json.loads((work / "science.json").read_text())
    assert set(raw["runs"]) == {"oracle", "linear", "masan", "t1_only"}
    assert raw["runs"]["linear"][0]["n"] == raw["runs"]["masan"][0]["n"]  # the same test part
    masan = raw["runs"]["masan"][0]
    assert masan["status"] == "trained" and masan["n"] > 0 and 1 <= masan["best_rank"] <= 64
    assert set(masan["rank_by_structure"]) == set(raw["planted_regions"]["by_structure"])

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "reusing the cohort" in again.stdout and again.stdout.count("(cached)") == 2
    assert json.loads((work / "science.json").read_text())["runs"]["masan"][0]["accuracy"] == masan["accuracy"]


def test_preset_model_settings_reach_the_variants_trained_from_the_bench_config(tmp_path):
    """adni-like turns the connectivity pairs on for every variant trained from science.yaml (no_conn
    turns them off again); the paper's exact MASAN never gets them; the easy preset adds nothing."""
    science_cfg = load_config(science.CONFIG)

    def config(preset: str, variant: str):
        args = science.parse_args(["--work", str(tmp_path), "--preset", preset])
        return training.command_config(training.train_command(args, tmp_path / variant, tmp_path / "c.zarr",
                                                              variant, 0, [], science_cfg))

    cells = {v: config("adni-like", v).model.connectivity_cells for v in training.VARIANTS}
    assert cells["masan"] > 0 and cells["fmri_only"] == cells["masan"]
    assert cells["no_conn"] == 0 and cells["paper_exact"] == 0
    assert config("easy", "masan").model.connectivity_cells == 0
    assert config("adni-like", "masan").train.joint_epochs > config("easy", "masan").train.joint_epochs
    ordered = config("adni-like", "t1_only")  # its stages learnt and called in order
    assert (ordered.model.head, ordered.data.decision) == ("ordinal", "expected_stage")
    assert ordered.loss.label_smoothing > 0
    for paper in (config("easy", "masan"), config("adni-like", "paper_exact")):
        assert (paper.model.head, paper.data.decision, paper.loss.label_smoothing) == ("softmax", "argmax", 0.0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_cohort_stamp_reads_back_equal_so_the_cohort_is_reused(tmp_path, preset):
    """The stamp is compared with its JSON copy on disk: a tuple in it (a preset's shape) would never
    compare equal, and every run of the experiment would make its cohort afresh."""
    args = science.parse_args(["--work", str(tmp_path), "--preset", preset])
    science.cohort_sizes(args, load_config(science.CONFIG))
    stamp = cohort.cohort_args(args, [4, 4, 4])
    assert json.loads(json.dumps(stamp)) == stamp


def test_the_table_says_when_its_cohort_chose_the_presets_settings():
    """The adni-like settings were chosen inside training parts of the seed-0 cohort, which hold
    most of its splits' test subjects: its table must not read as a held-out result."""
    planted = {"by_structure": {"hippocampus": [1]}}
    shapes = ["--t1-shape", "8", "8", "8", "--fmri-shape", "4", "4", "4"]
    for seed, held_out in ((0, False), (3, True)):
        args = science.parse_args(["--preset", "adni-like", "--seed", str(seed), *shapes])
        header = science.table_header(args, planted, {"masan": args.repeats}, "expected_stage")
        assert ("Not a held-out result" in header) is not held_out, header
    easy = science.parse_args(["--preset", "easy", *shapes])
    assert "held-out" not in science.table_header(easy, planted, {"masan": easy.repeats}, "argmax")


def test_a_moved_work_folder_keeps_its_finished_runs(tmp_path, capsys):
    """A run's stamp held the work folder's absolute paths: a work folder copied to another node
    (or trained from another clone) deleted every finished run and trained it again."""
    from masan.rundir import RunDir

    def finish_in(work: Path) -> tuple[list[str], Path]:
        run_dir = work / "runs" / "masan" / "r0"
        write = f"import pathlib; pathlib.Path({str(run_dir / 'predictions.csv')!r}).write_text('done')"
        return [sys.executable, "-c", write, f"run_dir={run_dir}", f"data.cache_dir={work / 'cache'}"], run_dir

    cmd, run_a = finish_in(tmp_path / "a")
    assert training.train(cmd, run_a, {}, dict(os.environ), "h", "c", tmp_path / "a")["status"] == "trained"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cmd, run_b = finish_in(tmp_path / "b")
    assert training.train(cmd, run_b, {}, dict(os.environ), "h", "c", tmp_path / "b")["status"] == "cached"
    assert "starting it afresh" not in capsys.readouterr().out and RunDir(run_b).predictions.is_file()
    cmd, run_c = finish_in(tmp_path / "b")
    assert training.train([*cmd, "optim.lr=1"], run_c, {}, dict(os.environ), "h", "c", tmp_path / "b")["status"] \
        == "trained"  # another command is still another run
    assert "starting it afresh" in capsys.readouterr().out
    # whole path components only: another folder whose name starts like the work folder's is not it
    assert training.portable(["data.store=/x/w2/s.zarr"], Path("/x/w")) != \
        training.portable(["data.store=/y/w2/s.zarr"], Path("/y/w"))
