"""H-FCN-style baseline (Lian et al., TPAMI 2020), the paper's comparison (Table 2): T1 only,
no autoencoder, three levels of decision.

* patch level: the T1 patch grid through one shared encoder (sPM's encoder, no decoder); the
  bottleneck of each patch is avg+max pooled to a vector, standardised over the training
  cohort like MASAN's regions (``model.region_norm``), mapped to ``hfcn_features`` and
  gated by a learned patch score in (0, 1) (H-FCN's patch-level localisation of
  discriminative patches, here soft instead of pruned);
* region level: a conv with kernel = stride = ``hfcn_region_group`` over the grid of gated
  patch features merges neighbouring patches into regions (2x2x2 patches by default);
* subject level: the region features, flattened, through the MLP classifier.

Training: the classifier's gradient reaches the encoder scaled by ``model.head_grad_to_encoders``
(as MASAN's); at the default 0 the encoder keeps its initial weights (H-FCN has no
reconstruction term) and the three levels above it learn. End to end it collapsed to one class
on the realistic cohort (docs/paper-mapping.md).

``forward(t1, fmri=None)`` -> ``{"logits" (B, C), "region_weights" (B, R)}``; the region weights
are the patch gates normalised to sum to 1 per subject (R = patches of the grid, as in MASAN).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from masan.config import ModelConfig
from masan.model.autoencoder import Encoder, EncoderOnly, PatchModule
from masan.model.blocks import MLPClassifier, autocast_off, param_dtype, scale_grad
from masan.model.standardize import FittedStandardize


class HFCN(nn.Module):
    """Hierarchical patch -> region -> subject classifier on T1 (see module docstring)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        group = cfg.hfcn_region_group
        if any(g % group for g in cfg.patch_grid):
            raise ValueError(
                f"model.hfcn_region_group={group} must divide every axis of model.patch_grid {cfg.patch_grid}"
            )
        self.head_grad_to_encoders = cfg.head_grad_to_encoders
        encoder = EncoderOnly(Encoder(1, cfg.channels, cfg.groups, cfg.activation_checkpointing))
        self.patches = PatchModule(encoder, cfg.patch_grid, 1, cfg.region_pool, cfg.patch_chunk,
                                   cfg.channels_last, "T1")
        width, feats = len(cfg.region_pool) * cfg.channels[-1], cfg.hfcn_features
        # the same cohort standardisation as MASAN's regions, so the baseline is not handicapped
        self.norm = (FittedStandardize((width, *cfg.patch_grid), cfg.region_std_floor, keep=cfg.screen_features,
                                       num_classes=num_classes)
                     if cfg.region_norm == "cohort" else nn.Identity())
        self.patch_level = nn.Sequential(nn.Conv3d(width, feats, 1), nn.ReLU())
        self.patch_gate = nn.Sequential(nn.Conv3d(feats, 1, 1), nn.Sigmoid())
        self.region_level = nn.Sequential(nn.Conv3d(feats, feats, group, stride=group), nn.ReLU())
        regions = math.prod(g // group for g in cfg.patch_grid)
        self.subject_level = MLPClassifier(regions * feats, cfg.mlp_hidden, num_classes, cfg.dropout)

    def forward(self, t1: torch.Tensor | None = None, fmri: torch.Tensor | None = None  # noqa: ARG002 - MASAN's signature
                ) -> dict[str, torch.Tensor]:
        if t1 is None:
            raise ValueError("the H-FCN baseline (model.arch=hfcn) needs T1; enable data.use_t1")
        deepest = scale_grad(self.patches(t1).region_maps[-1], self.head_grad_to_encoders)  # (B, M*c_L, Gx, Gy, Gz)
        with autocast_off(t1.device):
            patch = self.patch_level(self.norm(deepest.to(param_dtype(self.patch_level))))
            gate = self.patch_gate(patch)  # (B, 1, Gx, Gy, Gz)
            region = self.region_level(patch * gate)
            logits = self.subject_level(region.flatten(1))
        gate = gate.flatten(1).float()
        return {"logits": logits, "region_weights": gate / gate.sum(dim=1, keepdim=True)}
