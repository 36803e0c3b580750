"""Cohort standardisation of region features, fitted on the training subjects.

Registered MRI of different subjects share most of their anatomy, so each pooled region
feature is mostly an offset every subject has (nearly all of its magnitude on the phantom
cohort: docs/architecture.md, "Model") with the between-subject differences that carry the
diagnosis small on top of it.
A classifier fed raw features sees a nearly constant input; a per-subject norm (LayerNorm)
cannot remove a shared offset. :class:`FittedStandardize` subtracts the cohort mean of each
feature and divides by its cohort standard deviation.

The statistics are *fitted*, not running averages: a no-grad pass over every training
subject (:func:`masan.train.standardize.fit_standardizers`, after pretraining and at chosen
refreshes) accumulates sums and sums of squares in fp64, all-reduced over the data-parallel
ranks, so every rank holds the same statistics, they are frozen between fits, and a model
behaves identically in training and evaluation. They live in fp32 buffers even when an engine
casts the model to bf16 (a bf16 mean of so large an offset would leave only quantisation noise),
and they are part of the checkpoint, so evaluation is reproducible from it alone on any number
of ranks. The features themselves arrive in the engine's dtype: in a bf16 run, a feature whose
mean is large against its spread carries its bf16 rounding (relative 2^-9 of its value) into
the standardised value.

A small ``std_floor`` (a fraction of the median std of the layer's features) keeps a nearly
constant feature (a region of background, say) from being divided by ~0 and amplifying noise
and its gradients.

**Screening** (``keep > 0``): the same pass also accumulates the sums per class, and only the
``keep`` features with the largest one-way ANOVA F statistic (between-class over within-class
variance, on the training subjects) pass; the others are set to 0, the cohort mean. This is the
univariate screening that neuroimaging decoders put before their classifier (nilearn's
``Decoder(screening_percentile=...)``, ANOVA-SVM): with tens of training subjects and tens of
thousands of region features, a classifier given all of them memorises the training subjects,
while a few hundred subjects would be needed to find a focal effect among them (see
docs/paper-mapping.md, "Learning a realistic cohort").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def anova_f(counts: torch.Tensor, s: torch.Tensor, sq: torch.Tensor, floor_var: float) -> torch.Tensor:
    """One-way ANOVA F per feature over the classes present: ``counts`` ``(C,)``, per-class sums
    ``s`` and sums of squares ``sq`` ``(C, *shape)`` -> ``(*shape)`` in their dtype.

    ``F = [sum_c n_c (m_c - m)^2 / (k - 1)] / [sum_c (sq_c - n_c m_c^2) / (n - k)]``; the
    within-class variance is at least ``floor_var``, so a nearly constant feature cannot win
    on rounding noise."""
    present = counts > 0
    k, n = int(present.sum()), float(counts.sum())
    if k < 2 or n <= k:
        raise ValueError(
            f"screening (model.screen_features, model.connectivity_keep) needs at least 2 classes and more "
            f"subjects than classes in the training split; got {k} class(es), {int(n)} subject(s)"
        )
    counts, s, sq = counts[present].to(s.dtype), s[present], sq[present]
    shape = (-1,) + (1,) * (s.dim() - 1)
    class_mean = s / counts.view(shape)
    grand = s.sum(0) / n
    between = (counts.view(shape) * (class_mean - grand) ** 2).sum(0) / (k - 1)
    within = ((sq - counts.view(shape) * class_mean**2).sum(0) / (n - k)).clamp_min(0.0)
    return between / within.clamp_min(floor_var)


class FittedStatistics(nn.Module):
    """A module whose statistics are fitted on the training subjects by
    :func:`masan.train.standardize.fit_standardizers`: :meth:`begin_fit`, then forwards (each
    after :meth:`set_labels`), :meth:`sums` all-reduced over ranks, then :meth:`end_fit`
    (or :meth:`cancel_fit`). The buffers named in ``FP32_BUFFERS`` stay fp32 when an engine
    casts the model to bf16."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self._sums: list[torch.Tensor] | None = None
        self._labels: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # engines cast models with module.to(bf16): keep the statistics fp32, follow the device only
        saved = {name: self._buffers[name] for name in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        return self

    @property
    def collecting(self) -> bool:
        return self._sums is not None

    def begin_fit(self) -> None:
        raise NotImplementedError

    def end_fit(self, rescreen: bool = True) -> None:
        raise NotImplementedError

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Classes ``(B,)`` (int64 in ``[0, num_classes)``) of the samples of the next forward
        during a fit; ignored without screening."""
        self._labels = labels

    def sums(self) -> list[torch.Tensor]:
        """The sums accumulated since :meth:`begin_fit` (leading axis = class), for an
        all-reduce over ranks before :meth:`end_fit`."""
        if self._sums is None:
            raise RuntimeError(f"{type(self).__name__}.sums() outside begin_fit()/end_fit()")
        return self._sums

    def cancel_fit(self) -> None:
        """Stop accumulating without changing the statistics (a fit that failed part way)."""
        self._sums, self._labels = None, None

    def _finish(self, what: str) -> tuple[torch.Tensor, ...]:
        """Stop accumulating; from the (all-reduced) sums: ``(counts, sums, sums of squares, n,
        mean, std)`` over all classes, std with the ``n - 1`` correction and ``self.eps`` added to
        the variance (ValueError naming ``what`` below 2 samples)."""
        counts, s, sq = self.sums()
        self._sums, self._labels = None, None
        n = float(counts.sum())
        if n < 2:
            raise ValueError(f"cannot fit {what} statistics on {int(n)} sample(s); the training split needs at least 2")
        mean = s.sum(0) / n
        std = ((sq.sum(0) / n - mean * mean).clamp_min(0.0) * (n / (n - 1))).add(self.eps).sqrt()
        return counts, s, sq, n, mean, std

    @torch.no_grad()
    def _accumulate_rows(self, rows: torch.Tensor) -> None:
        """Add ``(B, F)`` rows (no gradient) to the per-class count, sum and sum of squares, in
        the sums' own dtype."""
        x = rows.to(self._sums[1].dtype)
        onehot = self._class_onehot(x.shape[0], x.dtype, x.device)
        self._sums[0] += onehot.sum(0).to(self._sums[0].dtype)
        self._sums[1] += (onehot.T @ x).view_as(self._sums[1])
        self._sums[2] += (onehot.T @ (x * x)).view_as(self._sums[2])

    def _class_onehot(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(batch, num_classes)`` one-hot rows of the labels given by :meth:`set_labels` (one
        column of ones with a single class); the labels are used once."""
        if self.num_classes == 1:
            return torch.ones(batch, 1, dtype=dtype, device=device)
        if self._labels is None or self._labels.shape[0] != batch:
            raise RuntimeError(f"{type(self).__name__} with screening: call set_labels(labels) before each "
                               "forward of a fit (masan.train.standardize.fit_standardizers does)")
        onehot = torch.nn.functional.one_hot(self._labels.to(device).long(), self.num_classes).to(dtype)
        self._labels = None
        return onehot


class FittedStandardize(FittedStatistics):
    """``(B, *shape)`` -> ``keep_mask * (x - mean) / std`` per element of ``shape``; fp32 statistics.

    Until the first fit the statistics are the identity (mean 0, std 1, every feature kept).
    Between :meth:`begin_fit` and :meth:`end_fit` every forward also accumulates its input (no
    gradient) into fp64 sums per class; with screening, :meth:`set_labels` gives the classes of
    the next forward's samples.

    Args:
        shape: feature shape without the batch axis, e.g. ``(R, D)`` regions x features.
        std_floor: std is at least ``std_floor * median(std)`` (0: only ``eps``).
        eps: absolute floor of the variance.
        keep: screening: pass only the ``keep`` features of largest ANOVA F (0: all).
        num_classes: classes of the labels given to :meth:`set_labels` (needed when ``keep``).
    """

    FP32_BUFFERS = ("mean", "std", "keep_mask")

    def __init__(self, shape: tuple[int, ...], std_floor: float, eps: float = 1e-6, keep: int = 0,
                 num_classes: int = 1):
        if keep < 0:
            raise ValueError(f"model.screen_features={keep} must be >= 0 (0: no screening)")
        if keep and num_classes < 2:
            raise ValueError("screening (model.screen_features > 0) needs at least 2 classes")
        super().__init__(num_classes if keep else 1)
        self.std_floor, self.eps, self.keep = std_floor, eps, int(keep)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("keep_mask", torch.ones(shape))
        self.register_buffer("fitted_samples", torch.zeros((), dtype=torch.long))

    @property
    def screening(self) -> bool:
        return self.keep > 0

    def begin_fit(self) -> None:
        """Start accumulating the inputs of the following forwards: ``[count, sum, sum of
        squares]`` per class, fp64."""
        dev, c = self.mean.device, self.num_classes
        self._sums = [torch.zeros(c, dtype=torch.float64, device=dev),
                      torch.zeros((c, *self.mean.shape), dtype=torch.float64, device=dev),
                      torch.zeros((c, *self.mean.shape), dtype=torch.float64, device=dev)]

    @torch.no_grad()
    def end_fit(self, rescreen: bool = True) -> None:
        """Set mean/std (and the screening mask) from the (all-reduced) sums; stop accumulating.

        ``rescreen=False`` keeps the screening mask of an earlier fit (the first fit always
        screens): the head keeps seeing the same features, only re-centred and re-scaled."""
        counts, s, sq, n, mean, std = self._finish("feature")
        if self.std_floor > 0:
            std = std.clamp_min(self.std_floor * std.median())
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        if not self.screening:
            self.keep_mask.fill_(1.0)
        elif rescreen or int(self.fitted_samples) == 0:
            floor = (std.median() * self.std_floor) ** 2 if self.std_floor > 0 else self.eps
            f_stat = anova_f(counts, s, sq, max(float(floor), self.eps))
            mask = torch.zeros(f_stat.numel(), dtype=self.keep_mask.dtype, device=f_stat.device)
            mask[torch.topk(f_stat.flatten(), min(self.keep, f_stat.numel())).indices] = 1.0
            self.keep_mask.copy_(mask.view(f_stat.shape))
        self.fitted_samples.fill_(int(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sums is not None:
            self._accumulate_rows(x.reshape(x.shape[0], -1))
        return ((x.float() - self.mean) / self.std * self.keep_mask).to(x.dtype)


def standardizers(model: nn.Module) -> Iterator[FittedStatistics]:
    """Every :class:`FittedStatistics` inside ``model`` (standardisers, connectivity screens), in
    module order (the same on all ranks)."""
    return (m for m in model.modules() if isinstance(m, FittedStatistics))
