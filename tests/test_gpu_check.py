"""bench/gpu_check.py at CPU-sized shapes (--tiny): every section prints its row, through the
same code as on the GPU, importing only what the GPU machine has or gets from .whl/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs the bench tools end to end

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("matplotlib", "nilearn", "pandas", "PIL")
"""Packages neither installed on the GPU machine nor shipped in .whl/: the check must not import them."""
BLOCKER = """
import sys
from importlib.machinery import PathFinder

class _Absent(PathFinder):  # the path finder, blind to the absent packages (find_spec gives None, as there)
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [_Absent if f is PathFinder else f for f in sys.meta_path]
"""


def test_tiny_check_prints_every_section(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(absent=set(ABSENT_ON_GPU_MACHINE)))
    # only the repository and the blocker on the path, as on the GPU machine (PYTHONPATH=/tmp/site:$PWD)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--tiny",
                          "--work", str(tmp_path / "work")], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, check=False)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    rows = [line.split() for line in out.splitlines()]
    sections = {r[0] for r in rows if r}
    assert {"masan", "hfcn", "loader", "deepspeed", "compile"} <= sections, out
    assert "error" not in out and "skipped" not in out and "out of memory" not in out, out
    for r in rows:
        if r and r[0] in ("masan", "hfcn", "compile"):
            assert float(r[-3]) > 0 and float(r[-2]) > 0, r  # ms/sample and peak GiB were measured
    loader = [line for line in out.splitlines() if line.startswith("loader")]
    assert [line.split()[1] for line in loader] == ["cache=none", "cache=host", "cache=device"]
    ds = next(line for line in out.splitlines() if line.startswith("deepspeed"))
    assert "data wait" in ds and "% median" in ds, ds
    assert out.rstrip().splitlines()[-1].startswith("gpu_check done")


def test_tiny_profile_prints_every_variant_and_the_top_operators(tmp_path):
    """``python -m bench.profile_step`` (issue 9's profile of one step) runs through on the CPU, with only
    what the GPU machine has: a time per modality and per variant, then the operator tables."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(absent=set(ABSENT_ON_GPU_MACHINE)))
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", PYTHONUNBUFFERED="1")
    # the budget is the GPU run's guard; here every row must run, however loaded the machine
    res = subprocess.run([sys.executable, "-m", "bench.profile_step", "--tiny", "--budget-s", "800",
                          "--engines", "eager,compiled+channels_last"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=850, check=False)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    from bench.profile_step import VARIANTS

    rows = [re.split(r"\s{2,}", line) for line in out.splitlines() if line.startswith(("split", "variant", "engine "))]
    split_variant = [r for r in rows if r[0] != "engine"]
    assert len(split_variant) == 3 + len(VARIANTS), out
    assert "error" not in out and "skipped" not in out, out
    assert all(float(r[2]) > 0 for r in split_variant), rows  # ms/sample measured
    assert "aten::convolution_backward" in out and "by input shape" in out, out
    assert re.search(r"^layout: \d+ operator/shape pairs write NCDHW from channels-last", out, re.M), out
    # the step inside the DeepSpeed engine, eager and compiled with channels-last activations
    # (DeepSpeed broadcasts parameters as bytes: channels-last weights failed there): as the
    # loop runs it, then split
    engine = {r[1]: r for r in rows if r[0] == "engine"}
    for name in ("engine", "engine, torch.compile, channels_last"):
        assert float(engine[f"{name}: as the loop (loss read back every step)"][2]) > 0, out
        assert "forward" in engine[f"{name}: split"][-1] and "step" in engine[f"{name}: split"][-1], out
    assert "the optimizer step's operators by host time" in out, out


@pytest.mark.parametrize("module, known", [("bench.gpu_check", "deepspeed"), ("bench.profile_step", "engine")])
def test_a_misspelt_section_is_refused_before_anything_runs(module, known):
    """A section name that matches none would skip its section silently and spend the GPU call
    (device time is scarce) measuring nothing."""
    res = subprocess.run([sys.executable, "-m", module, "--sections", f"{known}d"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120, check=False)
    assert res.returncode == 2 and f"unknown section(s) ['{known}d']; choose from" in res.stderr, res.stderr
