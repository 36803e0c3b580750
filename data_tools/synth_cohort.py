#!/usr/bin/env python
"""Write a synthetic BIDS cohort (NIfTI) with a planted, graded group effect and its truth record.

Two anatomies:
  phantom  (default) ellipsoid heads; the effect sits in one ball (--center, --radius in
           fractions of the volume): T1 intensity and fMRI fluctuation amplitude drop by
           severity x strength.
  mni152   a validation cohort on the real MNI152 brain (nilearn's bundled template): grey-
           matter atrophy in named structures (--structures), fMRI amplitude and/or
           connectivity changes there (--fmri-effect), per-subject severity jitter, and the
           nuisance every real cohort has (gain, bias field, noise, misregistration).
           See docs/validation-cohort.md.
Severity: NC 0, EMCI 1/3, LMCI 2/3, AD 1 (--severity). The truth (where, how strong, each
subject's severity and nuisance) goes to planted_effect.json; to_zarr copies it into the
store, and masan.evaluate.oracle reads it back (planted masks, features, oracle classifier).

Examples:
  python data_tools/synth_cohort.py --out demo/bids                       # phantom, 4 x 12 subjects, small
  python data_tools/synth_cohort.py --out /scratch/bids --full --per-class 5   # 240x256x176 + 60x64x44 x 976
  python data_tools/synth_cohort.py --anatomy mni152 --out val/bids       # 4 x 16, T1 48x56x48, fMRI 12x14x12 x 16
  python data_tools/synth_cohort.py --anatomy mni152 --out val/bids --structures hippocampus entorhinal \\
      --fmri-effect connectivity --strength 0.5 0.8
  python data_tools/to_zarr.py --bids demo/bids --out demo/cohort.zarr
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masan.config import ModelConfig
from masan.data import anatomy
from masan.data.synth import (
    DEFAULT_CLASSES,
    DEFAULT_SEVERITY,
    PlantedEffect,
    add_effect_arguments,
    add_shape_arguments,
    synthesize_cohort,
)

FULL_FRAMES = ModelConfig().fmri_frames
# Defaults per anatomy: subjects per class, T1 shape, fMRI shape, frames.
DEFAULTS = {"phantom": (12, [32, 32, 32], [16, 16, 16], 8),
            "mni152": (16, [48, 56, 48], [12, 14, 12], 16)}
# Option -> the anatomy it belongs to (giving it with the other one is an error).
ANATOMY_ONLY = {"center": "phantom", "radius": "phantom", "structures": "mni152", "fmri_effect": "mni152",
                "severity_sd": "mni152", "partner": "mni152", "orientation": "mni152",
                "stages": "mni152"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="BIDS folder to write")
    p.add_argument("--anatomy", choices=["phantom", "mni152"], default="phantom",
                   help="phantom heads (default) or the MNI152 validation cohort")
    p.add_argument("--per-class", type=int, default=None,
                   help="subjects per class (default: phantom 12, mni152 16)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    p.add_argument("--severity", nargs="+", type=float, default=None, metavar="S",
                   help="one severity in [0, 1] per class (default: NC 0, EMCI 1/3, LMCI 2/3, AD 1)")
    add_shape_arguments(p, {"t1-shape": "phantom 32 32 32, mni152 48 56 48",
                            "fmri-shape": "phantom 16 16 16, mni152 12 14 12", "frames": "phantom 8, mni152 16"})
    p.add_argument("--full", action="store_true",
                   help=f"the paper's sizes: T1 {ModelConfig().t1_shape}, "
                   f"fMRI {ModelConfig().fmri_shape} x {FULL_FRAMES}")
    p.add_argument("--tr", type=float, default=2.0, help="repetition time in seconds (header)")
    p.add_argument("--seed", type=int, default=0)
    ph = p.add_argument_group("phantom")
    ph.add_argument("--center", nargs=3, type=float, default=None,
                    help=f"planted ball centre, fractions of X Y Z (default {list(PlantedEffect.center)}: "
                         "cell 1,1,1 of 4x4x4)")
    ph.add_argument("--radius", type=float, default=None,
                    help=f"ball radius, fraction of each axis (default {PlantedEffect.radius})")
    mn = p.add_argument_group("mni152")
    add_effect_arguments(p, mn)
    mn.add_argument("--fmri-effect", nargs="*", default=None, choices=list(anatomy.FMRI_EFFECTS),
                    help="planted fMRI effects: amplitude (fluctuations damped in the structures) and/or "
                         "connectivity (structures decoupled from the partner network); default both, "
                         "none given: T1 effect only")
    mn.add_argument("--severity-sd", type=float, default=None,
                    help="per-subject severity jitter, N(0, SD) clipped to [0, 1] (default 0.15)")
    mn.add_argument("--partner", default=None, choices=sorted(anatomy.STRUCTURES), metavar="NAME",
                    help="partner network for the connectivity effect (default: first of "
                         f"{', '.join(anatomy.PARTNER_CHOICES)} not planted)")
    mn.add_argument("--orientation", default=None,
                    help="voxel axis codes of the written files, e.g. RAS (default) or LAS")
    args = p.parse_args(argv)

    for name, owner in ANATOMY_ONLY.items():
        if getattr(args, name) is not None and args.anatomy != owner:
            p.error(f"--{name.replace('_', '-')} applies to --anatomy {owner} only")
    per_class, t1_shape, fmri_shape, frames = DEFAULTS[args.anatomy]
    per_class = args.per_class if args.per_class is not None else per_class
    t1_shape, fmri_shape = args.t1_shape or t1_shape, args.fmri_shape or fmri_shape
    frames = args.frames if args.frames is not None else frames
    if args.full:
        t1_shape, fmri_shape, frames = ModelConfig().t1_shape, ModelConfig().fmri_shape, FULL_FRAMES
    severity = None
    if args.severity is not None:
        if len(args.severity) != len(args.classes):
            p.error(f"--severity needs one value per class ({len(args.classes)})")
        severity = dict(zip(args.classes, args.severity))
    elif not set(args.classes) <= set(DEFAULT_SEVERITY):
        p.error(f"classes other than {list(DEFAULT_SEVERITY)} need --severity")
    if args.strength is not None and len(args.strength) > (1 if args.anatomy == "phantom" else 2):
        p.error("--strength takes one value (phantom) or one or two values T1 fMRI (mni152)")

    if args.anatomy == "phantom":
        center = tuple(args.center) if args.center is not None else PlantedEffect.center
        radius = args.radius if args.radius is not None else PlantedEffect.radius
        strength = args.strength[0] if args.strength else PlantedEffect.strength
        out = synthesize_cohort(args.out, per_class, tuple(t1_shape), tuple(fmri_shape), frames,
                                (center, radius), strength, tuple(args.classes), args.seed, severity, args.tr,
                                progress=True)
    else:
        strength = anatomy.DEFAULT_STRENGTH if not args.strength else \
            (args.strength[0] if len(args.strength) == 1 else tuple(args.strength))
        try:
            out = anatomy.synthesize_anatomy_cohort(
                args.out, per_class, tuple(t1_shape), tuple(fmri_shape), frames,
                structures=tuple(args.structures or ("hippocampus", "amygdala")),
                fmri_effect=tuple(args.fmri_effect) if args.fmri_effect is not None else anatomy.FMRI_EFFECTS,
                strength=strength, seed=args.seed, progress=True, classes=tuple(args.classes), severity=severity,
                severity_sd=0.15 if args.severity_sd is None else args.severity_sd, partner=args.partner,
                tr=args.tr, orientation=args.orientation or "RAS",
                stages=None if args.stages is None else {"t1": args.stages[:2], "fmri": args.stages[2:]})
        except (ValueError, RuntimeError) as e:
            p.error(str(e))
    print(f"wrote {per_class * len(args.classes)} subjects to {out}; convert with: "
          f"python data_tools/to_zarr.py --bids {out} --out STORE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
