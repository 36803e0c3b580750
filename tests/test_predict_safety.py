"""What ``python -m masan.predict`` refuses, on one real tiny run: a damaged, deleted or
non-finite checkpoint, an unfinished run, an ``--out`` inside a store or a run directory,
naming a file or that cannot be made, an empty ``--split`` part, a store under other class
names; what it warns about (subjects left out for their class, the run's own training
subjects); and the access mode of what it writes (never more open than the store and the
run it read).

One run trains per module (tests/conftest.py's tiny cohort, 1 pretrain + 1 joint epoch: 14
steps, checkpoints at steps 7 and 14); each destructive case damages a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from disks import fill, small_disk
from masan.train.checkpoint import MARKER, POINTER

pytestmark = pytest.mark.slow  # every test needs a trained run

REPO = Path(__file__).resolve().parents[1]
STATES = "mp_rank_00_model_states.pt"
FINAL, EARLIER = "step_000014", "step_000007"


def _train(config: Path, run: Path, *overrides: str) -> None:
    res = subprocess.run([sys.executable, str(REPO / "launch/train_local.py"), "--config", str(config),
                          f"run_dir={run}", "train.pretrain_epochs=1", "train.joint_epochs=1", *overrides],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def predict(run: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "masan.predict", str(run), "--out", str(out), *args],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res


def refused(res: subprocess.CompletedProcess, out: Path, *texts: str) -> None:
    """Exit 2, each text in the message, and nothing written."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    for text in texts:
        assert text in res.stderr, (text, res.stderr)
    assert not out.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config) -> Path:
    path = tmp_path_factory.mktemp("predict_safety") / "run"
    _train(tiny_config, path)
    assert (path / "DONE").is_file() and (path / "checkpoints" / FINAL / MARKER).is_file()
    assert (path / "checkpoints" / EARLIER / MARKER).is_file()
    return path


@pytest.fixture
def copy(tmp_path, run) -> Path:
    """A copy of the trained run to damage."""
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------------- the checkpoint


def test_same_size_damage_to_the_weights_is_refused_naming_the_file(tmp_path, copy):
    path = copy / "checkpoints" / FINAL / STATES
    weights = torch.load(path, map_location="cpu", weights_only=False)["module"]
    name, tensor = max(weights.items(), key=lambda kv: kv[1].numel())
    data = path.read_bytes()
    at = data.find(tensor.contiguous().numpy().tobytes()[:188])
    assert at > 0, "the tensor's bytes are stored verbatim in the file"
    path.write_bytes(data[:at] + torch.full((47,), 3.0).numpy().tobytes() + data[at + 188:])
    # the defect: the file still loads, with other weights, so predictions would be wrong and look fine
    assert not torch.equal(torch.load(path, map_location="cpu", weights_only=False)["module"][name], tensor)

    res = predict(copy, tmp_path / "out")
    refused(res, tmp_path / "out", str(copy / "checkpoints" / FINAL), STATES, "sha256", f"--checkpoint {EARLIER}")


def _as_saved(folder: Path) -> None:
    """Give the model-states file's size and checksum to the checkpoint's marker, as if training
    itself had saved it."""
    manifest = json.loads((folder / MARKER).read_text())
    manifest["files"][STATES] = {"bytes": (folder / STATES).stat().st_size,
                                 "sha256": hashlib.sha256((folder / STATES).read_bytes()).hexdigest()}
    (folder / MARKER).write_text(json.dumps(manifest))


def test_non_finite_weights_with_a_matching_checksum_are_refused(tmp_path, copy):
    folder = copy / "checkpoints" / FINAL
    states = torch.load(folder / STATES, map_location="cpu", weights_only=False)
    name = next(k for k, v in states["module"].items() if v.is_floating_point())
    states["module"][name].view(-1)[:2] = float("nan")  # 8 bytes of NaN
    torch.save(states, folder / STATES)
    _as_saved(folder)

    res = predict(copy, tmp_path / "out")
    refused(res, tmp_path / "out", str(folder / STATES), "non-finite", name)


class _Payload:
    """Unpickling it creates a file: what a model file from someone else could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_model_file_that_would_run_code_is_refused_without_running_it(tmp_path, copy):
    """A trained run may be a colleague's: predicting with it must not run what its files hold."""
    folder = copy / "checkpoints" / FINAL
    states = torch.load(folder / STATES, map_location="cpu", weights_only=False)
    ran = tmp_path / "ran"
    torch.save({**states, "extra": _Payload(ran)}, folder / STATES)
    _as_saved(folder)

    res = predict(copy, tmp_path / "out")
    refused(res, tmp_path / "out", str(folder / STATES), "could run code", "--checkpoint")
    assert not ran.exists()


def test_a_resume_from_a_file_that_would_run_code_refuses_without_running_it(tmp_path, tiny_config, copy):
    """DeepSpeed unpickles whatever a checkpoint holds: a colleague's planted object ran in the
    resumed run (and a resume that skipped such a file would restart from scratch)."""
    folder = copy / "checkpoints" / FINAL
    states = torch.load(folder / STATES, map_location="cpu", weights_only=False)
    ran = tmp_path / "ran"
    torch.save({**states, "extra": _Payload(ran)}, folder / STATES)
    _as_saved(folder)
    res = subprocess.run([sys.executable, str(REPO / "launch/train_local.py"), "--config", str(tiny_config),
                          f"run_dir={copy}", "train.pretrain_epochs=1", "train.joint_epochs=2"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "could run code" in res.stderr and "MASAN_TRUST_CHECKPOINT_OBJECTS=1" in res.stderr, res.stderr[-3000:]
    assert not ran.exists() and "Traceback" not in res.stderr
    assert not (copy / "checkpoints" / "step_000021").exists()


def test_a_run_saved_under_numpy_1_is_read_under_numpy_2(tmp_path, copy):
    """The RNG states a checkpoint holds pickle NumPy's arrays under its module names of the day."""
    folder = copy / "checkpoints" / FINAL
    with zipfile.ZipFile(folder / STATES) as z:
        files = {i: z.read(i) for i in z.infolist()}
    pkl = next(i for i in files if i.filename.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in files[pkl]  # as saved under NumPy 2
    files[pkl] = files[pkl].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(folder / STATES, "w", zipfile.ZIP_STORED) as z:
        for info, data in files.items():
            z.writestr(info, data)
    _as_saved(folder)

    res = predict(copy, tmp_path / "out")
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_truncated_newest_checkpoint_is_refused_not_replaced_by_an_older_one(tmp_path, copy):
    path = copy / "checkpoints" / FINAL / STATES
    os.truncate(path, path.stat().st_size // 2)
    res = predict(copy, tmp_path / "out")
    refused(res, tmp_path / "out", str(copy / "checkpoints" / FINAL), STATES, "truncated",
            f"--checkpoint {EARLIER}")

    res = predict(copy, tmp_path / "out", "--checkpoint", EARLIER)  # the older one, knowingly
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({EARLIER}, NOT the final checkpoint: step 7 of 14" in res.stdout, res.stdout
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_a_deleted_newest_checkpoint_is_refused(tmp_path, copy):
    shutil.rmtree(copy / "checkpoints" / FINAL)
    res = predict(copy, tmp_path / "out")
    refused(res, tmp_path / "out", str(copy / "checkpoints" / FINAL), "does not exist", str(copy / "DONE"),
            f"--checkpoint {EARLIER}")
    # without DONE the pointer still names the deleted one
    (copy / "DONE").unlink()
    res = predict(copy, tmp_path / "out", "--allow-unfinished")
    refused(res, tmp_path / "out", str(copy / "checkpoints" / FINAL), str(copy / "checkpoints" / POINTER))


# ---------------------------------------------------------------------- an unfinished run


@pytest.mark.parametrize("how", ["STOP", "max_steps"])
def test_an_unfinished_run_is_refused_unless_allowed_and_the_step_is_named(tmp_path, tiny_config, how):
    stopped = tmp_path / "stopped"
    if how == "STOP":
        stopped.mkdir()
        (stopped / "STOP").touch()  # stops after the first step and saves
        _train(tiny_config, stopped)
        step = 1
    else:
        _train(tiny_config, stopped, "train.max_steps=2")  # writes DONE, but before its epochs
        step = 2
    res = predict(stopped, tmp_path / "out")
    refused(res, tmp_path / "out", str(stopped), "--allow-unfinished")

    res = predict(stopped, tmp_path / "out", "--allow-unfinished")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"UNFINISHED run, step {step} of 14" in res.stderr and f"step_{step:06d}" in res.stdout, res.stderr


# ---------------------------------------------------------------------- where and how it writes


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root.parent)): f"{stat.S_IMODE(p.stat().st_mode) & 0o777:03o}"
            for p in [root, *sorted(root.rglob("*"))]}


@pytest.mark.parametrize("closed, existing, file_mode, dir_mode", [(0o700, False, "600", "700"),
                                                                    (0o750, True, "640", "750")])
def test_output_is_no_more_open_than_the_store_and_the_run(tmp_path, copy, tiny_store, closed, existing, file_mode,
                                                          dir_mode):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store.zarr"))
    store.chmod(closed)
    copy.chmod(closed)
    out = tmp_path / "results"
    if existing:
        out.mkdir()
        out.chmod(0o755)
    old = os.umask(0o022)  # a usual umask: without the fix, 755 folders and 644 files
    try:
        res = predict(copy, out / "external" if not existing else out, "--store", str(store))
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-3000:]
    modes = _modes(out)
    files = {k: v for k, v in modes.items() if Path(k).suffix}
    assert sorted(Path(k).name for k in files) == ["metrics.json", "predictions.csv", "region_weights.npy"]
    assert set(files.values()) == {file_mode}, modes
    if not existing:  # the folders predict created
        assert {v for k, v in modes.items() if not Path(k).suffix} == {dir_mode}, modes


@pytest.fixture
def no_model(monkeypatch):
    """masan.predict with a model load that fails the test: what is refused is refused before it."""
    import masan.predict as P

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(P, "load_trained_model", load)
    return P


def test_out_inside_a_store_or_a_run_or_naming_a_file_is_refused_before_loading(tmp_path, run, tiny_store,
                                                                               no_model, capsys):
    P = no_model
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me\n")
    store_before = sorted(p.name for p in tiny_store.iterdir())
    cases = [(tiny_store / "predictions", f"inside the cohort store {tiny_store}"),
             (tiny_store, f"is the cohort store {tiny_store}"),
             (run, f"is the training run directory {run}"),
             (run / "external", f"inside the training run directory {run}"),
             (existing, "is an existing file")]
    for out, text in cases:
        assert P.main([str(run), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert text in err and f"--out {run.parent / 'run_predictions_test'}" in err, err
    assert existing.read_text() == "keep me\n"
    assert sorted(p.name for p in tiny_store.iterdir()) == store_before


@pytest.mark.parametrize("device, text", [
    ("banana", "argument --device: 'banana' is not a torch device; use cpu, cuda or cuda:N"),
    (f"cuda:{torch.cuda.device_count()}", f"this machine has {torch.cuda.device_count()} usable CUDA device(s)"),
])
def test_a_device_this_machine_lacks_is_a_usage_error(tmp_path, run, device, text, capsys):
    import masan.predict as P

    with pytest.raises(SystemExit) as exit_:
        P.main([str(run), "--out", str(tmp_path / "out"), "--device", device])
    assert exit_.value.code == 2 and text in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_name_that_is_not_there_lists_the_ones_that_are(tmp_path, run):
    """Not "the previous intact checkpoint, a less trained model": a mistyped name is newer than
    the final one as often as older."""
    res = predict(run, tmp_path / "out", "--checkpoint", "step_000999")
    refused(res, tmp_path / "out", f"--checkpoint step_000999: {run / 'checkpoints'} has no checkpoint of that name; "
            f"its complete ones: {EARLIER}, {FINAL} (the newest: {FINAL})")


def test_an_out_that_cannot_be_made_is_refused_before_loading(tmp_path, run, no_model, capsys):
    """/proc passes the os.access check (as root) but no folder can be made in it."""
    if not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    assert no_model.main([str(run), "--out", "/proc/masan_predictions"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out /proc/masan_predictions" in err, err


def test_a_failed_write_after_inference_is_one_line_naming_the_folder(tmp_path, run, monkeypatch, capsys):
    import errno

    import masan.predict as P

    def full(preds, out, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out) / "predictions.csv"))

    monkeypatch.setattr(P, "write_predictions", full)
    assert P.main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'out'}" in err and "no space left on the device" in err, err


# ---------------------------------------------------------------------- which subjects


def test_an_empty_part_is_refused_before_loading(tmp_path, run, no_model, capsys):
    """tiny.yaml trains without a validation part (split.val_fraction 0)."""
    assert no_model.main([str(run), "--split", "val", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{run} has no val part (split.val_fraction=0): use --split test (or train)" in err, err
    assert not (tmp_path / "out").exists()


def _cohort(root: Path, classes: tuple[str, ...], n_per_class: int | dict[str, int], frames: int = 6) -> Path:
    """A phantom cohort of the tiny store's geometry (tests/conftest.py), other scans (seed)."""
    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    bids = synthesize_cohort(root / "bids", n_per_class=n_per_class, classes=classes, frames=frames, seed=9)
    report = convert_cohort(discover_bids(bids), root / "other.zarr", ConvertOptions(patch_grid=(2, 2, 2)),
                            classes=classes, progress=False)
    assert not report.failed, report.failed
    return root / "other.zarr"


def test_a_store_under_other_class_names_gets_a_fix_predict_can_use(tmp_path, run, no_model, capsys):
    store = _cohort(tmp_path, ("CN", "Dementia"), 1)
    assert no_model.main([str(run), "--store", str(store), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "data_tools/to_zarr.py" in err and "--classes NC AD --label-map CN=NC,Dementia=AD" in err, err
    assert "data.classes" not in err and err.count("\n") == 1, err  # a trained run's config is not to be fixed


def test_the_runs_own_training_subjects_are_named_and_not_a_test_accuracy(tmp_path, run, tiny_store, capsys):
    import masan.predict as P

    train = json.loads((run / "split.json").read_text())["train"]
    assert P.main([str(run), "--store", str(tiny_store), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert (f"warning: {len(train)} of the 10 subjects of {tiny_store} are in {run}'s training ({len(train)}) or "
            "validation (0) part") in err, err
    assert "not a test accuracy" in out, out


def test_another_cohort_names_the_classes_left_out_and_not_its_own_ids(tmp_path, run, capsys):
    """Its sub-00N are other scans than the run's sub-00N: not training subjects."""
    import masan.predict as P

    store = _cohort(tmp_path, ("NC", "EMCI", "AD"), 2)
    train = json.loads((run / "split.json").read_text())["train"]
    assert {"sub-001", "sub-003", "sub-004", "sub-006"} & set(train)  # the ids the predicted subjects have
    assert P.main([str(run), "--store", str(store), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: 2 subject(s) of {store} left out, of classes {run} does not predict (EMCI 2; " in err, err
    assert "training" not in err and "not a test accuracy" not in out, (out, err)
    assert "4 subjects of" in out, out


def test_longer_runs_of_another_store_are_cut_to_the_frames_the_model_was_built_for(tmp_path, tiny_config, capsys):
    """A run trained with data.fmri_frames: null (all 6 frames of every run); another store's
    10-frame runs feed their first 6, as the docs promise, not all 10 into a 6-frame model."""
    import masan.predict as P

    run = tmp_path / "run"
    _train(tiny_config, run, "data.fmri_frames=null", "model.fmri_frames=null")
    assert "  fmri_frames: null" in (run / "config.yaml").read_text()
    store = _cohort(tmp_path, ("NC", "AD"), 2, frames=10)
    assert P.main([str(run), "--store", str(store), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert "4 subjects of" in capsys.readouterr().out


def test_the_summary_names_the_runs_positive_class(tmp_path, copy, capsys):
    import masan.predict as P

    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("positive_class: AD", "positive_class: NC"))
    assert "positive_class: NC" in config.read_text()
    assert P.main([str(copy), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "NC-vs-rest accuracy" in out and "AD-vs-rest" not in out, out


def test_a_cohort_without_the_positive_class_gets_null_recall_and_a_note(tmp_path, run, capsys):
    """Every AD subject found and none missed is no recall of 0: undefined, null (as the AUC)."""
    import masan.predict as P

    store = _cohort(tmp_path, ("NC", "AD"), {"NC": 3, "AD": 0})
    assert P.main([str(run), "--store", str(store), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["recall"] is None and metrics["f1"] is None and metrics["auc"] is None
    assert metrics["per_class"]["AD"]["recall"] is None and metrics["per_class"]["AD"]["support"] == 0
    called = metrics["confusion_matrix"][0][1]
    assert metrics["precision"] == (0.0 if called else None)
    assert "note: no AD subject among the 3 with a diagnosis, so " in err and "null in metrics.json, not 0" in err


def test_a_subject_whose_output_is_not_finite_is_named_not_called_the_first_class():
    """A NaN row of probabilities would be called class 0 (arg-max of NaN) and written as a
    diagnosis: predict refuses, naming the subject (the model here is a stand-in that passes its
    input's mean through, as a network passes on a non-finite voxel)."""
    from masan.config import ConfigError
    from masan.inference import NonFiniteOutput, check_finite, predict

    class MeanOfInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

        def forward(self, t1=None, fmri=None):
            return {"logits": t1.mean(dim=(1, 2, 3, 4))[:, None] * self.scale}

    t1 = torch.zeros(3, 1, 2, 2, 2)
    t1[1, 0, 0, 0, 0] = float("inf")
    batches = [{"t1": t1[i:i + 1], "label": torch.tensor([0]), "index": torch.tensor([i])} for i in range(3)]
    subjects = ["sub-a", "sub-b", "sub-c"]
    with pytest.raises(NonFiniteOutput, match=r"not finite for subject\(s\) sub-b \(1 of 3\): ") as e:
        check_finite(predict(MeanOfInput(), batches, "cpu", subjects=subjects))  # on every rank's merged rows
    assert isinstance(e.value, ConfigError), "a restart cannot cure it: launchers exit 2"
    fine = check_finite(predict(MeanOfInput(), batches[:1] + batches[2:], "cpu", subjects=subjects))
    assert fine.subjects == ["sub-a", "sub-c"]


def test_a_full_disk_under_out_leaves_the_earlier_predictions_whole(tmp_path, run, tiny_store):
    """Room for the new predictions.csv, not for the rest: it replaced the old one, beside the
    old metrics.json and region weights, and nothing said so."""
    sizes = tmp_path / "sizes"
    assert predict(run, sizes, "--store", str(tiny_store)).returncode == 0
    pages = -(-(sizes / "predictions.csv").stat().st_size // 4096)  # tmpfs takes whole pages
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "pred"
        assert predict(run, out).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert sorted(before) == ["metrics.json", "predictions.csv", "region_weights.npy"]
        fill(disk, pages * 4096)
        res = predict(run, out, "--store", str(tiny_store))
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert "no space left on the device" in res.stderr and "as they were" in res.stderr, res.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


def test_a_stop_while_predicting_is_one_line(tmp_path, run, monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback, and SIGTERM ended it without a word."""
    from masan import predict as tool

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "predict_subjects", interrupted)
    assert tool.main([str(run), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "run the same command again" in err and "Traceback" not in err
