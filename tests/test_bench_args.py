"""The benches' command lines: a bad argument is a usage error (exit 2, a message naming it)
before any work, never a traceback or a table of nonsense; bench.io leaves no temp dir behind
when terminated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness
from bench import io as bench_io
from bench import model as bench_model
from bench import train as bench_train
from masan.config import config_or_exit

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "hpc/configs/tiny.yaml")


def usage_error(main, argv: list[str], capsys) -> str:
    """``main(argv)`` exits 2 before any work; -> its stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--patches", "-1"], "argument --patches: must be at least 1, got -1"),
    (["--frames", "0"], "argument --frames: must be at least 1, got 0"),
    (["--subjects", "0"], "argument --subjects: must be at least 1, got 0"),
    (["--chunk-frames", "0"], "argument --chunk-frames: must be at least 1, got 0"),
    (["--shard-frames", "3"], "fmri_shard_frames (3) must be a multiple of fmri_chunk_frames (16)"),
    (["--shard-frames", "40", "--chunk-frames", "16"], "must be a multiple of"),
    (["--gzip-level", "15"], "argument --gzip-level: must be between 0 and 9, got 15"),
    (["--loader-workers", "-1"], "argument --loader-workers: must be at least 0, got -1"),
    (["--loader-passes", "0"], "argument --loader-passes: must be at least 1, got 0"),
    (["--t1-shape", "0", "8", "8"], "argument --t1-shape: must be at least 4, got 0"),
    (["--fmri-shape", "8", "1", "8"], "argument --fmri-shape: must be at least 2, got 1"),
    (["--codec", "nosuch"], "argument --codec: invalid choice: 'nosuch'"),
    (["--shuffle", "nosuch"], "argument --shuffle: invalid choice: 'nosuch'"),
    (["--device", "nosuch"], "argument --device: 'nosuch' is not a torch device"),
])
def test_io_bad_arguments(argv, message, capsys):
    assert message in usage_error(bench_io.main, argv, capsys)


def test_io_codecs_are_the_stores():
    assert {"lz4hc", "zstd"} <= set(bench_io.CODECS)
    assert bench_io.SHUFFLES == ("bitshuffle", "shuffle", "noshuffle")


def test_io_keep_and_against_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    err = usage_error(bench_io.main, ["--keep", str(f)], capsys)
    assert f"--keep {f} is a file, not a folder; give --keep a folder" in err
    below = usage_error(bench_io.main, ["--keep", str(f / "b")], capsys)  # was a NotADirectoryError at mkdir
    assert f"--keep {f / 'b'} lies below {f}, which is a file, not a folder; give --keep" in below
    err = usage_error(bench_io.main, ["--against", str(f)], capsys)
    assert f"--against: {f} is not a Zarr v3 cohort store" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [f]


def test_io_sigterm_removes_its_temp_dir(tmp_path):
    """A terminated bench.io (here while it synthesizes the cohort) removes its temp dir."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.io", "--subjects", "2", "--device", "cpu", "--loader-workers", "0"],
        cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        end = time.monotonic() + 60
        while not list(tmp_path.glob("masan-bench-io-*")) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert list(tmp_path.glob("masan-bench-io-*")), "no temp dir appeared"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--batch", "-1"], "argument --batch: must be at least 1, got -1"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
])
def test_model_bad_arguments(argv, message, capsys):
    assert message in usage_error(bench_model.main, ["--config", TINY, *argv], capsys)


def test_model_config_error_names_only_the_users_overrides(capsys):
    err = usage_error(bench_model.main, ["--device", "cpu", "--config", TINY, "nosuch.x=1"], capsys)
    assert "unknown config key(s) nosuch" in err and "(from the overrides nosuch.x=1)" in err
    assert "t1_shape" not in err  # the bench's own CPU shapes are not the user's
    err = usage_error(bench_model.main, ["--device", "cpu", "--config", str(REPO / "nosuch.yaml")], capsys)
    assert "does not exist" in err


def test_config_or_exit(capsys):
    cfg = config_or_exit(TINY, ["model.dropout=0.5"], ["model.dropout=0.1", "model.groups=2"])
    assert (cfg.model.dropout, cfg.model.groups) == (0.5, 2)  # the user's overrides win over the bench's
    with pytest.raises(SystemExit) as e:  # valid alone, not with the bench's settings
        config_or_exit(TINY, ["optim.lr=0.1"], ["model.nosuch=1"], "the CPU shapes")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"(--config {TINY} optim.lr=0.1, on the CPU shapes)" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "1"], "--steps must be at least 2: the figures are medians of the logged intervals after the first"),
    (["--steps", "0"], "--steps must be at least 2"),
    (["--steps", "-3"], "--steps must be at least 2"),
    (["--steps", "x"], "argument --steps: 'x' is not an integer"),
    (["--config", str(REPO / "nosuch.yaml")], "does not exist"),
    (["--config", str(REPO / "README.md")], "config file"),
])
def test_train_bad_arguments(argv, message, capsys):
    err = usage_error(bench_train.main, argv, capsys)
    assert message in err and bench_train.MARK not in err


def test_train_non_yaml_config(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("just some words\n")
    assert "must hold a mapping of sections" in usage_error(bench_train.main, ["--config", str(f)], capsys)


def test_train_logs_two_intervals_for_any_steps():
    """Every accepted --steps logs at least two intervals (the first is start-up, not counted);
    from 2 * LOG_EVERY on, the interval is LOG_EVERY steps."""
    for steps in range(bench_train.MIN_STEPS, 60):
        every = bench_train.log_every(steps)
        assert 1 <= every <= bench_train.LOG_EVERY and steps // every >= 2
    assert bench_train.log_every(2 * bench_train.LOG_EVERY) == bench_train.LOG_EVERY
    assert bench_train.log_every(30) == bench_train.LOG_EVERY


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--budget-s", "0"], "argument --budget-s: must be a finite number above 0, got 0"),
    (["--device", "cuda:7"], "argument --device: cuda:7: this machine has"),
])
def test_device_parser_bad_arguments(argv, message, capsys):
    ap = harness.device_parser("doc", 60.0)
    assert message in usage_error(ap.parse_args, argv, capsys)


@pytest.mark.parametrize(("module", "argv", "message"), [
    ("gpu_check", ["--ds-steps", "0"], "argument --ds-steps: must be at least 1, got 0"),
    ("gpu_check", ["--subjects", "7"], "argument --subjects: must be at least 8, got 7"),
    ("gpu_check", ["--set", "nosuch.x=1"], "unknown config key(s) nosuch"),
    ("profile_step", ["--top", "0"], "argument --top: must be at least 1, got 0"),
    ("profile_step", ["--set", "model.fusion=bogus"], "'bogus' is not one of"),
])
def test_the_gpu_slot_scripts_refuse_bad_arguments_before_any_work(module, argv, message, capsys):
    """The GPU slot's scripts: a slip costs a usage error, not minutes of device time."""
    import importlib

    main = importlib.import_module(f"bench.{module}").main
    err = usage_error(main, ["--tiny", *argv], capsys)
    assert message in err and "Traceback" not in err, err
    assert "model.t1_shape" not in err  # the --tiny settings are not shown as if the user had typed them
