"""The H-FCN baseline of the paper's Table 2, built to be as fair to MASAN as its design allows.

**The paper's H-FCN** is Lian, Liu, Zhang and Shen, "Hierarchical fully convolutional network
for joint atrophy localization and Alzheimer's disease diagnosis using structural MRI", IEEE
TPAMI 42(4), 880-893, 2020 (doi:10.1109/TPAMI.2018.2889096). The MASAN paper describes it as a
CNN that "hierarchically identif[ies] patch-level and region-level" locations in the whole-brain
T1 and as "the H-FCN without the autoencoder structure". In Lian et al.: T1 only; a patch level
of sub-networks on local patches, a region level over groups of neighbouring patches and a
subject level over all of them, each with its own classification output and loss, learnt
jointly, with uninformative patches and regions pruned away (the localisation of the atrophy).

**Ours** (``model.arch=hfcn``), levels on the same patch grid as MASAN (``model.patch_grid``):

* patch level: MASAN's sPM (:func:`~masan.model.masan.build_spm`: the shared Table 1 patch
  autoencoder), every encoder level pooled onto ``model.fusion_cells`` cells per patch and axis
  by ``model.region_pool``: exactly the region features of MASAN's T1 branch, ``(B, R, D)`` with
  ``D = len(region_pool) * sum(channels) * fusion_cells**3``; standardised as MASAN's are
  (:func:`patch_norm`); a shared linear map to ``hfcn_features`` with ReLU; a learned patch
  gate in (0, 1) (Lian et al.'s pruning of patches, here soft);
* region level: a conv with kernel = stride = ``hfcn_region_group`` over the grid of gated
  patch features merges neighbouring patches into regions (2x2x2 patches by default);
* subject level: the region features, flattened, through the MLP classifier.

Its encoder learns as sPM does, so that the head is the only difference from MASAN's T1
branch: the decoder's reconstruction (``alpha * Ls`` of eq. 8) trains it in every phase the run
has (:attr:`masan.config.RunConfig.epochs`), and the classifier's gradient reaches it scaled by
``model.head_grad_to_encoders`` (default 0, as MASAN; 1 is end to end). Where it differs from
Lian et al.: the patches are the non-overlapping grid, not chosen locations; a reconstruction
term they do not have; one loss at the subject level (eq. 7) instead of one per level; soft
gates instead of pruning.

``forward(t1=(B, 1, X, Y, Z), fmri=None)`` -> ``{"logits" (B, C), "region_weights" (B, R),
"t1_recon" (B, 1, X, Y, Z), "t1_code" (B, R, c_L, d, h, w)}`` (no ``t1_recon`` inside
:func:`~masan.model.autoencoder.encoders_only`); the region weights are the patch gates
normalised to sum to 1 per subject (R = patches of the grid, as in MASAN).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from masan.config import ModelConfig
from masan.model.blocks import Conv3d, autocast_off, param_dtype, scale_grad
from masan.model.heads import build_classifier
from masan.model.masan import build_spm
from masan.model.regions import num_regions, region_features
from masan.model.standardize import FittedStandardize


def patch_norm(cfg: ModelConfig, width: int, num_classes: int) -> nn.Module:
    """``model.region_norm`` over patch features ``(B, R, width)``: the cohort standardiser (with
    the screening of ``model.screen_features`` / ``screen_fraction``) or a LayerNorm per patch, as
    MASAN's region head has."""
    regions = num_regions(cfg.patch_grid)
    if cfg.region_norm == "cohort":
        return FittedStandardize((regions, width), cfg.region_std_floor, keep=cfg.screen_keep(regions * width),
                                 num_classes=num_classes)
    if cfg.screen_keep(regions * width):
        raise ValueError("model.screen_features needs model.region_norm=cohort (screening is fitted with the "
                         "cohort statistics)")
    return nn.LayerNorm(width)


class HFCN(nn.Module):
    """Hierarchical patch -> region -> subject classifier on T1 (see module docstring)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        group = cfg.hfcn_region_group
        if any(g % group for g in cfg.patch_grid):
            raise ValueError(
                f"model.hfcn_region_group={group} must divide every axis of model.patch_grid {cfg.patch_grid}"
            )
        self.grid = tuple(cfg.patch_grid)
        self.head_grad_to_encoders = cfg.head_grad_to_encoders
        self.patches = build_spm(cfg)
        width, feats = len(cfg.region_pool) * sum(cfg.channels) * cfg.fusion_cells**3, cfg.hfcn_features
        self.norm = patch_norm(cfg, width, num_classes)
        self.patch_level = nn.Sequential(nn.Conv3d(width, feats, 1), nn.ReLU())
        self.patch_gate = nn.Sequential(nn.Conv3d(feats, 1, 1), nn.Sigmoid())
        self.region_level = nn.Sequential(Conv3d(feats, feats, group, stride=group), nn.ReLU())
        regions = math.prod(g // group for g in cfg.patch_grid)
        self.subject_level = build_classifier(cfg.head, regions * feats, cfg.mlp_hidden, num_classes, cfg.dropout)

    def forward(self, t1: torch.Tensor | None = None, fmri: torch.Tensor | None = None  # noqa: ARG002 - MASAN's signature
                ) -> dict[str, torch.Tensor]:
        if t1 is None:
            raise ValueError("the H-FCN baseline (model.arch=hfcn) needs T1; enable data.use_t1")
        t1_feats = self.patches(t1)
        out = {"t1_code": t1_feats.code}
        if t1_feats.recon is not None:  # None inside autoencoder.encoders_only
            out["t1_recon"] = t1_feats.recon
        dtype = param_dtype(self.patch_level)
        with autocast_off(t1.device):
            per_patch = torch.cat([region_features(scale_grad(m.to(dtype), self.head_grad_to_encoders), self.grid)
                                   for m in t1_feats.region_maps], dim=2)  # (B, R, D)
            standardized = self.norm(per_patch)
            b, _, d = standardized.shape
            patch = self.patch_level(standardized.transpose(1, 2).reshape(b, d, *self.grid))  # R in C order
            gate = self.patch_gate(patch)  # (B, 1, Gx, Gy, Gz)
            region = self.region_level(patch * gate)
            out["logits"] = self.subject_level(region.flatten(1))
        gate = gate.flatten(1).float()
        out["region_weights"] = gate / gate.sum(dim=1, keepdim=True)
        return out
