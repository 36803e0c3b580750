"""Configs whose model cannot be built or evaluated, refused before a run starts: :func:`check_model`.

The config's own rules (:func:`masan.config.validate_config`) see one value, or a few, at a time
and never import torch. What only the model knows is found here, from the resolved config (input
shapes filled from the store, :func:`masan.data.contract.resolve_inputs`), before anything is
trained: the model is built on PyTorch's ``meta`` device (shapes and dtypes, no memory, no
FLOPs), so a size it cannot take is a one-line :class:`~masan.config.ConfigError` instead of a
traceback in the job; and what would fail later (too few frames for the temporal conv, the
occlusion pass's memory at the first evaluation, an unknown ``torch.compile`` backend) is
computed from the config. ``python -m masan.model.summary`` builds its model the same way
(:func:`meta_model`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from masan.config import ConfigError, ModelConfig, RunConfig
from masan.host import GIB
from masan.model import build_model
from masan.model.regions import num_regions

BUILD_ERRORS = (ValueError, RuntimeError, AssertionError, TypeError, ArithmeticError)
"""What building a model raises for a size it cannot take: the model's own checks (ValueError,
naming the key), and torch's (a zero width: RuntimeError or TypeError; ``1 / sqrt(0)``)."""
FP32_BYTES = 4
"""Bytes of one float32: the occlusion pass scores in fp32 whatever the model's dtype."""


def meta_model(model_cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model :func:`~masan.model.build_model` makes of ``model_cfg``, on the meta device.

    Raises ConfigError, one line, when it cannot be built: the builder's own message where it
    names the key (``model.groups``, ``model.spatial_kernel``, ...), else torch's, with the
    architecture it came from.
    """
    try:
        with torch.device("meta"):
            return build_model(model_cfg, num_classes)
    except ConfigError:
        raise
    except BUILD_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        if "model." in message:
            raise ConfigError(message) from None
        raise ConfigError(f"the model.arch={model_cfg.arch} model of this config cannot be built "
                          f"({type(e).__name__}: {message}); check the widths and sizes of the model section "
                          "(a zero or negative one, or one too small for the others)") from None


def check_model(cfg: RunConfig) -> None:
    """Refuse a resolved run config whose model cannot be built or evaluated, with one line
    naming the keys and the fix (ConfigError). Pure and fast: builds on the meta device, reads
    no data, writes nothing; with ``model.compile`` it imports ``torch._dynamo``, a slow import
    that the training start makes anyway.

    Raises ValueError when ``cfg`` still has the null input shape the model is built for
    (``model.fmri_frames``): resolve it from the store first.
    """
    m = cfg.model
    fmri = m.arch == "masan" and m.modalities in ("both", "fmri")
    if fmri and m.fmri_frames is None:
        raise ValueError("check_model needs the resolved config, but model.fmri_frames is null: fill it from the "
                         "store first (masan.data.contract.resolve_inputs)")
    _check_screening(m, meta_model(m, len(cfg.data.classes)))
    if fmri and m.fmri_time == "temporal_conv" and m.fmri_frames < m.temporal_kernel:
        raise ConfigError(f"model.temporal_kernel={m.temporal_kernel} is longer than the model.fmri_frames="
                          f"{m.fmri_frames} frames of each fMRI run; use a kernel of at most {m.fmri_frames} frames "
                          "or feed more frames (data.fmri_frames)")
    _check_occlusion(cfg)
    if m.compile:
        _check_compile_backend(m.compile_backend)


def _check_screening(m: ModelConfig, model: nn.Module) -> None:
    """Refuse a ``model.screen_features`` that keeps every region feature there is (or more): the
    screening would pass them all, silently no screening."""
    from masan.model.standardize import FittedStandardize

    for module in model.modules():
        if isinstance(module, FittedStandardize) and m.screen_features and module.keep >= module.mean.numel():
            total = module.mean.numel()
            raise ConfigError(f"model.screen_features={m.screen_features} keeps all {total} region features there "
                              f"are (or more), so the screening would pass every one; give fewer than {total}, a "
                              "model.screen_fraction instead, or 0 (no screening)")


def occlusion_bytes(model_cfg: ModelConfig, batch: int) -> int:
    """Peak memory of the occlusion pass over ``batch`` subjects
    (:meth:`~masan.model.attention.RegionSelfAttention.attend_occluded`): each subject's ``R``
    occluded copies hold ``R x R`` fp32 attention scores, twice (the scores and their softmax
    live together), and their queries, keys, values and new regions (checked against the
    measured peak: docs/performance.md, "Sizes and costs behind the code")."""
    r = num_regions(model_cfg.patch_grid)
    copies = batch * r
    return FP32_BYTES * copies * r * (2 * r + 2 * model_cfg.attn_dim + 2 * model_cfg.value_dim)


def _check_occlusion(cfg: RunConfig) -> None:
    m = cfg.model
    if m.arch != "masan" or m.region_weights != "occlusion":  # the H-FCN's weights are its patch gates
        return
    # the pass runs beside everything training keeps on its device: a few GiB fit there on a
    # training GPU and in a CPU rank's share of a node, tens of GiB fail only after hours of
    # training; its need grows with the cube of the regions, so a finer grid crosses the limit
    # quickly (what each grid needs: docs/performance.md, "Sizes and costs behind the code")
    batch = cfg.optim.micro_batch  # evaluation batches are training's micro-batches
    limit = m.occlusion_limit_gib * GIB
    need = occlusion_bytes(m, batch)
    if need > limit:
        side = 1
        while occlusion_bytes(dataclasses.replace(m, patch_grid=[side + 1] * 3), batch) <= limit:
            side += 1
        smaller = f", or a smaller optim.micro_batch (now {batch})" if batch > 1 else ""
        raise ConfigError(f"model.region_weights=occlusion with model.patch_grid={list(m.patch_grid)} "
                          f"({num_regions(m.patch_grid)} regions) needs {need / GIB:.1f} GiB per evaluation batch "
                          f"(regions^3 attention scores) at every evaluation, over model.occlusion_limit_gib="
                          f"{m.occlusion_limit_gib:g}; set model.region_weights=attention (or embedding), or a coarser "
                          f"model.patch_grid (at most {side ** 3} regions: {side} or fewer per axis){smaller}, or "
                          "raise model.occlusion_limit_gib on a device with that much to spare")


def _check_compile_backend(backend: str) -> None:
    import torch._dynamo  # the compiler's registry: a slow import, but the training start does it anyway

    known = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"}
    if backend not in known:
        raise ConfigError(f"model.compile_backend={backend!r} is not a torch.compile backend of torch "
                          f"{torch.__version__}; use inductor (generated kernels) or aot_eager (traced, nothing "
                          "generated), or model.compile=false")
