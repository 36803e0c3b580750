"""Apply a trained run to a cohort: ``python -m masan.predict RUN_DIR [--store STORE] --out DIR``.

External validation (a finished run on another cohort, as ClinicaDL's ``predict``) and the
run's own final evaluation use the same function, :func:`masan.inference.predict_subjects`, so
a run's test predictions can be reproduced from its directory alone: the model is rebuilt from
``RUN_DIR/config.yaml`` and loaded from the run's final checkpoint (weights and the fitted
cohort standardisers), in the run's precision, on any number of ranks.
This module is the command only (which run, checkpoint and subjects, where the files go): the
weights come from :mod:`masan.train.checkpoint`, the predictions from :mod:`masan.inference`,
their files from :mod:`masan.predictions`.

Which subjects: with ``--store`` omitted, the run's own store and its ``--split`` part
(default ``test``) from ``RUN_DIR/split.json``; with another store, every subject of the run's
classes (``data.classes``/``data.merge``) that has the modalities the run uses. The store must
have the run's input shapes. Writes ``DIR/predictions.csv``, ``region_weights.npy`` and
``metrics.json`` (the layout of a run directory); a cohort without a subject of the positive
class gets recall and F1 null (undefined, as the AUC; :mod:`masan.metrics`) and a note.
Warned about (one line each, before the model is loaded): subjects of another store left out
for a class the run does not predict, and subjects of the run's own training or validation
part in it (the same scans: their accuracy is no test accuracy; :func:`seen_in_training`).

What is refused (exit 2, the message names the file and the fix), all before any inference:

- an ``--out`` that is an existing file, lies inside a cohort store or a training run
  directory (it would put files into the store, or overwrite the run's own predictions), or
  cannot be created; checked before the model is loaded;
- an empty ``--split`` part (``val`` of a run trained with ``split.val_fraction=0``), or a
  store without the class names the run was trained on (the fix is a store converted under
  them: a trained run's classes cannot change);
- a run without ``DONE``, or whose ``DONE`` records a stop by ``train.max_steps`` before its
  epochs, unless ``--allow-unfinished`` (which says which step of how many it predicts with);
- a damaged final checkpoint. The checkpoint used is the newest one the run recorded (the
  step in ``DONE``, ``checkpoints/latest_complete``, the newest ``COMPLETE`` marker): it must
  exist, match its manifest's sizes and the SHA-256 of the model-states file (the checks a
  resume makes, :class:`masan.train.checkpoint.CheckpointManager`), and hold finite weights.
  A damaged or deleted one is refused rather than replaced by an older checkpoint, because
  an older one is a different, less trained model: predictions that look normal but are not
  the run's. The message names the newest intact older checkpoint; ``--checkpoint TAG``
  predicts with it knowingly.

Output access: files are created under the umask of, and then given, the most restrictive
mode among the store and the run directory (:mod:`masan.access`; the predictions name each
subject with a diagnosis), so an owner-only store or run gives owner-only predictions.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from masan import argtypes
from masan.access import AccessError, reports_denied
from masan.argtypes import path, str_path
from masan.config import ConfigError, RunConfig, load_config
from masan.files import disk_refusal
from masan.inference import predict_subjects
from masan.metrics import undefined_note
from masan.predictions import write_predictions
from masan.rundir import RunDir
from masan.store.publish import Interrupted, stop_signals
from masan.train.checkpoint import TAG_RE, CheckpointManager, checkpoint_problem, final_tag, load_model, previous_intact

if TYPE_CHECKING:
    from masan.store.cohort import CohortStore


class PredictRefused(ValueError):
    """predict will not run on these arguments; the message names the file and the fix."""


# ---------------------------------------------------------------------- where the output goes


def check_out(out: Path, suggestion: Path) -> None:
    """Refuse (PredictRefused) an ``--out`` predict must not or cannot write to
    (:func:`masan.store.places.output_folder_problem`, then a trial ``mkdir``). Called before
    the model is loaded: a refusal costs nothing."""
    from masan.access import outermost_missing
    from masan.store.places import output_folder_problem

    problem = output_folder_problem(out, suggestion, "predictions.csv, region_weights.npy and metrics.json")
    if problem:
        raise PredictRefused(problem)
    # os.access says yes to places no folder can be made in (/proc, some network mounts), so
    # make it; and remove it again: write_access creates it with the store's and run's access
    created = outermost_missing(out)
    if created is None:
        return
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise PredictRefused(f"--out {out} cannot be created ({e.strerror}: {e.filename}); pass a folder you may "
                             f"write, e.g. --out {suggestion}") from None
    for folder in (out.resolve(), *out.resolve().parents):
        folder.rmdir()
        if folder == created:
            break


def write_access(store: str, run_dir: Path, out: Path, write):
    """Run ``write()`` (which writes the prediction files into ``out``) so that nothing it
    writes is more readable than the store and the run directory
    (:func:`masan.access.write_restricted`: the folders predict created get their most
    restrictive mode, or, in an existing ``out``, the files it wrote). Returns what ``write()``
    returns.

    The predictions name each subject with a diagnosis: they may be no more readable than
    the data they come from (a data-use agreement), whatever the user's umask."""
    from masan.access import write_restricted

    rd = RunDir(out)
    result, _ = write_restricted([store, run_dir], out, [rd.predictions, rd.region_weights, rd.metrics], write)
    return result


# ---------------------------------------------------------------------- which checkpoint


def _progress(run_dir: Path, cfg: RunConfig, state: dict) -> str:
    """``"step S of T"`` for a checkpoint's client state (T from the split and the batch size
    at the checkpoint's world size; ``"step S"`` alone when the split cannot be read)."""
    from masan.data.splits import Split

    step = state.get("step", "?")
    try:
        n_train = len(Split.load(RunDir(run_dir).split).part("train"))
    except (OSError, ValueError):
        return f"step {step}"
    per_step = cfg.optim.micro_batch * cfg.optim.grad_accum * int(state.get("dp_world_size", 1))
    total = sum(cfg.epochs.values()) * (n_train // per_step)
    limit = f", train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps is not None else ""
    return f"step {step} of {total} ({n_train} training subjects, {per_step} per step{limit})"


def choose_checkpoint(run_dir: Path, cfg: RunConfig, requested: str | None) -> str:
    """The checkpoint to predict with: ``requested`` (``--checkpoint``) or the run's final
    one, verified by :func:`checkpoint_problem`; PredictRefused naming the file and the fix."""
    ckpts = RunDir(run_dir).checkpoints
    if requested is not None:
        if not TAG_RE.match(requested):
            raise PredictRefused(f"--checkpoint {requested!r} is not a checkpoint name; pass a folder name of "
                                 f"{ckpts} such as step_000123")
        tag, named_by = requested, "--checkpoint"
        if not (ckpts / tag).is_dir():
            complete = CheckpointManager(run_dir, keep=1).complete_tags()  # newest first
            have = (f"its complete ones: {', '.join(reversed(complete))} (the newest: {complete[0]})" if complete else
                    "it holds no complete checkpoint")
            raise PredictRefused(f"--checkpoint {tag}: {ckpts} has no checkpoint of that name; {have}")
    else:
        tag, named_by = final_tag(run_dir, cfg)
        if tag is None:
            raise PredictRefused(f"{ckpts} holds no complete checkpoint; train the run first")
    why = checkpoint_problem(run_dir, tag)
    if why is None:
        return tag
    previous = previous_intact(run_dir, tag)
    fix = (f"restore {ckpts / tag} from a backup, or predict knowingly with the previous intact checkpoint, "
           f"a less trained model: --checkpoint {previous}" if previous else
           f"restore {ckpts / tag} from a backup; no older intact checkpoint is left in {ckpts}")
    raise PredictRefused(f"checkpoint {ckpts / tag} (named by {named_by}) cannot be used: {why}; {fix}")


def run_config(run_dir: Path) -> RunConfig:
    """The run's config (``RUN_DIR/config.yaml``); FileNotFoundError naming the fix when
    ``run_dir`` is not a training run directory."""
    config = RunDir(run_dir).config
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run_dir} is not a training run directory "
                                "(train one with launch/train_local.py or launch/submit.py)")
    return load_config(config)


def load_trained_model(run_dir: Path, device: torch.device, checkpoint: str | None = None,
                       allow_unfinished: bool = False, cfg: RunConfig | None = None
                       ) -> tuple[torch.nn.Module, RunConfig, list[str], str, str]:
    """The run's model with the weights of its final checkpoint (or ``checkpoint``), verified,
    in the run's precision. Returns (model in eval mode, config, class names, checkpoint tag,
    a note on how trained it is: ``""`` for a finished run's final checkpoint). ``cfg``: the
    run's config when the caller has read it already (:func:`run_config`)."""
    cfg = cfg if cfg is not None else run_config(run_dir)
    why_unfinished = RunDir(run_dir).unfinished(cfg)
    if why_unfinished and not allow_unfinished:
        raise PredictRefused(f"{run_dir}: {why_unfinished}. Its predictions would come from a partly trained "
                             "model; finish the run (start it again: it resumes), or pass --allow-unfinished to "
                             "predict with its newest checkpoint knowingly")
    tag = choose_checkpoint(run_dir, cfg, checkpoint)
    state = CheckpointManager(run_dir, keep=1).manifest(tag).get("state", {})
    note = ""
    if why_unfinished:
        note = f"UNFINISHED run, {_progress(run_dir, cfg, state)}"
    elif tag != final_tag(run_dir, cfg)[0]:
        note = f"NOT the final checkpoint: {_progress(run_dir, cfg, state)}"
    return load_model(run_dir, cfg, tag, device), frames_as_built(cfg), list(cfg.data.classes), tag, note


def fed_frames(cfg: RunConfig) -> int | None:
    """Frames per fMRI run the run's model takes (None: it reads no fMRI): ``data.fmri_frames``,
    or with ``null`` (every frame: all runs of its own store were that long) ``model.fmri_frames``."""
    if not cfg.data.use_fmri:
        return None
    return cfg.data.fmri_frames if cfg.data.fmri_frames is not None else cfg.model.fmri_frames


def frames_as_built(cfg: RunConfig) -> RunConfig:
    """``cfg`` (a copy when it changes) whose ``data.fmri_frames`` is :func:`fed_frames`: another
    store's longer runs must be cut to the count the model was built for."""
    if not cfg.data.use_fmri or cfg.data.fmri_frames is not None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.fmri_frames = fed_frames(cfg)
    return cfg


class Selection(NamedTuple):
    """What predict reads: ``subjects`` of ``store`` with ``labels``, written as split ``part``."""

    store: str
    subjects: list[str]
    labels: list[int]
    part: str
    warnings: list[str] = []
    """One line each, printed before the model is loaded."""
    not_test: bool = False
    """Some subjects are in the run's training or validation part (:func:`seen_in_training`)."""


def _subjects(cfg: RunConfig, run_dir: Path, store: str | None, part: str) -> Selection:
    """The subjects to predict; raises, before any model is loaded, for a part or a store that
    has none the run can predict."""
    from masan.data.dataset import select_subjects
    from masan.data.splits import Split
    from masan.store.cohort import FIX as STORE_FIX
    from masan.store.cohort import CohortStore

    if store is None:
        store = cfg.data.store
        if not Path(store).exists():  # moved, or purged from scratch: the user knows where it went, if anywhere
            raise PredictRefused(
                f"the cohort store {store} that {run_dir} trained on (its data.store) does not exist: moved or "
                f"deleted? Pass where it is now with --store PATH (every subject of it is then predicted), or put it "
                f"back at that path (a symlink will do) to predict the run's {part} part; if it is lost, {STORE_FIX}")
        split_file = RunDir(run_dir).split
        split = Split.load(split_file)
        chosen = split.part(part)
        if not chosen:
            why = f"split.val_fraction={split.val_fraction:g}" if part == "val" else f"{split_file} lists none"
            have = [p for p in ("test", "val", "train") if split.part(p)]
            others = f" (or {', '.join(have[1:])})" if len(have) > 1 else ""
            use = f"use --split {have[0]}{others}, or " if have else ""
            raise PredictRefused(f"{run_dir} has no {part} part ({why}): {use}predict another store with "
                                 "--store STORE")
        subjects, labels, _ = select_subjects(store, cfg.data)
        label_of = dict(zip(subjects, labels))
        missing = [s for s in chosen if s not in label_of]
        if missing:
            raise ConfigError(f"{split_file} names subjects not in {store}: {missing[:5]}; "
                              "pass the store the run was trained on with --store")
        return Selection(store, chosen, [label_of[s] for s in chosen], part)
    cohort = CohortStore(store)
    check_classes(cfg, run_dir, cohort)
    subjects, labels, _ = select_subjects(cohort, cfg.data, unlabeled=True)
    unchecked = check_contract(cfg, run_dir, store, subjects)
    seen = seen_in_training(cfg, run_dir, cohort, subjects)
    notes = [n for n in (unchecked, left_out_classes(cfg, run_dir, cohort), seen) if n]
    return Selection(store, subjects, labels, "external", notes, seen is not None)


def _store_classes(cfg: RunConfig) -> list[str]:
    """The store classes the run reads: the keys of ``data.merge`` and the classes not merged into."""
    merged_into = set(cfg.data.merge.values())
    return list(dict.fromkeys([*cfg.data.merge, *(c for c in cfg.data.classes if c not in merged_into)]))


def check_classes(cfg: RunConfig, run_dir: Path, store: CohortStore) -> None:
    """Refuse (PredictRefused) a store whose class names are not the ones the run reads.

    :func:`~masan.data.dataset.select_subjects` would advise changing ``data.classes`` or
    ``data.merge``, which a trained run cannot take: the fix is a store under the run's names."""
    from masan.data.dataset import unserved_classes

    data, have = cfg.data, store.classes
    unknown, missing = unserved_classes(have, data)
    lacking = missing + unknown
    if not lacking:
        return
    wanted = _store_classes(cfg)
    extra, absent = [c for c in have if c not in wanted], [c for c in wanted if c not in have]
    pairs = (",".join(f"{a}={b}" for a, b in zip(extra, absent)) if extra and len(extra) == len(absent) else
             "STORE_LABEL=RUN_CLASS,...")
    merge = f" (data.merge {data.merge})" if data.merge else ""
    raise PredictRefused(
        f"{store.path} has the classes {have}, but {run_dir} was trained on {list(data.classes)}{merge}: "
        f"{', '.join(lacking)} missing. A trained run keeps its classes, so convert the cohort again under its "
        f"names: python data_tools/to_zarr.py --bids BIDS (or --manifest CSV) --out NEW.zarr --classes "
        f"{' '.join(wanted)} --label-map {pairs}, then predict with --store NEW.zarr")


def left_out_classes(cfg: RunConfig, run_dir: Path, store: CohortStore) -> str | None:
    """A warning naming how many subjects of ``store`` are left out because their class is not
    one the run predicts (None: none is)."""
    merge, classes = cfg.data.merge, cfg.data.classes
    out = Counter(label for s in store.subjects
                  if (label := store.label(s)) is not None and merge.get(label, label) not in classes)
    if not out:
        return None
    counts = ", ".join(f"{c} {n}" for c, n in sorted(out.items()))
    return (f"{sum(out.values())} subject(s) of {store.path} left out, of classes {run_dir} does not predict "
            f"({counts}; it predicts {list(classes)})")


def seen_in_training(cfg: RunConfig, run_dir: Path, store: CohortStore, subjects: list[str]) -> str | None:
    """A warning when some of ``subjects`` (of ``store``) are in the run's training or
    validation part (None: none is): their accuracy is no test accuracy.

    A subject counts when its id is in ``split.json`` and its scans are the ones the run read
    (the SHA-256 of the source NIfTI files in both stores' tables), so another cohort's
    ``sub-001`` does not count while a copy or a reconversion of the run's store does. When the
    run's store cannot be read (or its table holds no checksums), the id alone counts."""
    from masan.data.dataset import used_modalities
    from masan.data.splits import Split
    from masan.store.cohort import CohortStore, StoreError

    try:
        split = Split.load(RunDir(run_dir).split)
    except ValueError:  # no split to compare with
        return None
    parts = {name: set(split.part(name)) for name in ("train", "val")}
    trained_on = parts["train"] | parts["val"]
    seen = [s for s in subjects if s in trained_on]
    modalities = used_modalities(cfg.data)

    def scans(of, s: str) -> list:
        return [(of.row(s)[m] or {}).get("sha256") for m in modalities]

    basis = restore = ""
    try:
        own = CohortStore(cfg.data.store)
        in_own = set(own.subjects)
        seen = [s for s in seen if s in in_own and scans(own, s) == scans(store, s)]
    except (StoreError, OSError):
        basis = f" (by id: the run's store {cfg.data.store} cannot be read to compare the scans)"
        restore = f" with its store back at {cfg.data.store} (a symlink will do)"  # without it, predict refuses
    if not seen:
        return None
    n = {name: sum(s in part for s in seen) for name, part in parts.items()}
    return (f"{len(seen)} of the {len(subjects)} subjects of {store.path} are in {run_dir}'s training ({n['train']}) "
            f"or validation ({n['val']}) part{basis}, so the accuracy is not a test accuracy; for that, predict "
            f"its test part{restore}: python -m masan.predict {run_dir} --out DIR (no --store)")


def check_contract(cfg: RunConfig, run_dir: Path, store: str, subjects: list[str]) -> str | None:
    """Refuse (ContractError) a store whose geometry differs from the one the run trained on
    (``store_geometry.json``; for runs older than it, that of the run's own store when it can be
    read, else the model's input shapes alone). Returns a note when orientation and voxel size
    could not be checked (an older run whose own store is gone) or the TR (recorded on one side
    only), else None."""
    from masan.data.contract import ContractError, mismatches, store_geometry, unchecked_tr
    from masan.data.dataset import used_modalities
    from masan.store.cohort import CohortStore

    used = used_modalities(cfg.data)
    path = RunDir(run_dir).store_geometry
    trained, note = ((json.loads(path.read_text()), None) if path.is_file()
                     else _older_runs_geometry(cfg, run_dir, store, used))
    geo = store_geometry(CohortStore(store), subjects, used)
    problems = mismatches(trained, geo, fed_frames(cfg))
    if problems:
        raise ContractError(f"{store} does not have the geometry {run_dir} was trained on:\n  - "
                            + "\n  - ".join(problems))
    notes = [n for n in (note, unchecked_tr(trained, geo)) if n]
    return "; ".join(notes) or None


def _older_runs_geometry(cfg: RunConfig, run_dir: Path, store: str, used: list[str]) -> tuple[dict, str | None]:
    """(geometry, note): the geometry a run older than ``store_geometry.json`` trained on, its own
    store's (the subjects of its classes and modalities there), else its input shapes alone, with
    a note (another store of the same shapes, stored mirrored, would pass)."""
    from masan.data.contract import ContractError, Geometry, store_geometry
    from masan.data.dataset import select_subjects
    from masan.store.cohort import CohortStore, StoreError

    own = cfg.data.store
    try:
        own_store = CohortStore(own)
        subjects, _, _ = select_subjects(own_store, cfg.data, quiet=True)
        return store_geometry(own_store, subjects, used).to_json(), None
    except (OSError, ValueError, StoreError, ContractError):  # ConfigError is a ValueError
        pass  # the run's own store moved, changed or never was: fall back to the shapes
    shapes = Geometry(t1_shape=cfg.model.t1_shape if cfg.data.use_t1 else None,
                      fmri_shape=cfg.model.fmri_shape if cfg.data.use_fmri else None).to_json()
    return shapes, (f"{run_dir} predates {RunDir.STORE_GEOMETRY_NAME} and its store {own} cannot be read: only the "
                    f"input shapes of {store} are checked, not its orientation or voxel size (a store of the same "
                    "shapes stored mirrored would pass); put the run's store back at its path to check them")


@reports_denied("predict")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m masan.predict", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m masan.predict runs/demo --store other/cohort.zarr --out predictions/demo_other")
    ap.add_argument("run_dir", type=path, help="a training run directory (config.yaml + checkpoints/)")
    ap.add_argument("--store", type=str_path,
                    help="cohort store to predict (default: the run's own store and --split part)")
    ap.add_argument("--split", default=None, choices=("train", "val", "test"),
                    help="part of the run's own split to predict when --store is omitted (default test)")
    ap.add_argument("--out", type=path, required=True,
                    help="folder for predictions.csv, region_weights.npy, metrics.json (not inside a store or a "
                         "run directory)")
    ap.add_argument("--device", default="cpu", type=argtypes.torch_device,
                    help="torch device: cpu, cuda, cuda:N (default %(default)s)")
    ap.add_argument("--allow-unfinished", action="store_true",
                    help="predict with a run that has not finished (no DONE), from its newest checkpoint")
    ap.add_argument("--checkpoint", metavar="TAG",
                    help="predict with this checkpoint (e.g. step_000123) instead of the run's final one")
    args = ap.parse_args(argv)
    try:
        with stop_signals():  # SIGTERM too (kill, a job's time limit) ends as Ctrl-C does: in one line
            return _predict(ap, args)
    except KeyboardInterrupt as e:  # an Interrupted from stop_signals, or Ctrl-C before they were set
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}: {args.out} holds its earlier predictions, if "
              "any (a set the stop cut between two files is refused when read); run the same command again",
              file=sys.stderr)
        return 128 + signum


def _predict(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The work of :func:`main` once its arguments are parsed; returns the exit status."""
    if args.store and args.split:  # --store predicts every subject of that store: a part would be ignored
        ap.error(f"--split {args.split} names a part of the run's own split; with --store every subject of that "
                 "store is predicted: leave one of them out")
    args.split = args.split or "test"

    from masan.data.dataset import CohortDataset
    from masan.store.cohort import StoreError

    label = Path(args.store).stem if args.store else args.split
    suggestion = args.run_dir.absolute().parent / f"{args.run_dir.absolute().name}_predictions_{label}"
    try:
        check_out(args.out, suggestion)  # before the model: a refusal costs nothing
        cfg = run_config(args.run_dir)
        chosen = _subjects(cfg, args.run_dir, args.store, args.split)
        for warning in chosen.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        model, cfg, names, tag, note = load_trained_model(args.run_dir, args.device, args.checkpoint,
                                                          args.allow_unfinished, cfg)
        if note:
            print(f"warning: predicting with {RunDir(args.run_dir).checkpoints / tag}: {note}", file=sys.stderr)
        dataset = CohortDataset(chosen.store, chosen.subjects, chosen.labels, cfg.data)
    except (OSError, ConfigError, ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"predicting {len(chosen.subjects)} subjects with {RunDir(args.run_dir).checkpoints / tag}",
          flush=True)  # a cohort on the CPU takes a while: the bar shows on a terminal
    preds = predict_subjects(model, dataset, cfg, args.device, names, seed=cfg.seed, progress=sys.stderr.isatty())
    positive = cfg.data.positive_class
    try:
        metrics = write_access(chosen.store, args.run_dir, args.out,
                               lambda: write_predictions(preds, args.out, names, positive, split=chosen.part))
    except AccessError as e:  # a colleague's file in --out more open than the predictions may be
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        why = disk_refusal(e) or f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
        print(f"error: could not write the predictions into --out {args.out} ({why}); its earlier files, if any, "
              "are as they were: free space there, or pass a folder you may write, with space, as --out",
              file=sys.stderr)
        return 2
    scores = (f"accuracy {metrics['accuracy']:.3f}, {positive}-vs-rest accuracy {metrics['binary_accuracy']:.3f}"
              if "accuracy" in metrics else "no diagnoses: probabilities only")
    if chosen.not_test and "accuracy" in metrics:
        scores += " (not a test accuracy: training subjects included)"
    undefined = undefined_note(metrics) if "accuracy" in metrics else None
    if undefined:
        print(f"note: {undefined}", file=sys.stderr)
    unlabeled = f", {metrics['n_unlabeled']} without a diagnosis" if metrics.get("n_unlabeled") else ""
    used = f"{tag}, {note}" if note else tag
    print(f"{len(preds)} subjects of {chosen.store} predicted with {args.run_dir} ({used}){unlabeled}; {scores} "
          f"-> {args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
