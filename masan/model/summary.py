"""Parameter count and activation size per level of the configured model, at full resolution.

Nothing is computed on real data: the model is built on PyTorch's ``meta`` device (shapes and
dtypes only, no memory, no FLOPs; :func:`masan.model.checks.meta_model`, so a size the model cannot
take is one line, as at a run's start) and one training step (forward, loss, backward) is traced:
``torch.autograd.graph.saved_tensors_hooks`` adds up the tensors autograd keeps for the
backward pass, per branch (T1 / fMRI / region head) and per encoder level, and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs, with activation checkpointing
off and on. Run::

    python -m masan.model.summary                                  # paper defaults
    python -m masan.model.summary --config hpc/configs/demo.yaml model.fmri_frames=200
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from masan.config import LossConfig, ModelConfig, add_config_arguments, config_from_args
from masan.model import masan_loss
from masan.model.checks import meta_model
from masan.model.inputs import PRECISION_DTYPES as DTYPES
from masan.model.regions import patch_shape

MIB = 2**20


def level_shapes(spatial: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Spatial shape at each encoder level: stride-2 "same" convs give ``ceil(s / 2)``."""
    shapes = [tuple(spatial)]
    for _ in range(levels - 1):
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


def branch_levels(cfg: ModelConfig) -> dict[str, list[tuple[int, ...]]]:
    """Level shapes of each autoencoder input: T1 patches and fMRI volume (or its patches)."""
    out = {}
    if cfg.arch == "hfcn" or cfg.modalities in ("both", "t1"):
        out["T1"] = level_shapes(patch_shape(cfg.t1_shape, cfg.patch_grid, "model.t1_shape"), len(cfg.channels))
    if cfg.arch == "masan" and cfg.modalities in ("both", "fmri"):
        frame = cfg.fmri_shape
        if cfg.fmri_layout == "patches":
            frame = patch_shape(frame, cfg.patch_grid, "model.fmri_shape")
        out["fMRI"] = level_shapes(frame, len(cfg.fmri_channels))
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level part of the model, plus ``total``."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def meta_inputs(cfg: ModelConfig, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full-resolution inputs on the meta device for the modalities the model uses."""
    inputs = {}
    levels = branch_levels(cfg)
    if "T1" in levels:
        inputs["t1"] = torch.empty(batch, 1, *cfg.t1_shape, device="meta", dtype=dtype)
    if "fMRI" in levels:
        inputs["fmri"] = torch.empty(batch, cfg.fmri_frames, *cfg.fmri_shape, device="meta", dtype=dtype)
    return inputs


@dataclasses.dataclass
class Trace:
    """What one traced training step on the meta device keeps and computes."""

    saved: dict[tuple[str, str], int]
    """Bytes kept for backward by (branch, level label), weights excluded."""
    forward_flops: dict[str, int]
    """Forward FLOPs per top-level part of the model."""
    step_flops: int
    """FLOPs of forward + backward (including recomputation when checkpointing)."""


def trace_step(cfg: ModelConfig, num_classes: int, dtype: torch.dtype, batch: int = 1) -> Trace:
    """Trace one meta-device training step (forward, eq. 8 loss, backward) of the model.

    For saved tensors the branch is ``T1``/``fMRI`` inside sPM/fPM and ``head`` elsewhere; the
    level is the encoder level whose spatial shape the tensor has (``other`` for anything
    else in that branch).
    """
    model = meta_model(cfg, num_classes).to(dtype)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    shapes = branch_levels(cfg)
    modules = {"spm": "T1", "patches": "T1", "fpm": "fMRI"}
    state = {"branch": "head"}
    for name, child in model.named_children():
        if name in modules:
            child.register_forward_pre_hook(lambda _m, _a, b=modules[name]: state.update(branch=b))
            child.register_forward_hook(lambda _m, _a, _o: state.update(branch="head"))
    seen: set[int] = set()
    totals: dict[tuple[str, str], int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata in params or storage._cdata in seen:
            return t
        seen.add(storage._cdata)
        branch = state["branch"]
        level = "other"
        if t.dim() == 5 and branch in shapes and tuple(t.shape[2:]) in shapes[branch]:
            level = str(shapes[branch].index(tuple(t.shape[2:])))
        totals[(branch, level)] += storage.nbytes()
        return t

    inputs = meta_inputs(cfg, batch, dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
        forward = {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if name.count(".") == 1}
        labels = torch.zeros(batch, dtype=torch.int64, device="meta")
        masan_loss(out, {**inputs, "label": labels}, LossConfig(), "joint")["total"].backward()
    return Trace(dict(totals), forward, counter.get_total_flops())


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def summarize(cfg: ModelConfig, num_classes: int, dtype_name: str = "bf16") -> str:
    """The report printed by the command line (one sample, full resolution from ``cfg``)."""
    dtype = DTYPES[dtype_name]
    item = torch.empty((), dtype=dtype).element_size()
    counts = parameter_counts(meta_model(cfg, num_classes))
    regions = math.prod(cfg.patch_grid)
    lines = [
        f"{cfg.arch} model, {num_classes} classes, one sample; T1 {_fmt_shape(cfg.t1_shape)} as "
        f"{_fmt_shape(cfg.patch_grid)} patches; fMRI {cfg.fmri_frames} frames of {_fmt_shape(cfg.fmri_shape)} "
        f"(time: {cfg.fmri_time}, layout: {cfg.fmri_layout}); modalities {cfg.modalities}, fusion {cfg.fusion}",
        "parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
        "",
        f"feature map per level ({dtype_name}; T1 = all {regions} patches of the sample)",
        f"{'branch':<6} {'level':>5} {'channels':>8} {'spatial':>12} {'elements':>14} {'MiB':>9}",
    ]
    widths = {"T1": cfg.channels, "fMRI": cfg.fmri_channels}
    for branch, shapes in branch_levels(cfg).items():
        copies = regions if branch == "T1" or cfg.fmri_layout == "patches" else 1
        for level, (shape, width) in enumerate(zip(shapes, widths[branch])):
            n = copies * width * math.prod(shape)
            lines.append(f"{branch:<6} {level:>5} {width:>8} {_fmt_shape(shape):>12} {n:>14,} {n * item / MIB:>9.1f}")
    traces = {ckpt: trace_step(_with(cfg, activation_checkpointing=ckpt), num_classes, dtype) for ckpt in (False, True)}
    saved = {ckpt: t.saved for ckpt, t in traces.items()}
    keys = sorted(set(saved[False]) | set(saved[True]))
    lines += ["", f"kept for backward ({dtype_name} MiB, weights excluded), activation checkpointing off / on",
              f"{'branch':<6} {'level':>5} {'off':>10} {'on':>10}"]
    for branch, level in keys:
        off, on = (saved[c].get((branch, level), 0) / MIB for c in (False, True))
        lines.append(f"{branch:<6} {level:>5} {off:>10.1f} {on:>10.1f}")
    off, on = (sum(saved[c].values()) / MIB for c in (False, True))
    lines.append(f"{'total':<6} {'':>5} {off:>10.1f} {on:>10.1f}")
    lines.append("(peak memory adds the largest block's recomputation and the gradients; see bench/model.py)")
    tflop = {k: v / 1e12 for k, v in traces[False].forward_flops.items()}
    shown = {k: v for k, v in tflop.items() if v >= 0.005}
    shown["rest"] = sum(tflop.values()) - sum(shown.values())
    lines += ["", "TFLOP per sample: forward " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items())
              + f"; forward+backward {traces[False].step_flops / 1e12:.2f} "
              f"({traces[True].step_flops / 1e12:.2f} with checkpointing)"]
    return "\n".join(lines)


def _with(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m masan.model.summary",
        description="Print the parameter count and the activation size per level of the configured model at "
        "full resolution, computed on the meta device (no data, no memory, seconds on a laptop).",
    )
    add_config_arguments(parser)
    parser.add_argument("--classes", type=int, default=None,
                        help="number of classes (default: the length of data.classes in the config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype (default: the config's train.precision)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    classes = args.classes or len(cfg.data.classes)
    try:
        _resolve_shapes(cfg)
        print(summarize(cfg.model, classes, args.dtype or cfg.train.precision))
    except ValueError as e:  # ConfigError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _resolve_shapes(cfg) -> None:
    """Fill the model's null input shapes from ``data.store`` as a training start does; a
    ValueError naming the keys when there is no store to read them from."""
    m = cfg.model
    null = [k for k in ("t1_shape", "fmri_shape", "fmri_frames") if getattr(m, k) is None]
    if not null:
        return
    if not Path(cfg.data.store).exists():
        raise ValueError(f"model.{', model.'.join(null)} null: taken from the store at a training start, but "
                         f"data.store={cfg.data.store} does not exist; give data.store=... or the shapes, e.g. "
                         "model.t1_shape=[240,256,176]")
    from masan.train.run import store_contract

    store_contract(cfg)


if __name__ == "__main__":
    sys.exit(main())
