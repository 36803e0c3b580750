"""Cohort standardisation of region features, fitted on the training subjects.

Registered MRI of different subjects share most of their anatomy, so each pooled region
feature is mostly an offset every subject has (about 95 % of its magnitude on the phantom
cohort) with the between-subject differences that carry the diagnosis small on top of it.
A classifier fed raw features sees a nearly constant input; a per-subject norm (LayerNorm)
cannot remove a shared offset. :class:`FittedStandardize` subtracts the cohort mean of each
feature and divides by its cohort standard deviation.

The statistics are *fitted*, not running averages: a no-grad pass over every training
subject (:func:`masan.train.standardize.fit_standardizers`, after pretraining and at chosen
refreshes) accumulates sums and sums of squares in fp64, all-reduced over the data-parallel
ranks, so every rank holds the same statistics, they are frozen between fits, and a model
behaves identically in training and evaluation. They live in fp32 buffers even when an engine
casts the model to bf16 (a bf16 mean of a 95 % offset would leave only quantisation noise),
and they are part of the checkpoint, so evaluation is reproducible from it alone on any number
of ranks.

A small ``std_floor`` (a fraction of the median std of the layer's features) keeps a nearly
constant feature (a region of background, say) from being divided by ~0 and amplifying noise
and its gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class FittedStandardize(nn.Module):
    """``(B, *shape)`` -> ``(x - mean) / std`` per element of ``shape``; fp32 statistics.

    Until the first fit the statistics are the identity (mean 0, std 1). Between
    :meth:`begin_fit` and :meth:`end_fit` every forward also accumulates its input (no
    gradient) into fp64 sums.

    Args:
        shape: feature shape without the batch axis, e.g. ``(R, D)`` regions x features.
        std_floor: std is at least ``std_floor * median(std)`` (0: only ``eps``).
        eps: absolute floor of the variance.
    """

    def __init__(self, shape: tuple[int, ...], std_floor: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.std_floor, self.eps = std_floor, eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("fitted_samples", torch.zeros((), dtype=torch.long))
        self._sums: list[torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        # engines cast models with module.to(bf16): keep the statistics fp32, follow the device only
        saved = {name: self._buffers[name] for name in ("mean", "std")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        return self

    @property
    def collecting(self) -> bool:
        return self._sums is not None

    def begin_fit(self) -> None:
        """Start accumulating the inputs of the following forwards."""
        dev = self.mean.device
        self._sums = [torch.zeros((), dtype=torch.float64, device=dev),
                      torch.zeros(self.mean.shape, dtype=torch.float64, device=dev),
                      torch.zeros(self.mean.shape, dtype=torch.float64, device=dev)]

    def sums(self) -> list[torch.Tensor]:
        """``[count, sum, sum of squares]`` accumulated since :meth:`begin_fit` (fp64), for an
        all-reduce over ranks before :meth:`end_fit`."""
        if self._sums is None:
            raise RuntimeError("FittedStandardize.sums() outside begin_fit()/end_fit()")
        return self._sums

    def cancel_fit(self) -> None:
        """Stop accumulating without changing the statistics (a fit that failed part way)."""
        self._sums = None

    @torch.no_grad()
    def end_fit(self) -> None:
        """Set mean/std from the (all-reduced) sums and stop accumulating."""
        count, s, sq = self.sums()
        self._sums = None
        n = float(count)
        if n < 2:
            raise ValueError(f"cannot fit feature statistics on {int(n)} sample(s); the training split needs at least 2")
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0) * (n / (n - 1))
        std = var.add(self.eps).sqrt()
        if self.std_floor > 0:
            std = std.clamp_min(self.std_floor * std.median())
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        self.fitted_samples.fill_(int(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sums is not None:
            with torch.no_grad():
                xd = x.detach().double()
                self._sums[0] += xd.shape[0]
                self._sums[1] += xd.sum(0)
                self._sums[2] += (xd * xd).sum(0)
        return ((x.float() - self.mean) / self.std).to(x.dtype)


def standardizers(model: nn.Module) -> Iterator[FittedStandardize]:
    """Every :class:`FittedStandardize` inside ``model``, in module order (the same on all ranks)."""
    return (m for m in model.modules() if isinstance(m, FittedStandardize))
