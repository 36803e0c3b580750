#!/usr/bin/env python
"""Where one full-resolution training step of MASAN spends its time, to find what to speed up next.

Five sections, each line printed (flushed) as soon as it is measured, so a timeout still
leaves figures:

1. ``split``: forward + loss + backward + Adam step per sample of the paper's model with only
   T1, only fMRI, and both (``model.modalities``), micro-batch 1, as ``--config`` sets it.
2. ``variant``: the step as the model runs it (:data:`CURRENT`), then with one setting
   changed at a time: each fast path back to the plain operator (1x1x1 convs, the block max's
   backward, the output conv's fold before upsampling, pooling over reshaped blocks), all of
   them at once, micro-batch 2, activation checkpointing.
3. ``profile``: one step of the whole model under ``torch.profiler``: the operators with the
   most self time on the device (CUDA kernels; the CPU with ``--device cpu``), then the same
   split by input shape, so a slow kernel is tied to the layer that calls it.
4. ``layout``: one eager step with ``model.channels_last`` under a dispatch mode that lists
   every operator writing an NCDHW tensor from a channels-last input (a layout conversion).
5. ``engine``: the step inside the real DeepSpeed engine (``build_engine``, the config's ZeRO
   stage and precision, one rank, synthetic inputs already on the device), eager and under
   ``torch.compile``: per sample as the training loop runs it (the loss terms read back every
   step), without those read-backs, and split into forward, backward and optimizer step
   (synchronised between them); then the optimizer step's operators by host time. ``--engines``
   picks the rows (``compiled+channels_last``: both settings on).

    python -m bench.profile_step              # on the GPU machine, paper.yaml, bf16 (see bench/gpu_check.sh)
    python -m bench.profile_step --tiny       # CPU-sized shapes, the same code paths (tests)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench import harness
from masan.argtypes import number
from masan.config import config_or_exit
from masan.model import FastPaths, blocks, build_model, compile_modality_modules, masan_loss
from masan.model.inputs import PRECISION_DTYPES

CURRENT = FastPaths.for_device("cuda")
"""The fast paths as the model takes them on CUDA (:class:`~masan.model.fastpaths.FastPaths`), on
whichever device the bench runs: the T1 output conv as per-tap maps, 1x1x1 convs as batched
matrix products, the output conv folded before upsampling, region pooling over reshaped blocks
with an index backward for the max (off: ``amax`` and autograd's backward), the mean onto
unequal bins as matrix products."""
BEFORE = {"pointwise": "conv", "fold": False, "reshaped_pool": False, "block_max": False, "separable_mean": False}
"""The fast paths as they were before pooling, the block max, the output-conv fold and the 1x1
convs got their CUDA paths (changes to :data:`CURRENT`): the baseline of their A/B
(docs/performance.md, "On the target card")."""
VARIANTS: list[tuple[str, dict, dict, int]] = [
    # name, model overrides, fast paths changed from CURRENT, micro-batch
    ("current", {}, {}, 1),
    ("1x1 convs by cuDNN", {}, {"pointwise": "conv"}, 1),
    ("block max by amax", {}, {"block_max": False}, 1),
    ("output conv not folded", {}, {"fold": False}, 1),
    ("adaptive pooling", {}, {"reshaped_pool": False, "separable_mean": False}, 1),
    ("unequal bins by adaptive average pooling", {}, {"separable_mean": False}, 1),
    ("before (all of the above)", {}, BEFORE, 1),
    ("current, mb2", {}, {}, 2),
    ("current, checkpointing", {"activation_checkpointing": True}, {}, 1),
    ("current, torch.compile", {"compile": True}, {}, 1),
    # inductor keeps 3-D convs in NCDHW (cuDNN then converts the layout around each); fed
    # channels_last_3d, its GroupNorm and elementwise kernels follow that layout
    ("current, torch.compile, channels_last", {"compile": True, "channels_last": True}, {}, 1),
    # the compiled step is host-bound inside the engine (more host work than GPU work per step)
    ("current, torch.compile, CUDA graphs", {"compile": True, "compile_mode": "reduce-overhead"}, {}, 1),
    ("current, torch.compile, CUDA graphs, channels_last",
     {"compile": True, "compile_mode": "reduce-overhead", "channels_last": True}, {}, 1),
]
"""Each row changes the step as the config (``--set``) gives it, then one setting; cuDNN
autotuning (``torch.backends.cudnn.benchmark``) is not a row: it changed nothing (docs/performance.md,
"Where the step went")."""


def _row(cfg, batch: int) -> harness.Row:
    m = cfg.model
    return harness.Row(m.arch, batch, ckpt=m.activation_checkpointing, channels_last=m.channels_last,
                       compiled=m.compile)


def _timed(cfg, batch: int, args, budget: harness.Budget, section: str, name: str,
           paths: FastPaths | None = None) -> None:
    """One row: :func:`~bench.harness.measure_model` of ``cfg`` at micro-batch ``batch`` on ``paths``
    (None: the device's defaults)."""

    def measure() -> None:
        t0 = time.perf_counter()
        cost = harness.measure_model(cfg, _row(cfg, batch), args.device, args.dtype, args.warmup, args.steps,
                             args.compile_backend, fast_paths=paths)
        extra = f"with warm-up and compile {time.perf_counter() - t0:.0f} s" if cfg.model.compile else ""
        harness.emit_cost(section, name, cost, batch, extra)

    harness.guarded(section, name, budget, args.min_left, args.device, measure, compiled=cfg.model.compile)


def split_section(cfg, args, budget: harness.Budget) -> None:
    for modalities in ("t1", "fmri", "both"):
        c = copy.deepcopy(cfg)
        c.model.modalities = modalities
        _timed(c, 1, args, budget, "split", f"modalities={modalities}")


def _bare_model(m, device: torch.device, dtype: torch.dtype,
                paths: FastPaths | None = None) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model of ``m`` on ``paths`` cast to ``dtype`` on ``device`` (no engine), in train mode,
    and a sample."""
    torch.manual_seed(0)
    model = build_model(m, 2, paths).to(device=device, dtype=dtype).train()
    return model, harness.synthetic_batch(m, 1, device, dtype, 2)


def profile_section(cfg, args, budget: harness.Budget) -> None:
    """Profile one step after two warm-up steps; print the top operators by self device time."""
    harness.guarded("profile", "-", budget, args.min_left, args.device, lambda: _profile(cfg, args))


def _profile(cfg, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    device, dtype, m = args.device, args.dtype, cfg.model
    model, data = _bare_model(m, device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(t1=data.get("t1"), fmri=data.get("fmri"))
        masan_loss(out, data, cfg.loss, "joint")["total"].backward()
        opt.step()

    cuda = device.type == "cuda"
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile: one step, top {args.top} operators by {key}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=48), flush=True)
    print(f"profile: top {args.top} by input shape", flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=args.top,
                                                             max_name_column_width=40, max_shapes_column_width=90),
          flush=True)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"profile: chrome trace in {args.trace}", flush=True)


def variant_section(cfg, args, budget: harness.Budget) -> None:
    wanted = args.variants.split(";") if args.variants else None
    for name, overrides, paths, batch in VARIANTS:
        if wanted is not None and name not in wanted:
            continue
        c = copy.deepcopy(cfg)
        for k, v in overrides.items():
            setattr(c.model, k, v)
        _timed(c, batch, args, budget, "variant", name, dataclasses.replace(CURRENT, **paths))


class LayoutAudit(TorchDispatchMode):
    """Counts the operators that turn a channels-last input into a new NCDHW tensor (views
    excluded): with ``model.channels_last`` each is a layout conversion the step pays for,
    and an NCDHW tensor fed to cuDNN's bf16 conv costs two more."""

    def __init__(self):
        super().__init__()
        self.found: dict[tuple[str, tuple[int, ...]], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(blocks.is_channels_last(t) for t in ins):
            shared = {t.untyped_storage().data_ptr() for t in ins}
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[1] > 1 and math.prod(t.shape[2:]) > 1
                        and t.is_contiguous() and t.untyped_storage().data_ptr() not in shared):
                    key = (str(func.overloadpacket.__name__), tuple(t.shape))
                    self.found[key] = self.found.get(key, 0) + 1
        return out


def layout_section(cfg, args, budget: harness.Budget) -> None:
    """One eager forward + backward with ``model.channels_last`` on (the fast paths as
    :data:`CURRENT`) under :class:`LayoutAudit`; prints each converting operator, by output shape."""
    harness.guarded("layout", "-", budget, args.min_left, args.device, lambda: _layout(cfg, args))


def _layout(cfg, args) -> None:
    device, dtype, m = args.device, args.dtype, copy.deepcopy(cfg.model)
    m.channels_last, m.compile = True, False
    model, data = _bare_model(m, device, dtype, CURRENT)
    with LayoutAudit() as audit:
        masan_loss(model(t1=data.get("t1"), fmri=data.get("fmri")), data, cfg.loss, "joint")["total"].backward()
    rows = sorted(audit.found.items(), key=lambda kv: -kv[1] * math.prod(kv[0][1]))
    total = sum(n * math.prod(shape) for (_, shape), n in rows) * torch.finfo(dtype).bits / 8 / 2**30
    print(f"layout: {len(rows)} operator/shape pairs write NCDHW from channels-last, "
          f"{total:.2f} GiB written in all", flush=True)
    for (op, shape), n in rows[:args.top]:
        print(f"layout: {n:4d} x {op:32s} -> {shape}", flush=True)


ENGINE_FLAGS = {"compiled": ("model", "compile", True), "channels_last": ("model", "channels_last", True),
                "cudagraphs": ("model", "compile_mode", "reduce-overhead"), "mb2": ("optim", "micro_batch", 2)}
"""``--engines`` kinds are ``eager`` or flags joined by ``+`` (``compiled+cudagraphs``), each
setting one config field (config section, field, value); the micro-batch is 1 unless set."""


def engine_section(cfg, args, budget: harness.Budget) -> None:
    for kind in args.engines.split(","):
        flags = [] if kind == "eager" else kind.split("+")
        if any(f not in ENGINE_FLAGS for f in flags):
            raise SystemExit(f"--engines: {kind!r} is not 'eager' or a '+'-joined set of {sorted(ENGINE_FLAGS)}")
        name = "engine" + "".join(f", {'torch.compile' if f == 'compiled' else f}" for f in flags)
        c = copy.deepcopy(cfg)
        c.optim.micro_batch, c.optim.grad_accum = 1, 1
        for f in flags:
            section, key, value = ENGINE_FLAGS[f]
            setattr(getattr(c, section), key, value)
        harness.guarded("engine", name, budget, args.min_left, args.device,
                        lambda c=c, name=name: _engine_rows(c, args, name), compiled=c.model.compile)


def _engine_rows(cfg, args, name: str) -> None:
    """Rows of :func:`engine_section` for one engine (times and memory per sample)."""
    from masan import distributed as D
    from masan.train.engine import LRSchedule, build_engine
    from masan.train.logging import peak_memory

    device, m = args.device, cfg.model
    cfg.train.device = device.type
    cfg.train.precision = args.precision
    b = cfg.optim.micro_batch
    D.init_distributed(cfg.train)
    torch.manual_seed(0)
    peak_memory(device)
    model = build_model(m, 4)
    if m.compile:  # as training compiles it
        compile_modality_modules(model, args.compile_backend, m.compile_mode)
    engine = build_engine(model, cfg, 1, LRSchedule(cfg.optim))
    data = harness.synthetic_batch(m, b, device, args.dtype, 4)
    split = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    lap_start = [0.0]

    def lap(part: str | None) -> None:
        """With ``part``: synchronise and add the seconds since the last lap to ``split[part]``."""
        if part is not None:
            harness.sync(device)
            split[part] += time.perf_counter() - lap_start[0]
        lap_start[0] = time.perf_counter()

    def step(read_back: bool, timed: bool = False) -> None:
        lap(None)
        out = engine(t1=data.get("t1"), fmri=data.get("fmri"))
        loss = masan_loss(out, data, cfg.loss, "joint")
        lap("forward" if timed else None)
        engine.backward(loss["total"])
        lap("backward" if timed else None)
        engine.step()
        lap("step" if timed else None)
        if read_back:  # as masan.train.loop.train: every term and the finiteness check, every step
            _ = [float(v.detach()) for v in loss.values()], bool(torch.isfinite(loss["total"].detach()))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(True)
    harness.sync(device)
    warm = time.perf_counter() - t0
    for read_back, label in ((True, "as the loop (loss read back every step)"), (False, "no per-step read-back")):
        t = time.perf_counter()
        for _ in range(args.steps):
            step(read_back)
        harness.sync(device)
        ms = 1e3 * (time.perf_counter() - t) / args.steps / b
        peak = peak_memory(device)
        gib = peak.get("gpu_mem_gib", peak["peak_rss_gib"])
        harness.emit("engine", f"{name}: {label}", f"{ms:.1f}", f"{gib:.2f}", f"{gib / b:.2f}",
                     f"ZeRO {cfg.train.zero_stage}, {args.precision}, micro-batch {b}"
                     + (f"; warm-up {warm:.0f} s" if read_back else ""))
    for _ in range(args.steps):
        step(True, timed=True)
    harness.emit("engine", f"{name}: split", "-", "-", "-",
                 ", ".join(f"{k} {1e3 * v / args.steps / b:.1f} ms" for k, v in split.items()) + " per sample")
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = engine(t1=data.get("t1"), fmri=data.get("fmri"))
    engine.backward(masan_loss(out, data, cfg.loss, "joint")["total"])
    harness.sync(device)
    with profile(activities=activities) as prof:
        engine.step()
        harness.sync(device)
    print(f"engine: {name}: the optimizer step's operators by host time", flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top, max_name_column_width=60),
          flush=True)
    with profile(activities=activities) as prof:
        step(True)
        harness.sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"engine: {name}: one whole step's operators by {key}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = harness.device_parser(__doc__, 300.0)
    ap.add_argument("--top", type=number(int, 1), default=25, help="operators listed by the profile")
    ap.add_argument("--trace", type=Path, default=None, help="also write the profile as a Chrome trace here")
    ap.add_argument("--sections", default="split,variant,profile,layout,engine",
                    type=harness.section_names("split", "variant", "profile", "layout", "engine"),
                    help="comma-separated sections to run")
    ap.add_argument("--variants", default="",
                    help="names of the variant rows to run, separated by ; (default: all), e.g. 'current;current, mb2'")
    ap.add_argument("--engines", default="eager,compiled",
                    help="the engine section's rows, comma-separated: eager, or model settings joined by + "
                         "(compiled, channels_last, cudagraphs: compile_mode reduce-overhead, mb2: micro-batch 2), "
                         "e.g. 'compiled,compiled+cudagraphs+channels_last'")
    args = ap.parse_args(argv)
    harness.resolve_device(args)
    args.dtype = PRECISION_DTYPES[args.precision]
    if args.tiny:
        args.warmup, args.steps, args.top = 1, 1, min(args.top, 8)
    args.min_left = 5 if args.tiny else 20
    budget = harness.Budget(args.budget_s)
    cfg = config_or_exit(args.config, args.set, harness.TINY if args.tiny else (), "the --tiny settings")
    print(f"profile_step: {harness.device_name(args.device)}, torch {torch.__version__}, {args.dtype}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    harness.emit("section", "variant", "ms/sample", "peak GiB", "GiB/sample", "note")
    sections = args.sections
    t0 = time.monotonic()
    for name, fn in (("split", split_section), ("variant", variant_section), ("profile", profile_section),
                     ("layout", layout_section), ("engine", engine_section)):
        if name in sections:
            fn(cfg, args, budget)
    print(f"profile_step done, {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
