#!/usr/bin/env python
"""Write a phantom BIDS cohort (NIfTI) with a planted group effect, for demos, tests and benchmarks.

Examples:
  python data_tools/synth_cohort.py --out demo/bids                       # 4 x 12 subjects, small
  python data_tools/synth_cohort.py --out /scratch/bids --full --per-class 5   # 240x256x176 + 60x64x44 x 976
  python data_tools/to_zarr.py --bids demo/bids --out demo/cohort.zarr

The effect: inside one ball (--center, --radius in fractions of the volume), T1 intensity and
fMRI fluctuation amplitude drop by severity x strength (severity NC 0, EMCI 1/3, LMCI 2/3,
AD 1). The ball and the grid cells holding it are written to planted_effect.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masan.config import ModelConfig
from masan.data.synth import DEFAULT_CLASSES, DEFAULT_SEVERITY, PlantedEffect, synthesize_cohort

FULL_FRAMES = ModelConfig().fmri_frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="BIDS folder to write")
    p.add_argument("--per-class", type=int, default=12, help="subjects per class (default %(default)s)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    p.add_argument("--severity", nargs="+", type=float, default=None, metavar="S",
                   help="one severity in [0, 1] per class (default: NC 0, EMCI 1/3, LMCI 2/3, AD 1)")
    p.add_argument("--t1-shape", nargs=3, type=int, default=[32, 32, 32])
    p.add_argument("--fmri-shape", nargs=3, type=int, default=[16, 16, 16])
    p.add_argument("--frames", type=int, default=8, help="fMRI frames per run")
    p.add_argument("--full", action="store_true",
                   help=f"the paper's sizes: T1 {ModelConfig().t1_shape}, fMRI {ModelConfig().fmri_shape} x {FULL_FRAMES}")
    p.add_argument("--center", nargs=3, type=float, default=list(PlantedEffect.center),
                   help="planted ball centre, fractions of X Y Z (default %(default)s: cell 1,1,1 of 4x4x4)")
    p.add_argument("--radius", type=float, default=PlantedEffect.radius, help="ball radius, fraction of each axis")
    p.add_argument("--strength", type=float, default=PlantedEffect.strength, help="effect at severity 1")
    p.add_argument("--tr", type=float, default=2.0, help="repetition time in seconds (header)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.full:
        args.t1_shape, args.fmri_shape, args.frames = ModelConfig().t1_shape, ModelConfig().fmri_shape, FULL_FRAMES
    severity = None
    if args.severity is not None:
        if len(args.severity) != len(args.classes):
            p.error(f"--severity needs one value per class ({len(args.classes)})")
        severity = dict(zip(args.classes, args.severity))
    elif not set(args.classes) <= set(DEFAULT_SEVERITY):
        p.error(f"classes other than {list(DEFAULT_SEVERITY)} need --severity")
    out = synthesize_cohort(args.out, args.per_class, tuple(args.t1_shape), tuple(args.fmri_shape), args.frames,
                            (tuple(args.center), args.radius), args.strength, tuple(args.classes), args.seed,
                            severity, args.tr, progress=True)
    print(f"wrote {args.per_class * len(args.classes)} subjects to {out}; convert with: "
          f"python data_tools/to_zarr.py --bids {out} --out STORE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
