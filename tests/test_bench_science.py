"""bench/science.py end to end at a tiny size: cohort, two variants, oracle, table, raw numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "science.py"
# 4 subjects per class on a 32^3 MNI152 grid, one epoch per phase, fp32 (bf16 is far slower on CPUs)
TINY = ["--per-class", "4", "--t1-shape", "32", "32", "32", "--fmri-shape", "8", "8", "8", "--frames", "8",
        "--repeats", "1", "--variants", "masan", "t1_only",
        "train.pretrain_epochs=1", "train.joint_epochs=1", "split.val_fraction=0", "train.precision=fp32"]
NUMBER = r"\d+\.\d+(?: ± \d+\.\d+)?"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_science", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_may_follow_the_variant_list():
    args = load_bench().parse_args(["--variants", "masan", "hfcn", "train.joint_epochs=2", "--repeats", "2"])
    assert args.variants == ["masan", "hfcn"] and args.overrides == ["train.joint_epochs=2"] and args.repeats == 2


def test_cells_are_mean_and_sample_std_over_repeats():
    cell = load_bench().cell
    assert cell([0.5, 0.7]) == "0.60 ± 0.14"
    assert cell([3, None], 1) == "3.0"
    assert cell([None]) == "-"


def test_one_benchmark_per_work_dir(tmp_path, capsys):
    bench = load_bench()
    held = bench.lock_work(tmp_path)
    assert held is not None and bench.lock_work(tmp_path) is None
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    held.close()
    assert bench.lock_work(tmp_path) is not None


def test_a_change_of_the_training_code_is_not_scored_with_old_runs(tmp_path, monkeypatch):
    """The run stamp holds a fingerprint of masan/ and launch/: a fix that leaves the config as it
    was (e.g. which parameters a gradient reaches) retrains; documentation does not."""
    bench = load_bench()
    (tmp_path / "masan" / "model").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    code = tmp_path / "masan" / "model" / "fusion.py"
    code.write_text("scale_after_fusion = True\n")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    before = bench.code_fingerprint()
    (tmp_path / "docs" / "notes.md").write_text("measured\n")
    assert bench.code_fingerprint() == before
    code.write_text("scale_after_fusion = False\n")
    assert bench.code_fingerprint() != before


@pytest.mark.slow
def test_science_bench_end_to_end(tmp_path):
    work = tmp_path / "science"
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), *TINY]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "synth_cohort.py --anatomy mni152" in res.stdout and "to_zarr.py" in res.stdout
    table = (work / "science.md").read_text()
    for row in ("oracle", "masan", "t1_only"):
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {row} |")), None)
        assert line is not None, table
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(re.fullmatch(NUMBER, c) for c in cells[1:5]), line  # 4-class acc, AD acc, precision, recall
        assert cells[8] == "1/1", line  # runs ok
    assert "| masan_add |" not in table and "Chance: always-" in table
    raw = json.loads((work / "science.json").read_text())
    assert set(raw["runs"]) == {"oracle", "masan", "t1_only"}
    masan = raw["runs"]["masan"][0]
    assert masan["status"] == "trained" and masan["n"] > 0 and 1 <= masan["best_rank"] <= 64
    assert set(masan["rank_by_structure"]) == set(raw["planted_regions"]["by_structure"])

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "reusing the cohort" in again.stdout and again.stdout.count("(cached)") == 2
    assert json.loads((work / "science.json").read_text())["runs"]["masan"][0]["accuracy"] == masan["accuracy"]
