"""Every command a user may type, `python <folder>/<script>.py --help`, explains itself: run as a file from
any directory, not only as a module from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("launch", "data_tools", "bench", "experiments")
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in FOLDERS for p in (REPO / folder).glob("*.py")
                 if 'if __name__ == "__main__"' in p.read_text())


def test_the_entry_points_are_found():
    assert {"launch/submit.py", "data_tools/to_zarr.py", "bench/model.py", "experiments/science.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_as_a_file_from_anywhere(script, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{script} --help failed:\n{res.stderr[-2000:]}"
    assert res.stdout.startswith("usage:"), f"{script} --help printed no usage:\n{res.stdout[:500]}"
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
