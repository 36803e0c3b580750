"""The whole repository passes ``ruff check`` (rules in pyproject.toml's [tool.ruff]), so CI fails on lint."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    assert importlib.util.find_spec("ruff") is not None, (
        "ruff is not installed in this Python; install the test extras: pip install -e '.[test]' (bash run.sh setup)")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (
        f"ruff check found problems (fix them, or `ruff check --fix` for the [*] ones; a `# noqa: CODE - why` "
        f"only where the rule is wrong for that line):\n{res.stdout}{res.stderr}")
