"""Apply a trained run to a cohort: ``python -m masan.predict RUN_DIR [--store STORE] --out DIR``.

External validation (a finished run on another cohort, as ClinicaDL's ``predict``) and the
run's own final evaluation use the same function, :func:`masan.inference.predict_subjects`, so
a run's test predictions can be reproduced from its directory alone: the model is rebuilt from
``RUN_DIR/config.yaml`` and loaded from the newest complete checkpoint (weights and the fitted
cohort standardisers), in the run's precision, on any number of ranks.

Which subjects: with ``--store`` omitted, the run's own store and its ``--split`` part
(default ``test``) from ``RUN_DIR/split.json``; with another store, every subject of the run's
classes (``data.classes``/``data.merge``) that has the modalities the run uses. The store must
have the run's input shapes. Writes ``DIR/predictions.csv``, ``region_weights.npy`` and
``metrics.json`` (the layout of a run directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from masan.config import ConfigError, RunConfig, load_config
from masan.inference import predict_subjects
from masan.model.inputs import PRECISION_DTYPES as DTYPES
from masan.rundir import RunDir


def load_trained_model(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, RunConfig, list[str], str]:
    """The run's model with the weights of its newest complete checkpoint, in the run's precision.
    Returns (model in eval mode, config, class names, checkpoint tag)."""
    from masan.model import build_model
    from masan.train.checkpoint import CheckpointManager

    config = RunDir(run_dir).config
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run_dir} is not a training run directory "
                                "(train one with launch/train_local.py or launch/submit.py)")
    cfg = load_config(config)
    tags = CheckpointManager(run_dir, keep=1).complete_tags()
    if not tags:
        raise FileNotFoundError(f"{RunDir(run_dir).checkpoints} holds no complete checkpoint; train the run first")
    states = torch.load(RunDir(run_dir).checkpoints / tags[0] / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    class_names = list(cfg.data.classes)
    model = build_model(cfg.model, len(class_names))
    model.load_state_dict(states["module"])
    return model.to(device, DTYPES[cfg.train.precision]).eval(), cfg, class_names, tags[0]


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
    from masan.data.store import CohortStore

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
        epilog="Example: python -m masan.predict runs/demo --store other/cohort.zarr --out runs/demo/external")
    ap.add_argument("run_dir", type=Path, help="a training run directory (config.yaml + checkpoints/)")
    ap.add_argument("--store", help="cohort store to predict (default: the run's own store and --split part)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="part of the run's own split to predict when --store is omitted (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for predictions.csv, region_weights.npy, metrics.json")
    ap.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    args = ap.parse_args(argv)

    from masan.data.dataset import CohortDataset
    from masan.evaluate.predict import write_predictions

    try:
        model, cfg, names, tag = load_trained_model(args.run_dir, torch.device(args.device))
        store, subjects, labels, part = _subjects(cfg, args.run_dir, args.store, args.split)
        dataset = CohortDataset(store, subjects, labels, cfg.data)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preds = predict_subjects(model, dataset, cfg, torch.device(args.device), names, seed=cfg.seed)
    metrics = write_predictions(preds, args.out, names, cfg.data.positive_class, split=part)
    scores = (f"accuracy {metrics['accuracy']:.3f}, AD-vs-rest accuracy {metrics['binary_accuracy']:.3f}"
              if "accuracy" in metrics else "no diagnoses: probabilities only")
    unlabeled = f", {metrics['n_unlabeled']} without a diagnosis" if metrics.get("n_unlabeled") else ""
    print(f"{len(preds)} subjects of {store} predicted with {args.run_dir} ({tag}){unlabeled}; {scores} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
