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
           --preset easy (default): 4 x 16 subjects, a strong effect, small misregistration.
           --preset adni-like: as hard as ADNI: the paper's class proportions 64/34/36/72
           NC/EMCI/LMCI/AD scaled to --subjects (default 96: 30/16/17/33), one severity per
           modality drawn independently, effect sizes tuned so the oracle scores as a
           hippocampal-volume classifier does on ADNI, fMRI effect in connectivity only,
           48 frames, a smooth warp per subject (--warp-rms) and unregistered head
           placements (--motion; the fMRI run a little off the T1).
           See docs/validation-cohort.md (with the measured oracle accuracies).
Severity: NC 0, EMCI 1/3, LMCI 2/3, AD 1 (--severity). The truth (where, how strong, each
subject's severity and nuisance) goes to planted_effect.json; to_zarr copies it into the
store, and masan.evaluate.oracle reads it back (planted masks, features, oracle classifier).

Examples:
  python data_tools/synth_cohort.py --out demo/bids                       # phantom, 4 x 12 subjects, small
  python data_tools/synth_cohort.py --out /scratch/bids --full --per-class 5   # 240x256x176 + 60x64x44 x 976
  python data_tools/synth_cohort.py --anatomy mni152 --out val/bids       # 4 x 16, T1 48x56x48, fMRI 12x14x12 x 16
  python data_tools/synth_cohort.py --anatomy mni152 --preset adni-like --out adni/bids   # 96 subjects, 48 frames
  python data_tools/synth_cohort.py --anatomy mni152 --out val/bids --structures hippocampus entorhinal \\
      --fmri-effect connectivity --strength 0.5 0.8
  python data_tools/to_zarr.py --bids demo/bids --out demo/cohort.zarr
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np

from masan.access import not_a_folder
from masan.argtypes import number, path
from masan.config import ModelConfig
from masan.convert.sources import PLANTED_EFFECT_FILE
from masan.convert.sources import SYNTH_STAGING as STAGING
from masan.synth import anatomy, presets, structures
from masan.synth.options import add_effect_arguments, add_shape_arguments
from masan.synth.phantom import DEFAULT_CLASSES, DEFAULT_SEVERITY, PlantedEffect, synthesize_cohort

FULL_FRAMES = ModelConfig().fmri_frames
# Defaults per anatomy: subjects per class, T1 shape, fMRI shape, frames (mni152: its preset's).
DEFAULTS = {"phantom": (12, [32, 32, 32], [16, 16, 16], 8),
            "mni152": (None, [48, 56, 48], [12, 14, 12], None)}
# Option -> the anatomy it belongs to (giving it with the other one is an error).
ANATOMY_ONLY = {"center": "phantom", "radius": "phantom", "structures": "mni152", "fmri_effect": "mni152",
                "severity_sd": "mni152", "partner": "mni152", "orientation": "mni152",
                "stages": "mni152", "preset": "mni152", "subjects": "mni152", "warp_rms": "mni152",
                "motion": "mni152"}
WRITTEN = ("participants.tsv", "dataset_description.json", PLANTED_EFFECT_FILE)
"""The tables this tool writes beside the sub-* folders (the truth record marks a cohort it wrote)."""


def _generator_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, preset: presets.Preset) -> dict:
    """The preset's effect, nuisance and geometry arguments with the options given on top."""
    kw = preset.generator_arguments()
    kw.pop("frames")
    if args.strength:
        kw["strength"] = args.strength[0] if len(args.strength) == 1 else tuple(args.strength)
    if args.fmri_effect is not None:
        kw["fmri_effect"] = tuple(args.fmri_effect)
    if args.severity_sd is not None:
        sd = args.severity_sd
        if len(sd) > 2:
            p.error("--severity-sd takes one SD or two (T1 fMRI)")
        # a preset with a severity per modality keeps drawing them independently
        kw["severity_sd"] = sd[0] if len(sd) == 1 and np.isscalar(preset.severity_sd) else (sd[0], sd[-1])
    if args.motion is not None:
        kw["nuisance"] = dataclasses.replace(kw["nuisance"], misregistration_mm=args.motion[0],
                                             misregistration_deg=args.motion[1])
    if args.warp_rms is not None:
        kw["geometry"] = dataclasses.replace(kw["geometry"], warp_rms_mm=args.warp_rms)
    return kw


def build_parser() -> argparse.ArgumentParser:
    """The tool's options: the shared ones, the phantom's, then the MNI152 cohort's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=path, required=True,
                   help=f"BIDS folder to write: new, empty, or a cohort this tool wrote earlier (it has "
                        f"{PLANTED_EFFECT_FILE}), which is replaced whole (its sub-* folders and tables: rerunning "
                        "with other options is how a cohort is remade), so no subject of the old cohort stays "
                        "beside the new ones; any other folder is refused (it may hold data this tool did not "
                        f"write). The new cohort is written in OUT/{STAGING} first: a failure leaves OUT as it was")
    p.add_argument("--anatomy", choices=["phantom", "mni152"], default="phantom",
                   help="phantom heads (default) or the MNI152 validation cohort")
    p.add_argument("--per-class", type=number(int, 1), default=None,
                   help="subjects per class (default: phantom 12, mni152 --preset easy 16)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                   help=f"class names, each once (default {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--severity", nargs="+", type=number(float, 0, 1), default=None, metavar="S",
                   help="one severity in [0, 1] per class (default: NC 0, EMCI 1/3, LMCI 2/3, AD 1)")
    add_shape_arguments(p, {"t1-shape": "phantom 32 32 32, mni152 48 56 48",
                            "fmri-shape": "phantom 16 16 16, mni152 12 14 12 (adni-like 24 28 24)",
                            "frames": "phantom 8, mni152 easy 16, adni-like 48"})
    p.add_argument("--full", action="store_true",
                   help=f"the paper's sizes: T1 {ModelConfig().t1_shape}, "
                   f"fMRI {ModelConfig().fmri_shape} x {FULL_FRAMES}")
    p.add_argument("--tr", type=number(float, above=0), default=2.0,
                   help="repetition time in seconds (header; default %(default)s)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="random seed (default %(default)s)")
    ph = p.add_argument_group("phantom")
    ph.add_argument("--center", nargs=3, type=number(float, 0, 1), default=None,
                    help=f"planted ball centre, fractions of X Y Z (default {list(PlantedEffect.center)}: "
                         "cell 1,1,1 of 4x4x4)")
    ph.add_argument("--radius", type=number(float, above=0), default=None,
                    help=f"ball radius, fraction of each axis (default {PlantedEffect.radius})")
    _add_mni152_arguments(p)
    return p


def _add_mni152_arguments(p: argparse.ArgumentParser) -> None:
    mn = p.add_argument_group("mni152")
    easy, adni = presets.PRESETS["easy"], presets.PRESETS["adni-like"]
    mn.add_argument("--preset", default=None, choices=list(presets.PRESETS),
                    help=f"how hard the cohort is (default {presets.DEFAULT_PRESET}; see the top of this help). "
                         f"adni-like sets --strength {adni.strength[0]} {adni.strength[1]}, --fmri-effect "
                         f"{' '.join(adni.fmri_effect)}, --frames {adni.frames}, --severity-sd {adni.severity_sd[0]} "
                         f"{adni.severity_sd[1]}; the options below override the preset's values")
    mn.add_argument("--subjects", type=number(int, 1), default=None, metavar="N",
                    help="adni-like: subjects in all, split over the classes in the paper's proportions "
                         f"{'/'.join(map(str, presets.PAPER_CLASS_COUNTS.values()))} "
                         f"(default {adni.subjects})")
    add_effect_arguments(p, mn)
    mn.add_argument("--fmri-effect", nargs="*", default=None, choices=list(anatomy.FMRI_EFFECTS),
                    help="planted fMRI effects: amplitude (fluctuations damped in the structures) and/or "
                         "connectivity (structures decoupled from the partner network); default both (adni-like: "
                         "connectivity), none given: T1 effect only")
    mn.add_argument("--severity-sd", nargs="+", type=number(float, 0), default=None, metavar="SD",
                    help="per-subject severity jitter, N(0, SD) clipped to [0, 1]: one SD (easy: one severity "
                         "for both modalities, default 0.15) or T1 and fMRI SDs (a severity per modality, drawn "
                         f"independently; adni-like always draws them so, default {adni.severity_sd[0]} "
                         f"{adni.severity_sd[1]})")
    mn.add_argument("--warp-rms", type=number(float, 0), default=None, metavar="MM",
                    help="adni-like: RMS length of each subject's smooth nonlinear warp over the brain "
                         f"(default {adni.geometry.warp_rms_mm}; 0: none)")
    mn.add_argument("--motion", nargs=2, type=number(float, 0), default=None, metavar=("MM", "DEG"),
                    help="head placement per subject: translation of length U(0, MM) and rotation of U(0, DEG) "
                         "degrees (easy: misregistration per modality, default "
                         f"{easy.nuisance.misregistration_mm:g} {easy.nuisance.misregistration_deg:g}; adni-like: "
                         f"the T1's, the fMRI run's moved from it by up to {adni.geometry.fmri_offset_mm:g} mm / "
                         f"{adni.geometry.fmri_offset_deg:g} degrees, default {adni.nuisance.misregistration_mm:g} "
                         f"{adni.nuisance.misregistration_deg:g}); the header keeps the nominal grid, so the brain "
                         "sits elsewhere in each subject's voxels")
    mn.add_argument("--partner", default=None, choices=sorted(structures.STRUCTURES), metavar="NAME",
                    help="partner network for the connectivity effect (default: first of "
                         f"{', '.join(structures.PARTNER_CHOICES)} not planted)")
    mn.add_argument("--orientation", default=None,
                    help="voxel axis codes of the written files, e.g. RAS (default) or LAS")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace, preset: presets.Preset) -> None:
    """Exit 2 (``p.error``) for an option of the other anatomy or one the preset does not take."""
    for name, owner in ANATOMY_ONLY.items():
        if getattr(args, name) is not None and args.anatomy != owner:
            p.error(f"--{name.replace('_', '-')} applies to --anatomy {owner} only")
    name = args.preset or presets.DEFAULT_PRESET
    twice = sorted({c for c in args.classes if args.classes.count(c) > 1})
    if twice:
        p.error(f"--classes names {', '.join(twice)} more than once; give each class once")
    if args.anatomy == "mni152":
        if args.per_class is not None and preset.proportions is not None:
            p.error(f"--per-class does not apply to --preset {name}, whose classes follow the paper's "
                    "proportions; give the total with --subjects N")
        if args.subjects is not None and preset.proportions is None:
            p.error(f"--subjects applies to --preset adni-like; --preset {name} takes --per-class N")
        if args.subjects is not None and args.subjects < len(args.classes):
            p.error(f"--subjects {args.subjects} leaves a class empty; give at least {len(args.classes)}")
        if args.warp_rms is not None and preset.geometry is None:
            p.error(f"--warp-rms applies to --preset adni-like; --preset {name} has no warp")


def _sizes(args: argparse.Namespace, preset: presets.Preset) -> tuple[int | None, tuple, tuple, int]:
    """(subjects per class, T1 shape, fMRI shape, frames): the anatomy's defaults, the preset's
    frames and fMRI shape, the options given, or the paper's sizes with ``--full``."""
    per_class, t1_shape, fmri_shape, frames = DEFAULTS[args.anatomy]
    per_class = args.per_class if args.per_class is not None else per_class
    frames = preset.frames if frames is None else frames
    t1_shape, fmri_shape = args.t1_shape or t1_shape, args.fmri_shape or preset.fmri_shape or fmri_shape
    frames = args.frames if args.frames is not None else frames
    if args.full:
        t1_shape, fmri_shape, frames = ModelConfig().t1_shape, ModelConfig().fmri_shape, FULL_FRAMES
    return per_class, tuple(t1_shape), tuple(fmri_shape), frames


def _severity(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, float] | None:
    """class -> ``--severity`` value, None for the defaults (exit 2 when they do not fit the classes)."""
    severity = None
    if args.severity is not None:
        if len(args.severity) != len(args.classes):
            p.error(f"--severity needs one value per class ({len(args.classes)})")
        severity = dict(zip(args.classes, args.severity))
    elif not set(args.classes) <= set(DEFAULT_SEVERITY):
        p.error(f"classes other than {list(DEFAULT_SEVERITY)} need --severity")
    return severity


def _check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """Exit 2 unless ``out`` may take the cohort: a new or empty folder, or a cohort this tool wrote
    (with :data:`PLANTED_EFFECT_FILE`, or the :data:`STAGING` folder a stopped run left)."""
    why = not_a_folder(out)
    if why:
        p.error(f"--out {out} {why}; give a folder for the BIDS cohort")
    if not out.is_dir() or (out / PLANTED_EFFECT_FILE).is_file() or (out / STAGING).is_dir():
        return  # (the staging folder: a run of this tool was stopped there)
    try:
        others = [e.name for e in out.iterdir() if e.name != STAGING]
    except OSError as e:
        p.error(f"--out {out} cannot be read ({e.strerror}); give another folder")
    if others:
        p.error(f"--out {out} is a folder that is not empty and holds no {PLANTED_EFFECT_FILE}, so it is no cohort "
                "this tool wrote and would be overwritten; give a new or empty folder, or delete it first")


def _move_in(staging: Path, out: Path) -> None:
    """Replace the cohort in ``out`` by the one written in ``staging``: the old participants.tsv goes
    first and the new one comes last, so a cohort half moved in has none and reads as incomplete;
    the truth record is replaced in one step before any subject moves, so ``out`` never lacks the
    mark of a cohort this tool wrote (a rerun after a stop part way takes the folder back)."""
    (out / "participants.tsv").unlink(missing_ok=True)
    for old in out.glob("sub-*"):
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    (out / "dataset_description.json").unlink(missing_ok=True)
    (staging / PLANTED_EFFECT_FILE).replace(out / PLANTED_EFFECT_FILE)
    for new in sorted(staging.glob("sub-*")):
        new.replace(out / new.name)
    for name in WRITTEN[::-1]:  # dataset_description.json, then participants.tsv
        if name != PLANTED_EFFECT_FILE:
            (staging / name).replace(out / name)
    staging.rmdir()


def _write(p: argparse.ArgumentParser, out: Path, synthesize, usage_errors: tuple = ()) -> None:
    """Run ``synthesize(folder)`` into ``out``'s staging folder, then move the cohort into ``out``;
    on any failure remove what it wrote, leaving ``out`` as it was (exit 2 for ``usage_errors``)."""
    made = not out.exists()
    staging = out / STAGING
    try:
        shutil.rmtree(staging, ignore_errors=True)  # what a failed run left
        staging.mkdir(parents=True)
    except OSError as e:
        p.error(f"--out {out}: cannot write there ({e.strerror or e}); give another folder")
    try:
        synthesize(staging)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, usage_errors):
            p.error(str(e))
        raise
    _move_in(staging, out)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    preset = presets.PRESETS[args.preset or presets.DEFAULT_PRESET]
    _check(p, args, preset)
    _check_out(p, args.out)
    per_class, t1_shape, fmri_shape, frames = _sizes(args, preset)
    severity = _severity(p, args)
    if args.strength is not None and len(args.strength) > (1 if args.anatomy == "phantom" else 2):
        p.error("--strength takes one value (phantom) or one or two values T1 fMRI (mni152)")
    if args.anatomy == "phantom":
        center = tuple(args.center) if args.center is not None else PlantedEffect.center
        radius = args.radius if args.radius is not None else PlantedEffect.radius
        strength = args.strength[0] if args.strength else PlantedEffect.strength
        _write(p, args.out, lambda folder: synthesize_cohort(
            folder, per_class, t1_shape, fmri_shape, frames, (center, radius), strength, tuple(args.classes),
            args.seed, severity, args.tr, progress=True))
        n_subjects = per_class * len(args.classes)
    else:
        try:
            kw = _generator_arguments(p, args, preset)
            counts = preset.counts(args.classes, per_class=args.per_class, subjects=args.subjects)
        except (ValueError, RuntimeError) as e:
            p.error(str(e))
        _write(p, args.out, lambda folder: anatomy.synthesize_anatomy_cohort(
            folder, counts, t1_shape, fmri_shape, frames=frames,
            structures=tuple(args.structures or ("hippocampus", "amygdala")),
            seed=args.seed, progress=True, classes=tuple(args.classes), severity=severity,
            partner=args.partner, tr=args.tr, orientation=args.orientation or "RAS",
            stages=None if args.stages is None else {"t1": args.stages[:2], "fmri": args.stages[2:]}, **kw),
            (ValueError, RuntimeError))
        n_subjects = sum(counts.values())
    print(f"wrote {n_subjects} subjects to {args.out}; convert with: "
          f"python data_tools/to_zarr.py --bids {args.out} --out STORE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
