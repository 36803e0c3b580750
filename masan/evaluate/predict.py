"""Model predictions over a loader, and the run directory's prediction files.

Files written by :func:`write_predictions` (read back by :func:`load_predictions`)::

    run_dir/predictions.csv     subject, split, label, pred, prob_<class>...   (class names in
                                label/pred; the prob_ columns give the class order; rows of the
                                evaluated split first, sorted by subject)
    run_dir/region_weights.npy  (N_eval, R) float32, row i = i-th evaluated-split row of the CSV
    run_dir/metrics.json        metrics of the evaluated split (masan.evaluate.metrics), plus
                                "split" and, for extra splits, "by_split": {name: metrics}

Example (end of training, rank 0 after :func:`gather_predictions`)::

    preds = gather_predictions(predict(engine, test_loader, device, torch.bfloat16))
    write_predictions(preds, run_dir, class_names, cfg.data.positive_class)
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from masan.evaluate.metrics import classification_metrics, flat_scalars
from masan.model.inputs import MODALITY_KEYS

PREDICTIONS_FILE = "predictions.csv"
REGION_WEIGHTS_FILE = "region_weights.npy"
METRICS_FILE = "metrics.json"
PROB_PREFIX = "prob_"


class PredictionsError(ValueError):
    """Prediction inputs or files are inconsistent; the message names the file or subject."""


@dataclass
class Predictions:
    """Per-subject model outputs of one split.

    Attributes:
        subjects: N subject ids, sorted.
        labels: (N,) int64 true class index.
        probs: (N, C) float32 softmax probabilities.
        region_weights: (N, R) float32 region weights (R = 0 when the model gives none).
    """

    subjects: list[str]
    labels: np.ndarray
    probs: np.ndarray
    region_weights: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        """(N,) int64 arg-max class."""
        return self.probs.argmax(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.subjects)


def merge_predictions(parts: Iterable[Predictions]) -> Predictions:
    """Concatenate predictions, keep one row per subject (a DistributedSampler pads with
    repeats) and sort by subject."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise PredictionsError("no predictions to merge (every part is empty)")
    subjects = [s for p in parts for s in p.subjects]
    first = {}
    for i, s in enumerate(subjects):
        first.setdefault(s, i)
    keep = [first[s] for s in sorted(first)]
    return Predictions(
        subjects=sorted(first),
        labels=np.concatenate([p.labels for p in parts])[keep],
        probs=np.concatenate([p.probs for p in parts])[keep],
        region_weights=np.concatenate([p.region_weights for p in parts])[keep],
    )


def gather_predictions(preds: Predictions) -> Predictions:
    """Merge every rank's predictions (collective: call on all ranks; all get the result).
    Without an initialised process group this returns ``preds`` merged with itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return merge_predictions([preds])
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, preds)
    return merge_predictions(parts)


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """Floating dtype of the model's parameters (bf16 under a DeepSpeed bf16 engine)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def predict(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    class_names: Sequence[str] | None = None,
    subjects: Sequence[str] | None = None,
    progress: bool = False,
) -> Predictions:
    """Run the model over a loader without gradients and collect its outputs.

    Args:
        model: module (or DeepSpeed engine) called as ``model(t1=..., fmri=...)`` returning a
            dict with ``"logits"`` (B, C) and optionally ``"region_weights"`` (B, R).
        loader: yields CohortDataset batches: ``"label"`` (B,), ``"index"`` (B,) and the
            modalities switched on (``"t1"`` (B,1,X,Y,Z), ``"fmri"`` (B,T,x,y,z)); an absent
            modality is passed as None.
        device: where the model lives; batches are moved there and cast to the dtype of
            the model's parameters.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under ``torch.autocast``; None: off.
        class_names: when given, the logits width is checked against it.
        subjects: the subject of each dataset index; default ``loader.dataset.subjects``.
        progress: show a tqdm bar.

    Returns:
        :class:`Predictions` of the subjects this loader visits (one rank's share under a
        DistributedSampler: see :func:`gather_predictions`), sorted by subject. The model's
        train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    if subjects is None:
        subjects = getattr(getattr(loader, "dataset", None), "subjects", None)
        if subjects is None:
            raise PredictionsError("predict() needs subjects=...: the loader's dataset has no .subjects list")
    dtype = _input_dtype(model)
    rows: list[Predictions] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
                inputs = {
                    k: batch[k].to(device, dtype=dtype, non_blocking=True) if k in batch else None
                    for k in MODALITY_KEYS
                }
                amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                       else contextlib.nullcontext())
                with amp:
                    out = model(**inputs)
                logits = out["logits"].float()
                if class_names is not None and logits.shape[1] != len(class_names):
                    raise PredictionsError(
                        f"model gives {logits.shape[1]} logits but there are {len(class_names)} classes "
                        f"{list(class_names)}; build the model with num_classes={len(class_names)}"
                    )
                rw = out.get("region_weights")
                index = batch["index"].reshape(-1).tolist()
                rows.append(Predictions(
                    subjects=[subjects[i] for i in index],
                    labels=batch["label"].reshape(-1).cpu().numpy().astype(np.int64),
                    probs=torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32),
                    region_weights=(rw.float().cpu().numpy().astype(np.float32) if rw is not None
                                    else np.zeros((len(index), 0), np.float32)),
                ))
    finally:
        model.train(was_training)
    if not rows:
        return Predictions([], np.zeros(0, np.int64), np.zeros((0, len(class_names or ())), np.float32),
                           np.zeros((0, 0), np.float32))
    return merge_predictions(rows)


def prediction_metrics(preds: Predictions, class_names: Sequence[str], positive_class: str) -> dict:
    """:func:`masan.evaluate.metrics.classification_metrics` of a :class:`Predictions`."""
    return classification_metrics(preds.labels, preds.preds, class_names, positive_class, preds.probs)


def epoch_metrics(preds: Predictions, class_names: Sequence[str], positive_class: str) -> dict[str, float]:
    """Flat ``tag -> value`` metrics for TensorBoard scalars: accuracy, binary_accuracy,
    precision, recall, f1 (positive vs rest), auc, nll, and ``precision/<class>`` etc.
    Pair with :func:`masan.evaluate.figures.confusion_figure` for the matrix."""
    return flat_scalars(prediction_metrics(preds, class_names, positive_class))


def prediction_csv_rows(preds: Predictions, split: str, class_names: Sequence[str]) -> list[dict]:
    """predictions.csv rows: subject, split, label, pred (class names), prob_<class>."""
    rows = []
    for s, y, p, pr in zip(preds.subjects, preds.labels, preds.preds, preds.probs):
        row = {"subject": s, "split": split, "label": class_names[y], "pred": class_names[p]}
        row.update({f"{PROB_PREFIX}{c}": f"{v:.6g}" for c, v in zip(class_names, pr)})
        rows.append(row)
    return rows


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_predictions(
    preds: Predictions,
    run_dir: str | os.PathLike,
    class_names: Sequence[str],
    positive_class: str,
    split: str = "test",
    extra: Mapping[str, Predictions] | None = None,
) -> dict:
    """Write predictions.csv, region_weights.npy and metrics.json into ``run_dir`` (each
    atomically).

    Args:
        preds: predictions of the evaluated split (its metrics go to metrics.json, its
            region weights to region_weights.npy).
        run_dir: the run directory.
        class_names: C class names in model output order.
        positive_class: the positive class of precision/recall (the paper: AD).
        split: name of the evaluated split.
        extra: more splits (e.g. ``{"train": ...}``) appended to the CSV, their metrics under
            ``by_split`` in metrics.json.

    Returns:
        The metrics dict written to metrics.json.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    if preds.probs.shape[1:] != (len(names),):
        raise PredictionsError(f"predictions have {preds.probs.shape[1:]} classes, class_names {names}")
    metrics = {"split": split, **prediction_metrics(preds, names, positive_class)}
    rows = prediction_csv_rows(preds, split, names)
    if extra:
        metrics["by_split"] = {}
        for name, p in extra.items():
            metrics["by_split"][name] = prediction_metrics(p, names, positive_class)
            rows += prediction_csv_rows(p, name, names)

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["subject", "split", "label", "pred"] + [PROB_PREFIX + c for c in names])
            w.writeheader()
            w.writerows(rows)

    _atomic_write(run / PREDICTIONS_FILE, write_csv)
    with (run / (REGION_WEIGHTS_FILE + ".tmp")).open("wb") as f:  # np.save appends .npy to bare paths
        np.save(f, preds.region_weights.astype(np.float32))
    os.replace(run / (REGION_WEIGHTS_FILE + ".tmp"), run / REGION_WEIGHTS_FILE)
    _atomic_write(run / METRICS_FILE, lambda tmp: tmp.write_text(json.dumps(metrics, indent=1)))
    return metrics


def load_predictions(run_dir: str | os.PathLike, split: str = "test") -> tuple[Predictions, list[str]]:
    """Read back one split of a run's predictions.csv (+ region_weights.npy for the evaluated
    split; an empty (N, 0) array when the file is absent or belongs to another split).

    Returns:
        (predictions, class_names)
    """
    run = Path(run_dir)
    path = run / PREDICTIONS_FILE
    if not path.is_file():
        raise PredictionsError(f"{path} does not exist: the run has not written its predictions yet")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        names = [c[len(PROB_PREFIX):] for c in reader.fieldnames or [] if c.startswith(PROB_PREFIX)]
        all_rows = list(reader)
    if not names or not {"subject", "split", "label", "pred"} <= set(reader.fieldnames or ()):
        raise PredictionsError(f"{path} lacks the columns subject, split, label, pred, prob_<class>")
    rows = [r for r in all_rows if r["split"] == split]
    eval_split = all_rows[0]["split"] if all_rows else split
    try:
        labels = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
        probs = np.array([[float(r[PROB_PREFIX + c]) for c in names] for r in rows], dtype=np.float32)
    except ValueError as e:
        raise PredictionsError(f"{path}: a label is not one of {names} or a probability is not a number ({e})"
                               ) from None
    rw = np.zeros((len(rows), 0), np.float32)
    if split == eval_split and (run / REGION_WEIGHTS_FILE).is_file():
        rw = np.load(run / REGION_WEIGHTS_FILE)
        if rw.shape[0] != len(rows):
            raise PredictionsError(
                f"{run / REGION_WEIGHTS_FILE} has {rw.shape[0]} rows but {path} has {len(rows)} '{split}' rows; "
                f"the files come from different runs: rerun the evaluation of this run"
            )
    probs = probs.reshape(len(rows), len(names))
    return Predictions([r["subject"] for r in rows], labels, probs, rw), names
