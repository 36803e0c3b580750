"""The science experiment's cohort: MNI152 anatomy with planted effects, made once in the work
dir by ``data_tools/synth_cohort.py`` then ``data_tools/to_zarr.py``, and reused while the
arguments it depends on (its stamp, WORK/cohort.json) stay the same."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from experiments import REPO
from masan.files import atomic_write_json
from masan.host import usable_cores
from masan.synth import anatomy
from masan.synth.presets import PRESETS

FULL = {"per_class": 24, "t1_shape": [96, 112, 96], "fmri_shape": [24, 28, 24], "frames": 64}
"""--full: a GPU-sized cohort (and train.device=auto: the config pins the CPU)."""
REGISTRATIONS = ("none", "rigid", "affine", "syn")
"""to_zarr.py --register: spatial normalisation of every subject to the template."""
DEFAULT_REGISTER = {"easy": "none", "adni-like": "syn"}
TEMPLATE = "mni152"
"""to_zarr.py --template: the space subjects are registered to (the cohort's own anatomy)."""
COHORT_STAMP = "cohort.json"
REGISTRATION_THREADS = 1
"""to_zarr.py --threads when registering: one ITK thread per worker, so the same command makes the
same store byte for byte (with more, SyN's per-thread sums add up in another order and two copies of
one seed's cohort score differently: docs/validation-cohort.md); a worker per usable core keeps it fast."""


def balanced(preset: str) -> bool:
    """Is the cohort of ``preset`` sized per class (``--per-class``), not in all (``--subjects``)?"""
    return PRESETS[preset].proportions is None


def cohort_args(args: argparse.Namespace, grid: list[int]) -> dict:
    """Everything the cohort depends on (its stamp); its size is ``per_class`` (a balanced preset)
    or ``subjects``, the other None."""
    per_class = balanced(args.preset)
    stamp = {"anatomy": anatomy.ANATOMY, "preset": args.preset, "register": args.register, "template": TEMPLATE,
             "per_class": args.per_class if per_class else None, "subjects": None if per_class else args.subjects,
             "structures": args.structures, "strength": args.strength, "seed": args.seed, "t1_shape": args.t1_shape,
             "fmri_shape": args.fmri_shape, "frames": args.frames, "stages": args.stages, "patch_grid": grid}
    if args.register != "none":  # copies registered with several threads differ: remade; unregistered ones kept
        stamp["registration_threads"] = REGISTRATION_THREADS
    return stamp


def cohort_commands(stamp: dict, bids: Path, store: Path) -> list[list[str]]:
    """The synth_cohort.py and to_zarr.py command lines that make the cohort of ``stamp``."""
    size = ["--per-class", str(stamp["per_class"])] if stamp["per_class"] is not None else \
        ["--subjects", str(stamp["subjects"])]
    synth = [sys.executable, "data_tools/synth_cohort.py", "--anatomy", stamp["anatomy"], "--preset", stamp["preset"],
             "--out", str(bids), *size, "--seed", str(stamp["seed"]),
             "--t1-shape", *map(str, stamp["t1_shape"]), "--fmri-shape", *map(str, stamp["fmri_shape"]),
             "--frames", str(stamp["frames"])]
    for flag in ("structures", "strength", "stages"):
        if stamp[flag]:
            synth += [f"--{flag}", *map(str, stamp[flag])]
    convert = [sys.executable, "data_tools/to_zarr.py", "--bids", str(bids), "--out", str(store),
               "--patch-grid", *map(str, stamp["patch_grid"]), "--register", stamp["register"],
               "--template", stamp["template"], "--no-progress"]
    if stamp["register"] != "none":  # registration resamples onto the template's grid: the model's shapes
        convert += ["--t1-shape", *map(str, stamp["t1_shape"]), "--fmri-shape", *map(str, stamp["fmri_shape"]),
                    "--threads", str(REGISTRATION_THREADS),
                    "--workers", str(usable_cores())]
    return [synth, convert]


def run_step(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def make_cohort(work: Path, stamp: dict) -> Path:
    """WORK/cohort.zarr made by synth_cohort + to_zarr, or reused when its stamp matches."""
    store, bids, stamp_file = work / "cohort.zarr", work / "bids", work / COHORT_STAMP
    stamp = json.loads(json.dumps(stamp))  # as it reads back: a tuple in it would never equal its JSON list
    if stamp_file.is_file() and store.is_dir() and json.loads(stamp_file.read_text()) == stamp:
        print(f"reusing the cohort {store} (same arguments: {stamp_file})")
        return store
    stamp_file.unlink(missing_ok=True)
    for old in (bids, store):  # to_zarr updates a store in place: start clean
        shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for cmd in cohort_commands(stamp, bids, store):
        run_step(cmd)
    atomic_write_json(stamp_file, stamp)
    return store
