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
``metrics.json`` (the layout of a run directory).

What is refused (exit 2, the message names the file and the fix), all before any inference:

- an ``--out`` that is an existing file, or lies inside a cohort store or a training run
  directory (it would put files into the store, or overwrite the run's own predictions);
  checked before the model is loaded;
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
import json
import sys
from pathlib import Path

import torch

from masan import argtypes
from masan.config import ConfigError, RunConfig, load_config
from masan.inference import predict_subjects
from masan.predictions import write_predictions
from masan.rundir import RunDir, ended_early
from masan.train.checkpoint import TAG_RE, CheckpointManager, checkpoint_problem, final_tag, load_model, previous_intact


class PredictRefused(ValueError):
    """predict will not run on these arguments; the message names the file and the fix."""


# ---------------------------------------------------------------------- where the output goes


def check_out(out: Path, suggestion: Path) -> None:
    """Refuse (PredictRefused) an ``--out`` predict must not write to
    (:func:`masan.store.places.output_folder_problem`). Called before the model is loaded: a
    refusal costs nothing."""
    from masan.store.places import output_folder_problem

    problem = output_folder_problem(out, suggestion, "predictions.csv, region_weights.npy and metrics.json")
    if problem:
        raise PredictRefused(problem)


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


def unfinished(run_dir: Path, cfg: RunConfig) -> str | None:
    """Why the run is not finished (None: ``DONE`` for this config and all its epochs)."""
    rd = RunDir(run_dir)
    done = rd.finished(cfg)
    if done is None:
        why = (f"{rd.done} does not exist" if not rd.done.exists() else
               f"{rd.done} belongs to another target or config than {rd.config}")
        return f"the run has not finished ({why}: it stopped or is still training)"
    if ended_early(done, cfg):
        return (f"the run stopped at train.max_steps={cfg.train.max_steps} after {done['epochs_done']} of its "
                f"{sum(cfg.epochs.values())} epochs ({rd.done})")
    return None


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


def load_trained_model(run_dir: Path, device: torch.device, checkpoint: str | None = None,
                       allow_unfinished: bool = False) -> tuple[torch.nn.Module, RunConfig, list[str], str, str]:
    """The run's model with the weights of its final checkpoint (or ``checkpoint``), verified,
    in the run's precision. Returns (model in eval mode, config, class names, checkpoint tag,
    a note on how trained it is: ``""`` for a finished run's final checkpoint)."""
    config = RunDir(run_dir).config
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run_dir} is not a training run directory "
                                "(train one with launch/train_local.py or launch/submit.py)")
    cfg = load_config(config)
    why_unfinished = unfinished(run_dir, cfg)
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
    return load_model(run_dir, cfg, tag, device), cfg, list(cfg.data.classes), tag, note


def _subjects(cfg: RunConfig, run_dir: Path, store: str | None, part: str):
    from masan.data.dataset import select_subjects
    from masan.data.splits import Split

    if store is None:
        store = cfg.data.store
        subjects, labels, _ = select_subjects(store, cfg.data)
        label_of = dict(zip(subjects, labels))
        chosen = Split.load(RunDir(run_dir).split).part(part)
        missing = [s for s in chosen if s not in label_of]
        if missing:
            raise ConfigError(f"{RunDir(run_dir).split} names subjects not in {store}: {missing[:5]}; "
                              "pass the store the run was trained on with --store")
        return store, chosen, [label_of[s] for s in chosen], part
    subjects, labels, _ = select_subjects(store, cfg.data, unlabeled=True)
    check_contract(cfg, run_dir, store, subjects)
    return store, subjects, labels, "external"


def check_contract(cfg: RunConfig, run_dir: Path, store: str, subjects: list[str]) -> None:
    """Refuse (ContractError) a store whose geometry differs from the one the run trained on
    (``store_geometry.json``; for runs older than it, the model's input shapes)."""
    from masan.data.contract import ContractError, Geometry, mismatches, store_geometry
    from masan.data.dataset import used_modalities
    from masan.store.cohort import CohortStore

    path = RunDir(run_dir).store_geometry
    trained = (json.loads(path.read_text()) if path.is_file() else
               Geometry(t1_shape=cfg.model.t1_shape if cfg.data.use_t1 else None,
                        fmri_shape=cfg.model.fmri_shape if cfg.data.use_fmri else None).to_json())
    geo = store_geometry(CohortStore(store), subjects, used_modalities(cfg.data))
    frames = (cfg.data.fmri_frames or cfg.model.fmri_frames) if cfg.data.use_fmri else None
    problems = mismatches(trained, geo, frames)
    if problems:
        raise ContractError(f"{store} does not have the geometry {run_dir} was trained on:\n  - "
                            + "\n  - ".join(problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m masan.predict", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m masan.predict runs/demo --store other/cohort.zarr --out predictions/demo_other")
    ap.add_argument("run_dir", type=Path, help="a training run directory (config.yaml + checkpoints/)")
    ap.add_argument("--store", help="cohort store to predict (default: the run's own store and --split part)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="part of the run's own split to predict when --store is omitted (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for predictions.csv, region_weights.npy, metrics.json (not inside a store or a "
                         "run directory)")
    ap.add_argument("--device", default="cpu", type=argtypes.torch_device,
                    help="torch device: cpu, cuda, cuda:N (default %(default)s)")
    ap.add_argument("--allow-unfinished", action="store_true",
                    help="predict with a run that has not finished (no DONE), from its newest checkpoint")
    ap.add_argument("--checkpoint", metavar="TAG",
                    help="predict with this checkpoint (e.g. step_000123) instead of the run's final one")
    args = ap.parse_args(argv)

    from masan.data.dataset import CohortDataset
    from masan.store.cohort import StoreError

    label = Path(args.store).stem if args.store else args.split
    suggestion = args.run_dir.absolute().parent / f"{args.run_dir.absolute().name}_predictions_{label}"
    try:
        check_out(args.out, suggestion)  # before the model: a refusal costs nothing
        model, cfg, names, tag, note = load_trained_model(args.run_dir, args.device,
                                                          args.checkpoint, args.allow_unfinished)
        if note:
            print(f"warning: predicting with {RunDir(args.run_dir).checkpoints / tag}: {note}", file=sys.stderr)
        store, subjects, labels, part = _subjects(cfg, args.run_dir, args.store, args.split)
        dataset = CohortDataset(store, subjects, labels, cfg.data)
    except (OSError, ConfigError, ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preds = predict_subjects(model, dataset, cfg, args.device, names, seed=cfg.seed)
    metrics = write_access(store, args.run_dir, args.out,
                           lambda: write_predictions(preds, args.out, names, cfg.data.positive_class, split=part))
    scores = (f"accuracy {metrics['accuracy']:.3f}, AD-vs-rest accuracy {metrics['binary_accuracy']:.3f}"
              if "accuracy" in metrics else "no diagnoses: probabilities only")
    unlabeled = f", {metrics['n_unlabeled']} without a diagnosis" if metrics.get("n_unlabeled") else ""
    used = f"{tag}, {note}" if note else tag
    print(f"{len(preds)} subjects of {store} predicted with {args.run_dir} ({used}){unlabeled}; {scores} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
