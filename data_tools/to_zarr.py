#!/usr/bin/env python
"""Convert a NIfTI cohort (BIDS folder or CSV manifest) into a MASAN cohort store (Zarr v3).

Examples:
  python data_tools/to_zarr.py --bids demo/bids --out runs/cohort.zarr
  python data_tools/to_zarr.py --manifest cohort.csv --out /scratch/cohort.zarr --workers 8 \\
      --t1-shape --fmri-shape                      # RAS, the paper's 240x256x176 / 60x64x44
  python data_tools/to_zarr.py --bids adni3 --out adni3.zarr --spacing 1 3 --t1-shape --fmri-shape
                                                   # many scanners: one voxel size (1 mm T1, 3 mm fMRI)
  python data_tools/to_zarr.py --bids bids --out cohort.zarr --workers 8 --register affine --template mni152 \\
      --t1-shape --fmri-shape                      # registered onto MNI152 grids of the paper's shapes

Rerun it after adding subjects or fixing files: finished subjects whose sources are unchanged
are skipped, half-written ones are redone (a changed label is applied, with a warning naming
the subject). Subjects leave the store only with --prune. The summary counts the store's
subjects by class.
The store is as closed as its most restricted source (e.g. sources 600 -> store 600/700)
unless --mode/--group share it on purpose. Layout and safety: docs/data-format.md.
Exit status: 0 all converted, 1 some subjects failed (see STORE/conversion_report.json;
0 with --allow-failures), 2 the inputs or options are unusable (nothing changed), or the
store's disk filled up or is read-only (what was converted is kept; nothing pruned), 130/143
stopped by Ctrl-C/SIGTERM (what was converted is kept: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

from masan.access import AccessError, parse_group, parse_mode, reports_denied
from masan.argtypes import number, path
from masan.config import ModelConfig
from masan.convert.cohort import (
    DEFAULT_CLASSES,
    ConvertError,
    ConvertOptions,
    Interrupted,
    StoreAccess,
    convert_cohort,
    discover_bids,
    planted_effect,
    read_manifest,
    stop_signals,
)
from masan.convert.registration import DEFAULT_VOXEL_MM, TEMPLATES, TYPES
from masan.data.contract import ContractError, store_geometry
from masan.files import disk_refusal
from masan.store.cohort import MODALITIES, REPORT, CohortStore


def _add_layout_arguments(p: argparse.ArgumentParser, model: ModelConfig) -> None:
    """How voxels are laid out in the store (ConvertOptions' layout fields)."""
    lay = p.add_argument_group("layout")
    orient = lay.add_mutually_exclusive_group()
    orient.add_argument("--keep-orientation", action="store_true",
                        help="store the file's voxel order (default: reoriented to RAS+, affine kept true, so "
                             "every subject's voxel axes mean the same sides of the head)")
    orient.add_argument("--canonical", action="store_true", help="reorient to RAS+ (the default; kept for scripts)")
    lay.add_argument("--spacing", nargs="*", type=number(float, 0), metavar="MM",
                     help="resample every image onto an isotropic RAS grid: T1 MM [fMRI MM] (flag alone or 0: the "
                          "cohort's most common voxel size per modality), trilinear, over each image's field of "
                          "view, before --t1-shape/--fmri-shape centre it. Needed when scanners' voxel sizes differ "
                          "(training refuses such a store)")
    lay.add_argument("--t1-shape", nargs="*", type=number(int, 1), metavar="N",
                     help=f"centre crop/pad T1 to X Y Z (flag alone: {' '.join(map(str, model.t1_shape))})")
    lay.add_argument("--fmri-shape", nargs="*", type=number(int, 1), metavar="N",
                     help=f"centre crop/pad fMRI frames to X Y Z (flag alone: {' '.join(map(str, model.fmri_shape))})")
    d = ConvertOptions()
    lay.add_argument("--patch-grid", nargs=3, type=number(int, 1), default=list(d.patch_grid),
                     metavar=("GX", "GY", "GZ"),
                     help="T1 chunk = one cell of this grid (default %(default)s)")
    lay.add_argument("--fmri-chunk-frames", type=number(int, 1), default=d.fmri_chunk_frames,
                     help="frames per fMRI chunk (default %(default)s)")
    lay.add_argument("--fmri-shard-frames", type=number(int, 1), default=d.fmri_shard_frames,
                     help="frames per fMRI shard file, a multiple of --fmri-chunk-frames (default %(default)s); "
                          "also the streaming slab (memory per worker)")
    lay.add_argument("--codec", default=d.codec, choices=["zstd", "lz4", "lz4hc", "blosclz", "zlib"],
                     help="Blosc compressor (default %(default)s)")
    lay.add_argument("--clevel", type=int, default=d.clevel, choices=range(10), metavar="0-9",
                     help="compression level (default %(default)s)")
    lay.add_argument("--shuffle", default=d.shuffle, choices=["bitshuffle", "shuffle", "noshuffle"],
                     help="Blosc bit or byte shuffle before compression (default %(default)s)")
    lay.add_argument("--levels", type=number(int, 1), default=d.levels,
                     help="resolution levels per image (default %(default)s: full resolution only); each further "
                          "level halves X, Y, Z for OME-Zarr viewers (training reads level 0)")


def _add_registration_arguments(p: argparse.ArgumentParser) -> None:
    """Spatial normalisation with ANTs (ConvertOptions' register, template, threads)."""
    d = ConvertOptions()
    reg = p.add_argument_group("registration (spatial normalisation with ANTs; docs/data-format.md)")
    reg.add_argument("--register", default=d.register, choices=list(TYPES),
                     help="register each T1 to --template (rigid, affine, or affine + SyN warp) and resample it onto "
                          "the template grid of --t1-shape; each fMRI goes through its mean's rigid fit to the T1 "
                          "onto the grid of --fmri-shape. With it the shapes are template grids (MNI mm, the brain "
                          f"box; default {DEFAULT_VOXEL_MM['t1']:g} mm T1, {DEFAULT_VOXEL_MM['fmri']:g} mm fMRI "
                          "voxels), not crops, and --canonical has no effect. T1s must be skull-stripped. "
                          "Default %(default)s: the file's voxels, as without this flag")
    reg.add_argument("--template", default=d.template, choices=list(TEMPLATES),
                     help="mni152: the ICBM 2009a nonlinear symmetric MNI152 T1 (brain only) bundled with nilearn "
                          "(default)")
    reg.add_argument("--threads", type=number(int, 1), default=None,
                     help="ITK threads per worker for the registrations (default: usable cores / workers). With 1 "
                          "a rerun reproduces every byte (use --workers for speed); with more, reruns differ by "
                          "fractions of a millimetre")


def contract_warnings(out: Path) -> list[str]:
    """What training would refuse in the store as converted (the training contract,
    :func:`masan.data.contract.store_geometry`, per modality over the stored subjects that
    have it: voxel sizes, shapes, orientations, TRs), said now rather than when a run starts; and
    its notes (e.g. one scan stored under two subject ids)."""
    store = CohortStore(out)
    warnings = []
    for m in MODALITIES:
        subjects = [s for s in store.subjects if store.has(s, m)]
        if not subjects:
            continue
        try:
            warnings.extend(store_geometry(store, subjects, [m]).notes)
        except ContractError as e:
            warnings.append(f"training will refuse this store as it is: {e}")
    return warnings


def class_counts(out: Path) -> str:
    """The store's subjects by class, in class order, then the unlabeled (``NC 16, AD 14,
    unlabeled 2``): what training will have, whatever this run changed."""
    store = CohortStore(out)
    counts = Counter(store.label(s) for s in store.subjects)
    shown = [f"{c} {counts[c]}" for c in store.classes] + [f"{c} {n}" for c, n in counts.items()
                                                          if c is not None and c not in store.classes]
    return ", ".join(shown + ([f"unlabeled {counts[None]}"] if counts[None] else [])) or "no subjects"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    model = ModelConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bids", type=path, help="BIDS folder with participants.tsv and sub-*/[ses-*/]anat|func")
    src.add_argument("--manifest", type=path, help="CSV with columns subject,t1,fmri,label (paths relative to it)")
    p.add_argument("--out", type=path, required=True, help="store folder (created, or updated in place)")
    p.add_argument("--label-column", default="diagnosis",
                   help="column holding the diagnosis, in participants.tsv or the sessions tables "
                        "(default %(default)s)")
    p.add_argument("--label-map", default=None,
                   help="extra RAW=CLASS pairs, e.g. 'Dementia=AD,SMC=NC' (CN=NC is built in; case-insensitive; "
                        "a raw label maps to one class)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                   help=f"class names, in order, each once (default {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--label-source", default=None, choices=["participants", "sessions"],
                   help="where the diagnosis is read: participants.tsv, or each subject's sub-X/sub-X_sessions.tsv "
                        "(the row of the session converted: ADNI's BIDS converters write each visit's diagnosis "
                        "there); default: participants.tsv when it has --label-column, else the sessions tables")
    p.add_argument("--session", default=None, help="BIDS session to use (default: first with T1w and BOLD)")
    p.add_argument("--bold-task", default=None, metavar="LABEL",
                   help="use the BOLD runs of this BIDS task (func/*_task-LABEL_*bold.nii[.gz]; e.g. nback) as the "
                        "fMRI (default: resting-state runs, a task label containing 'rest': MASAN models resting-"
                        "state fMRI, so a subject with only other tasks' runs fails naming them)")
    p.add_argument("--require", nargs="+", choices=["t1", "fmri", "none"], default=["t1", "fmri"],
                   help="modalities every subject must have (others are converted when present); none: each "
                        "subject with the images it has (at least one)")
    p.add_argument("--allow-unlabeled", action="store_true",
                   help="store subjects without a diagnosis (empty or n/a) for `python -m masan.predict`; "
                        "training leaves them out (default: such a subject fails)")
    _add_layout_arguments(p, model)
    _add_registration_arguments(p)
    d = ConvertOptions()
    p.add_argument("--nan", default=d.nan, choices=["error", "zero"],
                   help="NaN voxels: error (default: the subject fails) or zero (stored as 0, count recorded)")
    p.add_argument("--unoriented", default=d.unoriented, choices=["refuse", "assume-las"],
                   help="a file whose header states no orientation (sform and qform codes 0: left and right are "
                        "a guess): refuse (default: its subject fails, the message says how to fix the header) "
                        "or assume-las (nibabel's and FSL's assumption, with a warning)")
    p.add_argument("--workers", type=number(int, 1), default=1,
                   help="subjects converted in parallel (processes; default %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="re-read already converted subjects and reconvert any whose checksum differs")
    p.add_argument("--prune", action="store_true",
                   help="remove subjects the input no longer lists, whose sources are missing or that fail now "
                        "(default: keep their earlier conversion and report them)")
    p.add_argument("--new-input", action="store_true",
                   help="convert into a store made from another participants.tsv or manifest (the same cohort "
                        "listed anew); without it, a table at another path and with other content than the store "
                        "recorded is refused, as two cohorts would mix in it")
    acc = p.add_argument_group("access (default: no more open than the most restricted source)")
    acc.add_argument("--mode", default=None, metavar="OCTAL",
                     help="file mode for the whole store, e.g. 640 to let the group read on purpose "
                          "(folders get x where r)")
    acc.add_argument("--group", default=None, help="group name or id to own the store (you must be a member)")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when some subjects failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name, default in (("t1_shape", model.t1_shape), ("fmri_shape", model.fmri_shape)):
        v = getattr(args, name)
        if v is not None and len(v) == 0:
            setattr(args, name, list(default))
        elif v is not None and len(v) != 3:
            p.error(f"--{name.replace('_', '-')} takes three sizes X Y Z (or none for the paper's)")
    return args


@reports_denied("to_zarr")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print(f"to_zarr: --workers must be 1 or more, got {args.workers}", file=sys.stderr)
        return 2
    if args.label_source is not None and not args.bids:
        print("to_zarr: --label-source applies to --bids (a manifest's labels are its label column)", file=sys.stderr)
        return 2
    if "none" in args.require and len(args.require) > 1:
        print(f"to_zarr: --require {' '.join(args.require)}: none stands alone (every subject with the images it "
              "has); or name the modalities every subject must have", file=sys.stderr)
        return 2
    spacing = None
    if args.spacing is not None:
        if len(args.spacing) > 2:
            print("to_zarr: --spacing takes T1 MM and optionally fMRI MM (or nothing: the cohort's most common)",
                  file=sys.stderr)
            return 2
        spacing = tuple((list(args.spacing) + [0.0, 0.0])[:2])
    try:
        share = StoreAccess(None if args.mode is None else parse_mode(args.mode),
                            None if args.group is None else parse_group(args.group))
        opts = ConvertOptions(
            canonical=not args.keep_orientation, spacing=spacing,
            t1_shape=tuple(args.t1_shape) if args.t1_shape else None,
            fmri_shape=tuple(args.fmri_shape) if args.fmri_shape else None, patch_grid=tuple(args.patch_grid),
            fmri_chunk_frames=args.fmri_chunk_frames, fmri_shard_frames=args.fmri_shard_frames, codec=args.codec,
            clevel=args.clevel, shuffle=args.shuffle, levels=args.levels, nan=args.nan,
            require=tuple(m for m in args.require if m != "none"),
            unoriented=args.unoriented, register=args.register, template=args.template, threads=args.threads,
            allow_unlabeled=args.allow_unlabeled, bold_task=args.bold_task)
        if args.bids:
            sources = discover_bids(args.bids, args.label_column, args.session, opts.bold_task, args.label_source)
            effect = planted_effect(args.bids)
            extra = {"planted_effect": effect} if effect else None
        else:
            sources, extra = read_manifest(args.manifest, opts.bold_task), None
        with stop_signals():  # SIGINT, SIGTERM: workers stopped, report written, what was published kept
            report = convert_cohort(sources, args.out, opts, args.classes, args.label_map, args.workers,
                                    args.verify, extra, progress=not args.no_progress, prune=args.prune,
                                    share=share, review=contract_warnings, new_input=args.new_input)
    except (ConvertError, AccessError) as e:
        print(f"to_zarr: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if disk_refusal(e) is None:
            raise
        print(f"to_zarr: {disk_refusal(e)}: the conversion stopped; the store keeps what was converted. Free space "
              f"(or raise the quota, or make it writable) where {args.out} lies, then run the same command again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # an Interrupted from stop_signals, or Ctrl-C while the inputs were read
        # a zarr write the signal cut short leaves its coroutine unawaited: its warning, printed when
        # it is collected, would trail the one line this stop is told in
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        signum, done = (e.signum, e.report) if isinstance(e, Interrupted) else (signal.SIGINT, None)
        name = signal.Signals(signum).name
        if done is None:
            print(f"to_zarr: interrupted by {name} before any subject was converted", file=sys.stderr)
        else:
            failed = f", {len(done.failed)} failed" if done.failed else ""
            print(f"to_zarr: interrupted by {name}: {len(done.converted)} of {done.to_convert} subjects were "
                  f"converted{failed}; the store is consistent: rerun the same command to resume "
                  f"(details: {args.out / REPORT})", file=sys.stderr)
        return 128 + signum
    try:
        print(f"{args.out}: {len(report.converted)} converted, {len(report.skipped)} unchanged (skipped), "
              f"{len(report.kept)} kept from earlier, {len(report.removed)} removed, {len(report.failed)} failed "
              f"in {report.seconds:.1f} s; access {report.access}")
        if report.converted or report.skipped or report.kept:
            print(f"  subjects by class: {class_counts(args.out)}")
        for w in report.warnings:
            print(f"  warning: {w}")
        sys.stdout.flush()  # a closed pipe raises here rather than in the interpreter's exit
    except BrokenPipeError:
        # the reader stopped early (`| head`): the store and its report are complete, so the
        # exit status stays the conversion's; stdout goes to /dev/null so that the
        # interpreter's last flush does not fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for f in report.failed:
        print(f"  FAILED {f.subject}: {f.error}", file=sys.stderr)
    if report.failed:
        print(f"details: {args.out / REPORT}", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
