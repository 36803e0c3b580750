#!/usr/bin/env python
"""Training throughput and peak memory of the demo config, side by side in one run.

Trains ``hpc/configs/demo.yaml`` (or --config) through ``launch/train_local.py`` for
``--steps`` optimizer steps per variant (1 and 2 gloo processes; fp32 and bf16) on a phantom
cohort synthesized and converted once, and prints a table:

    variant | samples/s (median of the logged train/samples_per_s after warm-up) | ratio to the first
    variant | data wait (median of the logged train/data_wait_frac: the largest share of a logging
    interval any rank waited for its next batch) | peak RSS per rank (MiB)

Peak RSS is the largest maximum resident set of any rank process (getrusage of the waited-for
children). Example::

    python -m bench.train --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from masan.argtypes import number
from masan.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
MARK = "PEAK_RSS_KIB"
MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           f"print('{MARK}', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
"""Runs one variant and reports the largest RSS of its processes (ranks included: all waited for)."""
LOG_EVERY = 5
"""The logging interval (``log.every_steps``) the figures are medians over, shortened for a
short run so that it still logs an interval after the first (start-up, not counted)."""
MIN_STEPS = 2
"""The fewest --steps giving a figure: one interval of start-up, one counted (each a single step)."""
VARIANTS = (("1 proc fp32", 1, "fp32"), ("2 proc fp32", 2, "fp32"), ("1 proc bf16", 1, "bf16"),
            ("2 proc bf16", 2, "bf16"))


def log_every(steps: int) -> int:
    """``log.every_steps`` for a run of ``steps``: :data:`LOG_EVERY`, or less so that at least
    two intervals are logged (``steps // 2``; the first holds start-up and is not counted)."""
    return max(1, min(LOG_EVERY, steps // 2))


def make_store(root: Path, cfg: RunConfig) -> Path:
    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    m = cfg.model
    classes = tuple(cfg.data.classes)
    bids = synthesize_cohort(root / "bids", n_per_class=12, classes=classes, t1_shape=tuple(m.t1_shape),
                             fmri_shape=tuple(m.fmri_shape), frames=m.fmri_frames)
    store = root / "cohort.zarr"
    convert_cohort(discover_bids(bids), store, ConvertOptions(patch_grid=tuple(m.patch_grid)), classes=classes,
                   progress=False)
    return store


def logged_median(run_dir: Path, tag: str) -> float:
    """Median of a logged scalar (``train/<tag>``) over the logging intervals after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from masan.rundir import RunDir

    acc = EventAccumulator(str(RunDir(run_dir).tb), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars(f"train/{tag}")][1:]  # first window holds start-up
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "hpc/configs/demo.yaml"))
    ap.add_argument("--steps", type=number(int), default=30,
                    help=f"optimizer steps per variant (at least {MIN_STEPS}; logged every {LOG_EVERY} steps, "
                         f"every steps // 2 below {2 * LOG_EVERY})")
    args = ap.parse_args(argv)
    if args.steps < MIN_STEPS:
        ap.error(f"--steps must be at least {MIN_STEPS}: the figures are medians of the logged intervals after "
                 f"the first (which holds the start-up), so a variant must log two; got {args.steps}")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        ap.error(str(e))
    every = log_every(args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = make_store(root, cfg)
        for name, nproc, precision in VARIANTS:
            run = root / name.replace(" ", "_")
            res = subprocess.run(
                [sys.executable, "-c", MEASURE, sys.executable, str(REPO / "launch/train_local.py"),
                 "--config", args.config, "--nproc", str(nproc),
                 f"run_dir={run}", f"data.store={store}", f"train.precision={precision}",
                 f"train.max_steps={args.steps}", f"log.every_steps={every}", "log.tensorboard=true",
                 "log.eval_every_epochs=0",
                 "checkpoint.every_steps=0", "checkpoint.every_minutes=0"],
                capture_output=True, text=True, check=False)
            if res.returncode != 0:  # its error, without the RSS line meant for this script
                print("".join(line for line in res.stderr.splitlines(keepends=True)
                              if not line.startswith(MARK))[-3000:], file=sys.stderr)
                return 1
            peak_kib = int(res.stderr.rsplit(MARK, 1)[1].split()[0])
            rows.append((name, logged_median(run, "samples_per_s"), logged_median(run, "data_wait_frac"),
                         peak_kib / 1024))
    base = rows[0][1]
    print(f"{args.steps} steps per variant, logged every {every}; medians of the intervals after the first")
    print(f"{'variant':<14} {'samples/s':>10} {'ratio':>6} {'data wait':>10} {'peak RSS MiB':>13}")
    for name, r, wait, rss in rows:
        print(f"{name:<14} {r:>10.2f} {r / base:>6.2f} {100 * wait:>9.1f}% {rss:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
