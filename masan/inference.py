"""Inference: the model over a loader, sharded over the ranks and merged; no files, no plots.

Training (validation monitoring, the final test predictions), ``python -m masan.predict`` and
the evaluation tools share this module; the :class:`~masan.predictions.Predictions` it returns
and the files a run directory keeps them in (predictions.csv, region_weights.npy,
metrics.json) belong to :mod:`masan.predictions`. The batch keys the model takes are the model's
(:data:`masan.batch.MODALITY_KEYS`).

Example (every rank; all get the merged predictions)::

    preds = predict_subjects(model, dataset, cfg, device, class_names, rank, world_size, cfg.seed)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from masan.batch import MODALITY_KEYS
from masan.config import ConfigError
from masan.data.workers import data_loader
from masan.model.autoencoder import encoders_only
from masan.predictions import Predictions, PredictionsError, merge_predictions, unsmoothed


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


class NonFiniteOutput(PredictionsError, ConfigError):
    """The model's output is not finite for some subjects: their data (or the weights) are at
    fault, so a restart cannot cure it (launchers exit 2, as for a config error)."""


def check_finite(preds: Predictions) -> Predictions:
    """``preds``, or NonFiniteOutput naming the subjects whose probabilities are not finite (a NaN
    row would be called the first class). On merged predictions every rank raises alike."""
    bad = [s for s, row in zip(preds.subjects, preds.probs) if not np.isfinite(row).all()]
    if bad:
        raise NonFiniteOutput(f"the model's output is not finite for subject(s) {', '.join(bad[:5])}"
                              f"{'...' if len(bad) > 5 else ''} ({len(bad)} of {len(preds.subjects)}): their images "
                              "hold values it cannot take (look at them: python data_tools/inspect_store.py --verify, "
                              "data_tools/qc_report.py) or, if every subject fails, the model's weights are not "
                              "finite; no prediction was written")
    return preds


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
        with torch.no_grad(), encoders_only(model):  # predictions need no reconstruction
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
                probs = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32)
                rows.append(Predictions(
                    subjects=[subjects[i] for i in index],
                    labels=batch["label"].reshape(-1).cpu().numpy().astype(np.int64),
                    probs=probs,
                    region_weights=(rw.float().cpu().numpy().astype(np.float32) if rw is not None
                                    else np.zeros((len(index), 0), np.float32)),
                ))
    finally:
        model.train(was_training)
    if not rows:
        return Predictions([], np.zeros(0, np.int64), np.zeros((0, len(class_names or ())), np.float32),
                           np.zeros((0, 0), np.float32))
    return merge_predictions(rows)


def predict_subjects(model: torch.nn.Module, dataset, cfg, device: torch.device, class_names: list[str],
                     rank: int = 0, world_size: int = 1, seed: int = 0, progress: bool = False) -> Predictions:
    """Collective when ``world_size > 1``: predictions of every subject of ``dataset`` (its
    ``subjects``), sharded over the ranks and merged on every rank. ``cfg`` (a RunConfig) gives
    ``optim.micro_batch``, the loader's ``data`` fields (:func:`~masan.data.workers.data_loader`),
    ``data.decision`` (how a class is called) and ``loss.label_smoothing`` (undone on the
    probabilities: :func:`masan.predictions.unsmoothed`; the head's own kept as ``scores``, which the AUC ranks by);
    ``seed`` seeds the loader's own generator, so the caller's RNG is untouched; ``progress``: a
    bar of the batches."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = data_loader(dataset, cfg.data, batch_size=cfg.optim.micro_batch, sampler=sampler,
                         generator=torch.Generator().manual_seed(seed))
    preds = check_finite(gather_predictions(predict(model, loader, device, class_names=class_names,
                                                    progress=progress)))
    if cfg.loss.label_smoothing:
        preds.scores, preds.probs = preds.probs, unsmoothed(preds.probs, cfg.loss.label_smoothing)
    preds.decision = cfg.data.decision
    return preds
