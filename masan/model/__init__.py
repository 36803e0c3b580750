"""MASAN and its H-FCN baseline: ``build_model(model_cfg, num_classes)``.

Modules, one idea each: :mod:`~masan.model.blocks` (3D conv blocks), :mod:`~masan.model.fastpaths`
(which fast path the blocks take, per model and device), :mod:`~masan.model.regions`
(patch grid helpers), :mod:`~masan.model.autoencoder` (Table 1 autoencoder, sPM, fPM),
:mod:`~masan.model.fusion` (eq. 6), :mod:`~masan.model.attention` (eq. 3-5),
:mod:`~masan.model.masan` (Fig. 1), :mod:`~masan.model.hfcn` (baseline),
:mod:`~masan.model.loss` (eq. 1, 7, 8), :mod:`~masan.model.summary` (sizes at full resolution).
See docs/paper-mapping.md for how each paper element maps here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from masan.config import ModelConfig, load_config
from masan.model.fastpaths import FastPaths, use_fast_paths
from masan.model.hfcn import HFCN
from masan.model.loss import masan_loss
from masan.model.masan import MASAN

__all__ = ["build_model", "compile_modality_modules", "masan_loss", "small_model_config", "FastPaths", "MASAN",
           "HFCN"]

TINY_CONFIG = Path(__file__).resolve().parents[2] / "hpc" / "configs" / "tiny.yaml"
"""The smallest MASAN that keeps every structural feature (4 levels, odd sizes excepted): the
one tiny config of the tests and benches."""


def small_model_config(**changes) -> ModelConfig:
    """The model of hpc/configs/tiny.yaml, small enough for CPU tests and smoke runs (T1 32^3 in
    2x2x2 patches, fMRI 6 frames of 16^3, widths 4/8/8/8), with ``changes`` applied on top."""
    return dataclasses.replace(load_config(TINY_CONFIG).model, **changes)


def build_model(model_cfg: ModelConfig, num_classes: int, fast_paths: FastPaths | None = None) -> nn.Module:
    """The model ``model_cfg.arch`` names (``masan`` or ``hfcn``) for ``num_classes`` classes.

    ``forward(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None) -> dict`` as described in
    docs/architecture.md (section Model). Parameters are fp32 and contiguous, also with
    ``channels_last`` (which lays out the activations: a conv follows its input's layout, and
    DeepSpeed refuses channels-last parameters: it broadcasts each one viewed as bytes).
    ``fast_paths`` (:mod:`masan.model.fastpaths`): which fast path every block takes; None (training):
    each input's device default.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes (see data.classes)")
    if model_cfg.arch == "hfcn":
        model: nn.Module = HFCN(model_cfg, num_classes)
    elif model_cfg.arch == "masan":
        model = MASAN(model_cfg, num_classes)
    else:
        raise ValueError(f"model.arch={model_cfg.arch!r}: use 'masan' or 'hfcn'")
    return use_fast_paths(model, fast_paths)


COMPILED_MODULES = ("spm", "fpm", "patches")
"""The attributes :func:`compile_modality_modules` compiles where a model has them: MASAN's sPM
and fPM, the H-FCN's patch encoder."""


def compile_modality_modules(model: nn.Module, backend: str = "inductor", mode: str = "default") -> list[str]:
    """``torch.compile`` the model's modality modules in place (``nn.Module.compile``: parameters
    and ``state_dict`` keys unchanged) and return their names; ``mode`` is inductor's
    (``model.compile_mode``), ignored by other backends.

    Those hold the full-resolution convolutions, norms and pooling, nearly all of a step's time;
    the fusion, attention, heads and fitted standardisers are small and stay eager. Each module
    traces to one graph (tests/test_model_blocks.py), so a new mode (``eval``, ``no_grad``,
    :func:`~masan.model.autoencoder.encoders_only`) costs one more compile, not a slow path.
    With ``reduce-overhead`` (CUDA graphs), MASAN's passes without gradients run them eager
    (:attr:`masan.model.masan.MASAN.graphs_replayed`).
    """
    names = [n for n in COMPILED_MODULES if isinstance(getattr(model, n, None), nn.Module)]
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    for n in names:
        getattr(model, n).compile(backend=backend, **options)
    if hasattr(model, "graphs_replayed"):
        model.graphs_replayed = options.get("mode") == "reduce-overhead"
    return names
