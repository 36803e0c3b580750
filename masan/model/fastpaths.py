"""Which fast path each of the model's blocks takes: one typed setting per model, with a
default per device type.

The fast paths compute what the plain PyTorch operators compute (tests/test_model_blocks.py
compares them), by operators that are cheaper on one device and not on another
(docs/performance.md, "Where the step went" and "On the target card"). A model holds one
:class:`FastPaths` or None; None takes :meth:`FastPaths.for_device` of each input's device,
which is what training uses. The benchmarks pass their A/B choices in with
:func:`use_fast_paths` (or ``build_model(..., fast_paths=...)``), and so do the tests.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

OUTCONV_MODES = ("taps", "channels_last", "plain")
POINTWISE_MODES = ("bmm", "conv")


@dataclasses.dataclass(frozen=True)
class FastPaths:
    """The choices, each named for the block that makes it; the defaults are the plain operators.

    * ``outconv``: how :class:`~masan.model.blocks.NarrowConv3d` (the T1 output conv, very few
      output channels) runs: ``taps`` (a 1x1x1 conv to one map per kernel tap, then the maps
      shifted and summed: its weight gradient is a matrix product), ``channels_last`` (the
      input in channels_last_3d) or ``plain`` (:class:`torch.nn.Conv3d`).
    * ``pointwise``: how 1x1x1 convolutions (:func:`~masan.model.blocks.pointwise`) run:
      ``bmm`` (a matrix product in the input's layout) or ``conv`` (cuDNN/oneDNN, which for
      bf16 NCDHW converts every tensor to channels-last and back).
    * ``fold``: :class:`~masan.model.blocks.OutputStage` folds the output conv's per-tap 1x1
      conv of the upsampled half into the decoder's 1x1 projection, before upsampling (only
      with ``outconv=taps`` and the full-resolution skip).
    * ``reshaped_pool``: region pooling onto equal blocks as a reduction over a reshaped view
      instead of the adaptive pooling kernels (the same bins).
    * ``block_max``: that reshaped max with an index backward (one arg-max voxel per block
      takes the gradient, as max pooling gives it); False: ``amax`` and autograd's backward,
      which splits the gradient over ties with full-resolution mask passes.
    * ``separable_mean``: the mean onto unequal bins (where the pooling cannot reshape) as
      separable matrix products instead of adaptive average pooling (whose backward
      scatters with atomic adds).
    """

    outconv: str = "plain"
    pointwise: str = "conv"
    fold: bool = False
    reshaped_pool: bool = False
    block_max: bool = True
    separable_mean: bool = False

    def __post_init__(self):
        if self.outconv not in OUTCONV_MODES:
            raise ValueError(f"FastPaths.outconv={self.outconv!r}: use one of {list(OUTCONV_MODES)}")
        if self.pointwise not in POINTWISE_MODES:
            raise ValueError(f"FastPaths.pointwise={self.pointwise!r}: use one of {list(POINTWISE_MODES)}")

    @classmethod
    def for_device(cls, device_type: str) -> FastPaths:
        """The paths the model takes on ``device_type`` unless told otherwise: on CUDA every
        fast path; on the CPU only the output conv's taps (faster than oneDNN's conv there; the
        adaptive pooling kernels and oneDNN's 1x1 convs are the faster ones, and the unfolded
        output stage keeps the CPU's results comparable with the CPU figures of
        docs/performance.md); elsewhere (meta, mps) the plain operators."""
        if device_type == "cuda":
            return cls(outconv="taps", pointwise="bmm", fold=True, reshaped_pool=True, separable_mean=True)
        if device_type == "cpu":
            return cls(outconv="taps")
        return cls()


def resolve(paths: FastPaths | None, x: torch.Tensor) -> FastPaths:
    """``paths``, or where None the default for ``x``'s device (:meth:`FastPaths.for_device`)."""
    return FastPaths.for_device(x.device.type) if paths is None else paths


class TakesFastPaths:
    """Mixin of the modules that choose a fast path: ``fast_paths`` (a :class:`FastPaths`, or None
    for each input's device default), set for a whole model by :func:`use_fast_paths`."""

    fast_paths: FastPaths | None = None


def use_fast_paths(model: nn.Module, paths: FastPaths | None) -> nn.Module:
    """Every block of ``model`` that chooses a fast path takes ``paths`` (None: each input's
    device default) from now on; returns ``model``."""
    for module in model.modules():
        if isinstance(module, TakesFastPaths):
            module.fast_paths = paths
    return model
