"""MASAN and its H-FCN baseline: ``build_model(model_cfg, num_classes)``.

Modules, one idea each: :mod:`~masan.model.blocks` (3D conv blocks), :mod:`~masan.model.regions`
(patch grid helpers), :mod:`~masan.model.autoencoder` (Table 1 autoencoder, sPM, fPM),
:mod:`~masan.model.fusion` (eq. 6), :mod:`~masan.model.attention` (eq. 3-5),
:mod:`~masan.model.masan` (Fig. 1), :mod:`~masan.model.hfcn` (baseline),
:mod:`~masan.model.loss` (eq. 1, 7, 8), :mod:`~masan.model.summary` (sizes at full resolution).
See docs/paper-mapping.md for how each paper element maps here.
"""

from __future__ import annotations

import torch
from torch import nn

from masan.config import ModelConfig
from masan.model.hfcn import HFCN
from masan.model.loss import masan_loss
from masan.model.masan import MASAN

__all__ = ["build_model", "masan_loss", "small_model_config", "MASAN", "HFCN"]

SMALL_MODEL = dict(
    t1_shape=[32, 32, 32], fmri_shape=[16, 16, 16], fmri_frames=6, patch_grid=[2, 2, 2],
    channels=[4, 8, 8, 8], fmri_channels=[4, 8, 8, 8], groups=4, attn_dim=8, value_dim=8, mlp_hidden=16,
    temporal_features=4, temporal_kernel=3, temporal_stride=1, temporal_chunk=512,
    hfcn_features=8, hfcn_region_group=1, dropout=0.0,
)
"""The smallest MASAN that keeps every structural feature (4 levels, odd sizes excepted)."""


def small_model_config(**changes) -> ModelConfig:
    """A :class:`ModelConfig` small enough for CPU tests and smoke runs (T1 32^3 in 2x2x2
    patches, fMRI 6 frames of 16^3, widths 4/8/8/8), with ``changes`` applied on top."""
    return ModelConfig(**{**SMALL_MODEL, **changes})


def build_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model ``model_cfg.arch`` names (``masan`` or ``hfcn``) for ``num_classes`` classes.

    ``forward(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None) -> dict`` as described in
    docs/architecture.md (section Model). Parameters are fp32; with ``channels_last`` the conv
    weights use ``torch.channels_last_3d``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes (see data.classes)")
    if model_cfg.arch == "hfcn":
        model: nn.Module = HFCN(model_cfg, num_classes)
    elif model_cfg.arch == "masan":
        model = MASAN(model_cfg, num_classes)
    else:
        raise ValueError(f"model.arch={model_cfg.arch!r}: use 'masan' or 'hfcn'")
    if model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model
