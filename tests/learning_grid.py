"""Measure the learning tests over a grid of seeds and CPU kernels; their thresholds come from its worst case.

A learning test must pass on any x86 CPU. ATen's kernels (``ATEN_CPU_CAPABILITY``), oneDNN's
(``ONEDNN_MAX_CPU_ISA``: it picks convolution kernels by ISA on its own) and the thread count change
the summation order, and a short run on a few subjects amplifies that. This runs the learning tests
of tests/test_train_learns.py once per (setting, seed), each in a fresh interpreter (the variables
are read when torch loads), and prints each test's metrics per setting: worst / best over the seeds,
and how many points passed. Seed ``i`` sets both the training and the cohort seed.

    python tests/learning_grid.py                           # 7 settings x 5 seeds, ~1 min a point on 2 cores
    python tests/learning_grid.py --seeds 0 1 --settings native avx2 --out grid.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "threads-1": {"OMP_NUM_THREADS": "1"},
    "threads-2": {"OMP_NUM_THREADS": "2"},
}
METRICS = {"test_short_run_learns_the_planted_effect": "binary_accuracy",
           "test_model_learns_the_realistic_cohort": "auc"}
"""The metric each test asserts on."""


def run_point(setting: str, seed: int, log: Path) -> bool:
    """One pytest process of the learning tests at ``setting`` and ``seed``; did every test pass?"""
    env = {**os.environ, **SETTINGS[setting], "MASAN_LEARN_SEED": str(seed), "MASAN_LEARN_COHORT_SEED": str(seed),
           "MASAN_LEARN_LOG": str(log), "MASAN_GRID_SETTING": setting}
    res = subprocess.run([sys.executable, "-m", "pytest", "tests/test_train_learns.py", "-k", "learns_the", "-q",
                          "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    return res.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=[s for s in SETTINGS if s != "threads-2"],
                    help="kernel settings (default: all but threads-2, which is native on a 2-core machine)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, help="JSON-lines file of every point's metrics (default: a temporary file)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkstemp(suffix=".jsonl")[1])
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for setting in args.settings:
        for seed in args.seeds:
            start, before = time.time(), out.read_text().count("\n") if out.exists() else 0
            ok = run_point(setting, seed, out)
            failed[setting] += not ok
            points = [json.loads(line) for line in (out.read_text().splitlines()[before:] if out.exists() else [])]
            said = []
            for point in points:
                name = point["test"].split("::")[-1]
                rows[(name, setting)].append(point[METRICS[name]])
                said.append(f"{name}: {METRICS[name]} {point[METRICS[name]]:.3f}")
            verdict = "pass" if ok else "FAIL"
            print(f"{setting} seed {seed}: {verdict} in {time.time() - start:.0f} s; " + "; ".join(said), flush=True)
    print("\n| test | metric | setting | worst | best | points | failed runs |\n|---|---|---|---|---|---|---|")
    for (name, setting), values in sorted(rows.items()):
        print(f"| {name} | {METRICS[name]} | {setting} | {min(values):.3f} | {max(values):.3f} | {len(values)} "
              f"| {failed[setting]} |")
    print(f"\npoints: {out}")


if __name__ == "__main__":
    main()
