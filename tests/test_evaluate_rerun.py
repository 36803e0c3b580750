"""A report folder holds one report: a rerun into the same --out replaces the report's own
earlier files (figures of runs no longer reported, figures after --no-figures) and no other
file; every file goes in atomically; a report being written, or stopped part way, is marked
INCOMPLETE, and Ctrl-C ends in one line (exit 130)."""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

import masan.evaluate.report as report
from masan.evaluate.__main__ import main
from masan.evaluate.plots import save_figure
from masan.evaluate.report_folder import INCOMPLETE_NAME, MANIFEST_NAME
from test_evaluate_report import make_run


@pytest.fixture
def root(tmp_path):
    for r in (0, 1):
        make_run(tmp_path / "runs", f"masan_r{r}", [], r, 2 + r)
        make_run(tmp_path / "runs", f"add_r{r}", ["model.fusion=add"], r, 3 + r)
    return tmp_path / "runs"


def files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_a_rerun_removes_the_earlier_reports_files_and_no_other(root, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--top-k", "3"]) == 0
    first = files(out)
    assert "figures/masan-fusion-add_region_ranking.png" in first and INCOMPLETE_NAME not in first
    assert sorted(json.loads((out / MANIFEST_NAME).read_text())) == [f for f in first if f != MANIFEST_NAME]
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "masan-fusion-add_region_map_mine.png").write_bytes(b"mine, named like the tool's")

    assert main([str(root / "masan_r0"), str(root / "masan_r1"), "--out", str(out), "--top-k", "3"]) == 0
    assert "Removed 2 file(s) of the earlier report" in capsys.readouterr().out
    now = files(out)
    assert not [f for f in now if f.startswith("figures/masan-fusion-add_region_ranking")]
    assert {"notes.txt", "figures/masan-fusion-add_region_map_mine.png", "figures/masan_region_ranking.png"} <= set(now)
    assert "MASAN (fusion=add)" not in (out / "table.md").read_text()

    assert main([str(root / "masan_r0"), "--out", str(out), "--no-figures"]) == 0  # no old figure beside the table
    assert files(out) == sorted([MANIFEST_NAME, "figures/masan-fusion-add_region_map_mine.png", "notes.txt",
                                 *report.REPORT_FILES.values()])
    (out / "figures" / "masan-fusion-add_region_map_mine.png").unlink()
    assert main([str(root / "masan_r0"), "--out", str(out), "--top-k", "3"]) == 0
    assert main([str(root / "masan_r0"), "--out", str(out), "--no-figures"]) == 0
    assert not (out / "figures").exists()  # emptied of the tool's files: no empty folder left


def test_ctrl_c_leaves_the_report_marked_incomplete_and_a_rerun_completes_it(root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert main([str(root), "--out", str(out), "--top-k", "3"]) == 0
    capsys.readouterr()

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(report, "prediction_rows", interrupted)  # stopped between runs.csv and predictions.csv
        assert main([str(root / "masan_r0"), "--out", str(out), "--no-figures"]) == 130
    err = capsys.readouterr().err
    assert err == (f"error: interrupted by SIGINT: the report in {out} is incomplete ({out / INCOMPLETE_NAME} marks "
                   "it): rerun the same command (the same --out) to complete it\n")
    assert (out / INCOMPLETE_NAME).is_file() and "Rerun the same command" in (out / INCOMPLETE_NAME).read_text()
    assert not list(out.glob(".*.tmp")) and (out / "figures" / "masan-fusion-add_region_ranking.png").is_file()
    assert main([str(root / "masan_r0"), "--out", str(out), "--no-figures"]) == 0  # the rerun cleans up both
    assert not (out / INCOMPLETE_NAME).exists() and not (out / "figures").exists()

    monkeypatch.setattr(report, "expand_run_dirs", interrupted)  # before anything is written
    assert main([str(root), "--out", str(tmp_path / "new")]) == 130
    assert "nothing was written to" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_figure_that_fails_half_way_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.png"
    path.write_bytes(b"the old figure")

    def half(self, target, **_kwargs):
        target.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(OSError):
        save_figure(Figure(), path)
    assert path.read_bytes() == b"the old figure" and [p.name for p in tmp_path.iterdir()] == ["f.png"]
