#!/usr/bin/env python
"""The whole pipeline on this machine in a few minutes (CPU): the README's main command.

    python launch/demo.py                 # writes demo/, runs/demo/ and reports/demo/ under the current folder
    python launch/demo.py --root /tmp/x   # everything under /tmp/x

Steps, each printed as the command it runs, so you can run them yourself:
  1. synthesize a small cohort on real anatomy (the MNI152 template that nilearn ships, as BIDS
     NIfTI: 4 classes x 16 subjects, graded atrophy and fMRI changes planted in hippocampus and
     amygdala, with the nuisance of a real cohort; docs/validation-cohort.md), at the shapes
     of hpc/configs/demo.yaml
  2. convert it to the Zarr store           (data_tools/to_zarr.py)
  3. train through the launcher, locally     (launch/submit.py --local, hpc/configs/demo.yaml)
  4. evaluate                               (python -m masan.evaluate)
and prints where the metrics, figures and TensorBoard logs are. Running it again reuses what
is there: the cohort is kept, conversion skips unchanged subjects, a finished training run
is not retrained (an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from masan.argtypes import number, path
from masan.config import ConfigError, add_override_arguments, load_config
from masan.rundir import RunDir
from masan.synth.anatomy import ANATOMY

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "hpc" / "configs" / "demo.yaml"
PER_CLASS = 16


def run(cmd: list[str], what: str) -> float:
    """Run one step, echoing the command; exit with its code if it fails. Returns seconds."""
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    code = subprocess.call(cmd, cwd=REPO)
    if code != 0:
        print(f"demo: step '{what}' failed with exit code {code} (command above)", file=sys.stderr)
        sys.exit(code)
    return time.monotonic() - start


DEMO_MARK = ".made-by-masan-demo"
"""Written into the demo's cohort folder once it synthesized it: the demo replaces (with the run
and report made from it) only a cohort that carries it, never one a user made there (e.g. with
data_tools/synth_cohort.py, which writes planted_effect.json too)."""


def _stale_cohort(bids: Path, cfg, per_class: int) -> str | None:
    """What is wrong with an existing demo cohort for the demo config ``cfg`` and ``per_class``
    (None: fine or absent); a cohort the demo did not make ends the demo (it is never deleted)."""
    model, n_classes = cfg.model, len(cfg.data.classes)
    record = bids / "planted_effect.json"
    if not (bids / "participants.tsv").is_file():
        return None
    if not record.is_file():
        raise SystemExit(f"demo: {bids} holds a cohort the demo did not make (no planted_effect.json); the demo "
                         "replaces only its own: pass another --root, or move that folder away")
    why = _mismatch(json.loads(record.read_text()), bids, model, n_classes, per_class)
    if why and not (bids / DEMO_MARK).is_file():
        raise SystemExit(f"demo: {bids} holds {why}, not made by the demo (no {DEMO_MARK}: e.g. by "
                         "data_tools/synth_cohort.py, or an older demo); the demo replaces only its own cohort, with "
                         "the run and report made from it: pass another --root, or move that folder away")
    return why


def _mismatch(effect: dict, bids: Path, model, n_classes: int, per_class: int) -> str | None:
    """How a synthetic cohort (its planted_effect.json record ``effect``) differs from the one the
    demo makes, or None."""
    if effect.get("anatomy") != ANATOMY:
        return "a phantom cohort"
    want = {"t1": list(model.t1_shape), "fmri": list(model.fmri_shape)}
    got = {m: effect.get("grids", {}).get(m, {}).get("shape") for m in want}
    if got != want:
        return f"a cohort of other shapes ({got}; the demo needs {want})"
    with (bids / "participants.tsv").open() as f:
        subjects = sum(1 for _ in f) - 1
    if subjects != per_class * n_classes:
        return f"a cohort of {subjects} subjects (--per-class {per_class} makes {per_class * n_classes})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=path, default=Path.cwd(),
                   help="folder for demo/ (cohort), runs/demo/ (training) and reports/demo/ (evaluation); "
                        "default: the current folder")
    p.add_argument("--per-class", type=number(int, 4), default=PER_CLASS,
                   help="subjects per class, at least 4 for a 70/30 split with validation (default %(default)s)")
    p.add_argument("--ranks", type=number(int, 1), default=1,
                   help="local gloo ranks for training (default %(default)s)")
    add_override_arguments(p, "config overrides for training, e.g. train.joint_epochs=5 (keys: "
                              "masan/config/schema.py)")
    args = p.parse_intermixed_args(argv)

    root = args.root.resolve()
    bids, store, run_dir = root / "demo" / "bids", root / "demo" / "cohort.zarr", root / "runs" / "demo"
    report = root / "reports" / "demo"  # beside the run, not in it: the run's folder is the run's own
    py = sys.executable
    timings = {}
    try:  # refused now, not after a cohort was made and converted for them
        cfg = load_config(DEMO_CONFIG, args.overrides)
    except ConfigError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    model = cfg.model  # the cohort is made at the shapes the model expects
    stale = _stale_cohort(bids, cfg, args.per_class)
    if stale:  # e.g. the phantom cohort of an earlier version: its run is stale too
        print(f"\n== {bids} holds {stale}; replacing it, {store}, {run_dir} and {report} (all made by this demo)")
        for old in (bids, store, run_dir, report):
            shutil.rmtree(old, ignore_errors=True)
    if not (bids / "participants.tsv").is_file():
        timings["synthesize"] = run([py, "data_tools/synth_cohort.py", "--anatomy", ANATOMY, "--out", str(bids),
                                     "--per-class", str(args.per_class), "--classes", *cfg.data.classes,
                                     "--t1-shape", *map(str, model.t1_shape),
                                     "--fmri-shape", *map(str, model.fmri_shape), "--frames", str(model.fmri_frames)],
                                    "1. synthesize a cohort on the MNI152 brain")
        (bids / DEMO_MARK).write_text("this cohort was made by launch/demo.py, which may replace it\n")
    else:
        print(f"\n== 1. cohort already there: {bids}")
    timings["convert"] = run([py, "data_tools/to_zarr.py", "--bids", str(bids), "--out", str(store),
                              "--patch-grid", *map(str, model.patch_grid), "--no-progress"], "2. convert to Zarr")
    cache = root / "demo" / "cache"  # data.cache files while training (removed after), beside the cohort
    cache.mkdir(parents=True, exist_ok=True)
    timings["train"] = run([py, "launch/submit.py", "--local", "--nodes", str(args.ranks),
                            "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir),
                            f"data.store={store}", f"data.cache_dir={cache}", *args.overrides],
                           "3. train (local, through the launcher)")
    timings["evaluate"] = run([py, "-m", "masan.evaluate", str(run_dir), "--out", str(report)], "4. evaluate")

    rd = RunDir(run_dir)
    metrics = json.loads(rd.metrics.read_text())
    shown = {k: round(v, 3) for k, v in metrics.items() if isinstance(v, (int, float))}
    print("\n== done in " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"test metrics:      {shown}")
    print(f"metrics:           {rd.metrics}  and the table {report / 'table.md'}")
    print(f"predictions:       {rd.predictions}")
    print(f"figures:           {report / 'figures'}")
    board = Path(sys.executable).parent / "tensorboard"  # the venv's, active or not
    print(f"TensorBoard logs:  {rd.tb}   ({board if board.exists() else 'tensorboard'} --logdir {run_dir})")
    print("on a cluster:      python launch/submit.py --nodes 4 --gpus-per-node 8 --config hpc/configs/paper.yaml "
          "data.store=/scratch/$USER/adni.zarr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
