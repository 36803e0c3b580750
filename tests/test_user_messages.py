"""Messages users meet when an input is wrong: each names the file, run or key, and the fix."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from launch.slurm.plan import Resources, parse_time_min, slurm_time, time_text
from launch.submit import build_parser
from masan.config import ConfigError, config_from_dict, save_config
from masan.data.splits import Split
from masan.evaluate.region_ranking import RegionError, open_atlas, resample_atlas


def test_predict_with_the_runs_store_gone_says_to_pass_store(tmp_path, capsys):
    from masan.predict import main

    run, gone = tmp_path / "run", tmp_path / "scratch" / "gone.zarr"
    run.mkdir()
    save_config(config_from_dict({}, [f"run_dir={run}", f"data.store={gone}"]), run / "config.yaml")
    Split(train=["sub-01"], test=["sub-02"], repeat=0, seed=0).save(run / "split.json")
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the cohort store {gone} that {run} trained on (its data.store) does not exist")
    assert "Pass where it is now with --store PATH" in err and "to predict the run's test part" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def three_class_store(tmp_path_factory) -> Path:
    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    root = tmp_path_factory.mktemp("three_classes")
    classes = ("NC", "AD", "EMCI")
    bids = synthesize_cohort(root / "bids", n_per_class={"NC": 2, "AD": 2, "EMCI": 3}, t1_shape=(8, 8, 8),
                             fmri_shape=(4, 4, 4), frames=4, classes=classes)
    store = root / "cohort.zarr"
    report = convert_cohort(discover_bids(bids), store, ConvertOptions(patch_grid=(2, 2, 2)), classes=classes,
                            progress=False)
    assert not report.failed, report.failed
    return store


def test_subjects_of_other_classes_are_counted_once_at_info(three_class_store, caplog):
    from masan.config import DataConfig
    from masan.data.dataset import select_subjects

    cfg = DataConfig(classes=["NC", "AD"])
    with caplog.at_level(logging.INFO, logger="masan.data.dataset"):
        for _ in range(2):  # a start selects twice (store contract, preflight): one line
            subjects, _, _ = select_subjects(three_class_store, cfg)
    assert len(subjects) == 4
    told = [r for r in caplog.records if r.name == "masan.data.dataset"]
    assert [r.levelno for r in told] == [logging.INFO]
    assert told[0].getMessage() == (f"data.classes=[NC, AD]: 3 subject(s) of {three_class_store} of other classes "
                                    "left out (EMCI 3); data.merge pools classes into one of data.classes")


def test_a_run_dir_that_cannot_be_made_is_a_config_error(tmp_path):
    from masan.train.run import USER_ERRORS
    from masan.train.runlock import RunLock

    (tmp_path / "file").write_text("a file where the run directory's parent should be")
    run_dir = tmp_path / "file" / "run"
    with pytest.raises(ConfigError) as e:
        RunLock(run_dir).take()
    assert isinstance(e.value, USER_ERRORS)  # launchers exit 2 and do not restart it
    assert str(e.value).startswith(f"run_dir={run_dir}: cannot create {run_dir} (")
    assert "choose a run_dir in a folder you may write" in str(e.value)


@pytest.mark.parametrize("value, hint", [("NC,AD", "[NC,AD]"), ("NC", "[NC]"), ("'NC AD'", "[NC,AD]")])
def test_a_list_written_without_brackets_is_shown_with_them(value, hint):
    with pytest.raises(ConfigError, match=r"data\.classes: expected a list, got .*; write it as " + hint.replace(
            "[", r"\[").replace("]", r"\]") + "$"):
        config_from_dict({}, [f"data.classes={value}"])


def _save(volume: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def test_an_intensity_image_is_refused_as_atlas(tmp_path):
    rng = np.random.default_rng(0)
    t1 = _save(rng.normal(500, 40, (16, 16, 16)).astype(np.int16), tmp_path / "sub-01_T1w.nii.gz")
    with pytest.raises(RegionError, match=r"distinct non-zero values, and only \d+% of neighbouring voxels share one"
                                          r".* an intensity image \(a T1\?\), not a label volume; pass an atlas"):
        open_atlas(t1)
    with pytest.raises(RegionError, match="intensity image"):
        resample_atlas(t1, (4, 4, 4), np.eye(4))
    probabilities = _save(rng.random((8, 8, 8)).astype(np.float32), tmp_path / "prob.nii.gz")
    with pytest.raises(RegionError, match=r"atlas .*prob.nii.gz holds non-integer values \(e.g. 0\.\d+\)"):
        open_atlas(probabilities)


def test_atlases_with_many_labels_or_float_labels_are_accepted(tmp_path):
    blocks = np.arange(1, 1001).reshape(10, 10, 10)  # 1000 regions (Schaefer's finest) of 4x4x4 voxels
    fine = _save(blocks.repeat(4, 0).repeat(4, 1).repeat(4, 2).astype(np.int16), tmp_path / "fine.nii.gz")
    assert open_atlas(fine).shape == (40, 40, 40)
    halves = np.zeros((8, 8, 8), np.float32)
    halves[:4], halves[4:] = 3.0, 17.0
    floats = _save(halves, tmp_path / "float_labels.nii.gz")
    assert set(np.unique(resample_atlas(floats, (8, 8, 8), np.eye(4)))) == {3, 17}


@pytest.mark.parametrize("text", ["0", "0:00", "00:00:00", "0-0"])
def test_time_zero_is_refused_not_made_one_minute(text):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        slurm_time(text)
    assert str(e.value) == (f"--time {text}: give a limit, e.g. --time {time_text(Resources.time_min)}; SLURM's 0 "
                            "(no limit) is not supported: a run needs its limit to save before it")
    assert parse_time_min(text) == 1  # SLURM's own times (a job's run time) still read as before
    assert slurm_time("0:30") == 1  # a limit under a minute is one, rounded up


def test_time_zero_on_the_command_line_names_what_was_typed(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--time", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --time: --time 0: give a limit" in err and "1 min" not in err


def test_help_shows_the_defaults_of_every_resource_and_mode_option():
    parser = build_parser()
    text, default = " ".join(parser.format_help().split()), parser.get_default
    for shown in (f"--nodes NODES nodes per job (default: {Resources().nodes})",
                  f"--repeats REPEATS repeats (different splits) per variant (default: {default('repeats')})",
                  f"--poll POLL seconds between state checks with --wait (default: {default('poll')})",
                  f"--job-name JOB_NAME SLURM job name (default: {Resources().job_name})"):
        assert shown in text


def test_predict_refuses_a_split_part_with_another_store(tmp_path, capsys):
    """--store predicts every subject of that store: --split val beside it was silently ignored."""
    from masan.predict import main as predict_main

    with pytest.raises(SystemExit) as e:
        predict_main([str(tmp_path), "--store", str(tmp_path / "c.zarr"), "--split", "val",
                      "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "with --store every subject of that store is predicted" in capsys.readouterr().err


def test_the_demo_refuses_a_bad_override_before_making_anything(tmp_path, capsys):
    """It was checked at step 3, after a cohort was made and converted for nothing."""
    from launch.demo import main as demo_main

    assert demo_main(["--root", str(tmp_path), "--set", "optim.lrr=1"]) == 2
    assert "unknown config key(s) optim.lrr" in capsys.readouterr().err and not any(tmp_path.iterdir())
