"""The whole MASAN model (Fig. 1): sPM + fPM -> per-level T1-guided fusion on the regions ->
region self-attention -> MLP classifier.

Data flow for one subject at full resolution (defaults, shapes without the batch axis)::

    T1 (1, 240, 256, 176) --split 4x4x4--> 64 patches (1, 60, 64, 44) --sPM (shared AE)-->
        recon (1, 240, 256, 176); levels 32x60x64x44 .. 128x8x8x6 per patch
        --avg+max pool per patch--> region maps (64, 4, 4, 4), (128, ...), (256, ...), (256, ...)
    fMRI (976, 60, 64, 44) --fPM (frames as channels)--> recon (976, 60, 64, 44);
        levels 32x60x64x44 .. 128x8x8x6 --adaptive avg+max pool--> the same region maps
    per level: fused = T1 + fMRI * Attention_c(T1) * Attention_s(T1)         (eq. 6)
    concat levels -> regions (64, 704) -> self-attention -> (64, 64) -> flatten -> MLP -> logits
    [model.connectivity_cells: + the screened correlations of fMRI cell pairs (masan/model/connectivity.py),
     joined to the MLP's input]

The region head (fusion, attention, classifier) holds well under 1% of the FLOPs; it runs with
autocast off in the parameters' dtype (the engine's bf16, or fp16 with ``train.precision=fp16``:
the fusion gates then run in fp16), with the attention scores in fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from masan.config import ModelConfig
from masan.model.attention import RegionSelfAttention
from masan.model.autoencoder import FunctionalModule, ModalityFeatures, PatchAutoencoder, PatchModule, VolumeModule
from masan.model.blocks import TemporalConv, autocast_off, param_dtype, scale_grad
from masan.model.connectivity import PairConnectivity
from masan.model.fusion import build_fusion
from masan.model.heads import build_classifier
from masan.model.regions import num_regions, region_features


def build_spm(cfg: ModelConfig) -> PatchModule:
    """sPM: one shared patch autoencoder (1 -> 1 channel) over the T1 patch grid."""
    ae = PatchAutoencoder(1, 1, cfg.channels, cfg.groups, cfg.activation_checkpointing, cfg.decoder_skips,
                          cfg.upsample)
    return PatchModule(ae, cfg.patch_grid, cfg.fusion_cells, cfg.region_pool, cfg.patch_chunk, cfg.channels_last, "T1")


def build_fpm(cfg: ModelConfig) -> FunctionalModule:
    """fPM: time as channels (or a temporal conv) -> autoencoder over the volume or its patches."""
    temporal = None
    in_channels = cfg.fmri_frames
    if cfg.fmri_time == "temporal_conv":
        chunk = cfg.temporal_chunk if cfg.activation_checkpointing else 0
        temporal = TemporalConv(cfg.temporal_features, cfg.temporal_kernel, cfg.temporal_stride, chunk)
        in_channels = cfg.temporal_features
    ae = PatchAutoencoder(in_channels, cfg.fmri_frames, cfg.fmri_channels, cfg.groups, cfg.activation_checkpointing,
                          cfg.decoder_skips, cfg.upsample)
    if cfg.fmri_layout == "patches":
        spatial: nn.Module = PatchModule(ae, cfg.patch_grid, cfg.fusion_cells, cfg.region_pool, cfg.patch_chunk,
                                         cfg.channels_last, "fMRI frame")
    else:
        spatial = VolumeModule(ae, cfg.patch_grid, cfg.fusion_cells, cfg.region_pool, cfg.channels_last)
    return FunctionalModule(cfg.fmri_frames, spatial, temporal)


class MASAN(nn.Module):
    """MASAN for ``num_classes`` classes; modalities, fusion and layouts from ``cfg``.

    ``forward(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None)`` returns the dict of
    docs/architecture.md (section Model); inputs of a modality switched off are ignored.
    With ``region_weights=occlusion`` the ``region_weights`` entry exists only in eval mode.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.grid = tuple(cfg.patch_grid)
        self.use_t1 = cfg.modalities in ("both", "t1")
        self.use_fmri = cfg.modalities in ("both", "fmri")
        self.region_weight_source = cfg.region_weights
        self.head_grad_to_encoders = cfg.head_grad_to_encoders
        self.graphs_replayed = False
        """Set by :func:`masan.model.compile_modality_modules` when sPM and fPM replay CUDA graphs:
        passes without gradients then run them eager (see :meth:`region_inputs`)."""
        pools = len(cfg.region_pool)
        widths = [pools * c for c in (cfg.channels if self.use_t1 else cfg.fmri_channels)]
        self.spm = build_spm(cfg) if self.use_t1 else None
        self.fpm = build_fpm(cfg) if self.use_fmri else None
        self.fusion = None
        if self.use_t1 and self.use_fmri:
            if len(cfg.channels) != len(cfg.fmri_channels):
                raise ValueError(
                    f"model.channels {cfg.channels} and model.fmri_channels {cfg.fmri_channels} must have the "
                    "same number of levels: fusion pairs the levels of sPM and fPM"
                )
            self.fusion = nn.ModuleList(
                build_fusion(cfg.fusion, w, pools * cf, cfg.channel_reduction, cfg.spatial_kernel)
                for w, cf in zip(widths, cfg.fmri_channels)
            )
        self.connectivity = (PairConnectivity(self.grid, cfg.connectivity_cells, cfg.connectivity_keep, num_classes,
                                              cfg.region_std_floor)
                             if self.use_fmri and cfg.connectivity_cells else None)
        region_dim = sum(widths) * cfg.fusion_cells**3
        self.attention = RegionSelfAttention(region_dim, cfg.attn_dim, cfg.value_dim, num_regions(self.grid),
                                             cfg.region_norm, cfg.region_std_floor,
                                             cfg.screen_keep(num_regions(self.grid) * region_dim),
                                             num_classes)
        pairs = self.connectivity.keep if self.connectivity is not None else 0
        self.classifier = build_classifier(cfg.head, num_regions(self.grid) * cfg.value_dim + pairs, cfg.mlp_hidden,
                                           num_classes, cfg.dropout)

    def _encode(self, name: str, module: nn.Module | None, x: torch.Tensor | None,
                out: dict[str, torch.Tensor]) -> ModalityFeatures | None:
        if module is None:
            return None
        if x is None:
            raise ValueError(
                f"the model uses {name} (model.modalities) but the batch has no {name}; "
                f"enable it in the data (data.use_{name}) or set model.modalities"
            )
        feats = module(x)
        if feats.recon is not None:  # None inside autoencoder.encoders_only
            out[f"{name}_recon"] = feats.recon
        out[f"{name}_code"] = feats.code
        return feats

    def _fuse(self, t1: ModalityFeatures | None, fmri: ModalityFeatures | None) -> list[torch.Tensor]:
        """Per level, the region maps of the modalities fused (eq. 6). The classifier's gradient
        reaches the encoders scaled by ``head_grad_to_encoders``, and the fusion in full: its
        attention gates are part of the head (with the scaling after the fusion they never
        learnt, and every T1 feature kept its random share of fMRI)."""
        dtype = param_dtype(self.attention)

        def head_input(maps: list[torch.Tensor]) -> list[torch.Tensor]:
            return [scale_grad(m.to(dtype), self.head_grad_to_encoders) for m in maps]

        if t1 is None or fmri is None:
            return head_input((t1 or fmri).region_maps)
        return [f(a, b) for f, a, b in zip(self.fusion, head_input(t1.region_maps), head_input(fmri.region_maps))]

    def region_inputs(self, t1: torch.Tensor | None = None, fmri: torch.Tensor | None = None,
                      out: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The fused region features the head standardises and screens, ``(B, R, D)`` with
        ``D = sum_l M * c_l * fusion_cells^3``; ``out`` (when given) receives the encoders' outputs
        (reconstructions, codes) as :meth:`forward` returns them."""
        out = {} if out is None else out
        # without a pending backward, each compiled call starts a new CUDA-graph generation, so
        # fPM's replay would overwrite sPM's outputs before the fusion reads them: passes without
        # gradients (predictions, monitoring, standardiser fits) run the modules eager instead
        eager = self.graphs_replayed and not torch.is_grad_enabled()
        with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
            s = self._encode("t1", self.spm, t1, out)
            f = self._encode("fmri", self.fpm, fmri, out)
        with autocast_off((t1 if s is not None else fmri).device):
            return torch.cat([region_features(m, self.grid) for m in self._fuse(s, f)], dim=2)

    def forward(self, t1: torch.Tensor | None = None, fmri: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        regions = self.region_inputs(t1, fmri, out)  # (B, R, D)
        with autocast_off(regions.device):
            standardized = self.attention.norm(regions)
            new, weights = self.attention.attend(standardized)
            pairs = self.connectivity(fmri).to(new.dtype) if self.connectivity is not None else None
            out["logits"] = self._classify(new, pairs)
            if self.region_weight_source == "occlusion" and not self.training:
                # an attribution for reports, never a training signal: R extra head passes per
                # subject were a sixth of a small model's training step on the CPU
                out["region_weights"] = self._occlusion(standardized.detach(), pairs, out["logits"].detach())
        out["attention"] = weights
        if self.region_weight_source == "embedding":
            norms = regions.float().norm(dim=2)
            out["region_weights"] = norms / norms.sum(dim=1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
        elif self.region_weight_source == "attention":
            out["region_weights"] = weights.mean(dim=1)  # attention each region receives; sums to 1
        return out

    def _classify(self, new: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(B, C)`` from the attended regions ``(B, R, value_dim)`` and the kept
        connectivity pairs ``(B, keep)`` (None without connectivity)."""
        joined = new.flatten(1) if pairs is None else torch.cat([new.flatten(1), pairs], dim=1)
        return self.classifier(joined)

    @torch.no_grad()
    def _occlusion(self, standardized: torch.Tensor, pairs: torch.Tensor | None,
                   logits: torch.Tensor) -> torch.Tensor:
        """How much each region carries the decision: region ``r``'s standardised features are
        set to 0 (the training cohort's mean), and the change of the class probabilities is
        measured as their total-variation distance ``0.5 * sum_c |p_c - p_c^(r)|``; normalised
        to sum to 1 per subject. ``(B, R, D)``, logits ``(B, C)`` -> ``(B, R)``.

        Signed-agnostic on purpose: a region that pushes towards any class counts. Costs R
        passes of the region head (attention + MLP), well under 1 % of the encoders.
        """
        b, r, _ = standardized.shape
        new = self.attention.attend_occluded(standardized)  # (B * R, R, value_dim)
        was = self.classifier.training
        self.classifier.eval()  # no dropout in an attribution
        pairs = pairs.detach().repeat_interleave(r, dim=0) if pairs is not None else None  # the same per copy
        probs = torch.softmax(self._classify(new, pairs).float(), dim=-1).reshape(b, r, -1)
        self.classifier.train(was)
        change = 0.5 * (probs - torch.softmax(logits.float(), dim=-1)[:, None]).abs().sum(-1)  # (B, R)
        return change / change.sum(dim=1, keepdim=True).clamp_min(torch.finfo(change.dtype).tiny)
