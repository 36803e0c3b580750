"""Fitting the model's cohort standardisers: one no-grad pass over every training subject.

Called by the training loop at the start of the joint phase (after pretraining) and every
``train.norm_refresh_epochs`` joint epochs after that. Each rank forwards its own share of the
training subjects (every subject exactly once over all ranks, no padding), the fp64 sums of
every :class:`~masan.model.standardize.FittedStandardize` are all-reduced, and every rank sets
the same statistics. They then stay frozen until the next fit and travel in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from masan.batch import MODALITY_KEYS
from masan.config import DataConfig
from masan.data.workers import data_loader
from masan.model.autoencoder import encoders_only
from masan.model.standardize import standardizers


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t)


@torch.no_grad()
def fit_standardizers(model: torch.nn.Module, dataset: Dataset, rank: int, world_size: int,
                      device: torch.device, dtype: torch.dtype, micro_batch: int, loading: DataConfig | None = None,
                      rescreen: bool = True) -> int:
    """Collective: fit every standardiser of ``model`` on ``dataset``; returns how many there are.

    ``rescreen=False`` keeps the screening masks of an earlier fit (see
    :meth:`~masan.model.standardize.FittedStandardize.end_fit`).

    ``model`` is the plain module (``engine.module``); inputs are cast to ``dtype`` as in
    training; ``loading`` says how items are read (its worker fields, :func:`~masan.data.workers.data_loader`;
    None: in this process). The model is in eval mode during the pass (no dropout) and restored afterwards.
    """
    norms = list(standardizers(model))
    if not norms:
        return 0
    share = list(range(rank, len(dataset), world_size))
    loader = data_loader(torch.utils.data.Subset(dataset, share), loading or DataConfig(num_workers=0),
                         batch_size=micro_batch)
    was = model.training
    model.eval()
    for n in norms:
        n.begin_fit()
    try:
        with encoders_only(model):  # the region features need no reconstruction
            for batch in loader:
                for n in norms:  # screening standardisers need the classes; the others ignore them
                    n.set_labels(batch.get("label"))
                model(**{k: batch[k].to(device, dtype=dtype) if k in batch else None for k in MODALITY_KEYS})
        _all_reduce([t for n in norms for t in n.sums()])
        for n in norms:
            n.end_fit(rescreen)
    except BaseException:
        for n in norms:
            n.cancel_fit()
        raise
    finally:
        model.train(was)
    return len(norms)
