"""The patch autoencoder (Table 1) and the two modality modules built on it: sPM and fPM.

:class:`PatchAutoencoder` is Table 1 and its mirror: ``InitConv (C_in -> c0)`` then one
:class:`~masan.model.blocks.DownStage` per further width (``[Conv stride 2, ResidualBlock]``),
and a decoder of :class:`~masan.model.blocks.UpStage` (trilinear upsampling + skip concat)
ending in :class:`~masan.model.blocks.OutputStage`. With widths 32/64/128/128 and a 60x64x44
input the levels are 60x64x44, 30x32x22, 15x16x11 and 8x8x6 (the bottleneck).

:class:`PatchModule` runs one shared autoencoder over every patch of the grid (sPM; fPM with
``fmri_layout=patches``); :class:`VolumeModule` runs it over the whole volume (fPM with
``fmri_layout=volume``). Both return :class:`ModalityFeatures`: the reconstruction, the
bottleneck code and, per encoder level, the feature map pooled onto the regions ("multiscale").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from masan.model.blocks import DownStage, OutputStage, TemporalConv, UpStage, conv3d, param_dtype, run_block
from masan.model.fastpaths import TakesFastPaths
from masan.model.regions import merge_patches, num_regions, pool_cells, pool_volume, split_patches


@dataclass
class ModalityFeatures:
    """What a modality module hands to fusion and to the loss."""

    recon: torch.Tensor | None
    """Reconstruction, same shape as the module's input (B, C_in, X, Y, Z); None for an
    encoder-only module (the H-FCN baseline)."""
    code: torch.Tensor
    """Bottleneck encoding: (B, R, c_L, d, h, w) per patch, or (B, c_L, d, h, w) for a volume."""
    region_maps: list[torch.Tensor]
    """Per encoder level l: (B, M*c_l, Gx*k, Gy*k, Gz*k), M pooling modes, k fusion cells."""


class Encoder(nn.Module):
    """``InitConv`` then ``len(channels) - 1`` down stages.

    Input ``(N, C_in, D, H, W)`` -> list of level features, level ``l`` of shape
    ``(N, channels[l], ceil(D / 2^l), ceil(H / 2^l), ceil(W / 2^l))``; the last is the bottleneck.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], groups: int, checkpointed: bool = False):
        super().__init__()
        self.init_conv = conv3d(in_channels, channels[0])
        self.stages = nn.ModuleList(DownStage(channels[i], channels[i + 1], groups) for i in range(len(channels) - 1))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.init_conv(x)]
        for stage in self.stages:
            feats.append(run_block(stage, feats[-1], checkpointed=self.checkpointed))
        return feats


class EncoderOnly(nn.Module):
    """An :class:`Encoder` with the :class:`PatchAutoencoder` interface: ``x -> (None, features)``."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[None, list[torch.Tensor]]:
        return None, self.encoder(x)


SKIP_MODES = ("all", "coarse", "none")


def skip_used(mode: str, level: int) -> bool:
    """Does the decoder concatenate encoder level ``level`` (0 = full resolution)?
    ``all``: every level (Table 1's concatenations); ``coarse``: all but full resolution, so the
    reconstruction must pass through at least one downsampled level; ``none``: only the code."""
    if mode not in SKIP_MODES:
        raise ValueError(f"model.decoder_skips={mode!r}: use one of {list(SKIP_MODES)}")
    return mode == "all" or (mode == "coarse" and level > 0)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: level features (deepest last) -> ``(N, out_channels, D, H, W)``;
    ``skips`` (:func:`skip_used`) says which encoder levels are concatenated."""

    def __init__(self, channels: Sequence[int], out_channels: int, groups: int, checkpointed: bool = False,
                 skips: str = "all", upsample: str = "trilinear"):
        super().__init__()
        ups = [UpStage(channels[lv + 1], channels[lv], channels[lv], groups, skip_used(skips, lv), upsample)
               for lv in range(len(channels) - 2, 0, -1)]
        self.stages = nn.ModuleList([*ups, OutputStage(channels[1], channels[0], out_channels, skip_used(skips, 0),
                                                       upsample)])
        self.checkpointed = checkpointed

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for skip, stage in zip(reversed(feats[:-1]), self.stages):
            x = run_block(stage, x, skip, checkpointed=self.checkpointed)
        return x


class PatchAutoencoder(nn.Module):
    """Table 1's encoder, its symmetric decoder, with encoder-decoder skip concatenation
    (at the levels ``skips`` names, :func:`skip_used`).

    Input ``(N, C_in, D, H, W)`` -> ``(reconstruction (N, C_out, D, H, W), level features)``.
    ``checkpointed`` recomputes every down/up stage in backward (only stage inputs are kept).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], groups: int,
                 checkpointed: bool = False, skips: str = "all", upsample: str = "trilinear"):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"model channels {list(channels)}: give InitConv's width and at least one level")
        self.encoder = Encoder(in_channels, channels, groups, checkpointed)
        self.decoder = Decoder(channels, out_channels, groups, checkpointed, skips, upsample)
        self.decode = True
        """False (:func:`encoders_only`): no reconstruction, ``(None, level features)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        feats = self.encoder(x)
        return (self.decoder(feats) if self.decode else None), feats


@contextlib.contextmanager
def encoders_only(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`PatchAutoencoder` of ``model`` skips its decoder: the
    model's outputs have no ``*_recon`` (None), everything else is unchanged. For passes that
    use only the classification path (fitting the standardisers, predictions), where the
    decoders, which mirror the encoders at every resolution, would be a large share of the
    forward for outputs nobody reads (docs/validation-cohort.md)."""
    autoencoders = [m for m in model.modules() if isinstance(m, PatchAutoencoder)]
    for m in autoencoders:
        m.decode = False
    try:
        yield
    finally:
        for m in autoencoders:
            m.decode = True


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class PatchModule(TakesFastPaths, nn.Module):
    """One shared :class:`PatchAutoencoder` over every patch of the grid (the paper's sPM).

    Input ``(B, C, X, Y, Z)`` with each axis a multiple of the grid. The ``B*R`` patches go
    through the autoencoder as one batch, or ``chunk`` patches at a time: each chunk's level
    features are pooled onto their regions at once (full-resolution maps are never
    concatenated), and with activation checkpointing a backward recomputes one chunk's stage
    at a time, which bounds the recomputation peak. A change inside patch ``i`` changes only
    patch ``i``'s reconstruction, code and region features.
    """

    def __init__(self, autoencoder: PatchAutoencoder | EncoderOnly, grid: Sequence[int], cells: int,
                 modes: Sequence[str], chunk: int = 0, channels_last: bool = False, what: str = "T1"):
        super().__init__()
        self.autoencoder = autoencoder
        self.grid, self.cells, self.modes = tuple(grid), cells, tuple(modes)
        self.chunk, self.channels_last, self.what = chunk, channels_last, what

    def forward(self, x: torch.Tensor) -> ModalityFeatures:
        b = x.shape[0]
        patches = split_patches(x.to(param_dtype(self)), self.grid, self.what)
        if self.channels_last:
            patches = patches.contiguous(memory_format=torch.channels_last_3d)
        recons, codes, pooled = [], [], []
        for part in patches.split(self.chunk) if self.chunk > 0 else [patches]:
            recon, feats = self.autoencoder(part)
            if recon is not None:
                recons.append(recon)
            codes.append(feats[-1])
            pooled.append([pool_cells(f, self.cells, self.modes, self.fast_paths) for f in feats])
        maps = [merge_patches(_cat(list(level)), self.grid) for level in zip(*pooled)]
        code = _cat(codes)
        return ModalityFeatures(
            recon=merge_patches(_cat(recons), self.grid) if recons else None,
            code=code.reshape(b, num_regions(self.grid), *code.shape[1:]),
            region_maps=maps,
        )


class VolumeModule(TakesFastPaths, nn.Module):
    """A :class:`PatchAutoencoder` over the whole volume; level features pooled onto the grid.

    Input ``(B, C, X, Y, Z)`` of any size; see :func:`~masan.model.regions.pool_volume` for
    how level maps whose size does not divide by the grid are shared between regions.
    """

    def __init__(self, autoencoder: PatchAutoencoder, grid: Sequence[int], cells: int, modes: Sequence[str],
                 channels_last: bool = False):
        super().__init__()
        self.autoencoder = autoencoder
        self.grid, self.cells, self.modes = tuple(grid), cells, tuple(modes)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> ModalityFeatures:
        x = x.to(param_dtype(self))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        recon, feats = self.autoencoder(x)
        maps = [pool_volume(f, self.grid, self.cells, self.modes, self.fast_paths) for f in feats]
        return ModalityFeatures(recon=recon, code=feats[-1], region_maps=maps)


class FunctionalModule(nn.Module):
    """fPM: how time enters (frames as channels, or :class:`TemporalConv`) then the spatial
    module (:class:`PatchModule` or :class:`VolumeModule`) whose decoder outputs the T frames.

    Input ``(B, T, X, Y, Z)`` with ``T == frames``; reconstruction has the same shape.
    """

    def __init__(self, frames: int, spatial: nn.Module, temporal: TemporalConv | None = None):
        super().__init__()
        self.frames = frames
        self.temporal = temporal
        self.spatial = spatial

    def forward(self, fmri: torch.Tensor) -> ModalityFeatures:
        if fmri.shape[1] != self.frames:
            raise ValueError(
                f"fMRI input has {fmri.shape[1]} frames but the model was built for model.fmri_frames="
                f"{self.frames}; set model.fmri_frames to the frames the data yields (data.fmri_frames)"
            )
        if self.temporal is not None:
            fmri = self.temporal(fmri.to(param_dtype(self)))
        return self.spatial(fmri)
