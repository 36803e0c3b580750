"""Time and memory of one MASAN training step (forward + loss + backward) per sample.

Runs fp32 / bf16-autocast x activation checkpointing off / on side by side, each in a fresh
process so that peak-memory figures do not leak between configurations, and prints a table
with ratios to fp32 without checkpointing.

* GPU (CUDA available): the configured model at full resolution (paper defaults: T1
  240x256x176 in 4x4x4 patches, fMRI 976 frames of 60x64x44); peak memory from
  ``torch.cuda.max_memory_allocated``.
* CPU (no GPU): a small model (T1 64^3 in 2x2x2 patches, fMRI 50 frames of 32^3; see
  ``CPU_SHAPES``) unless ``--full``; peak memory is the growth of the process's peak resident
  set size (``ru_maxrss``) during the steps, which includes allocator caching.

Examples::

    python bench/model.py                                  # CPU small or GPU full, all four modes
    python bench/model.py --config hpc/configs/paper.yaml --batch 2 --steps 10
    python bench/model.py model.fmri_time=temporal_conv --precisions bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from masan.config import ModelConfig, RunConfig, add_config_arguments, config_from_args
from masan.hostmem import peak_rss_bytes, rss_bytes
from masan.model import build_model, masan_loss

CPU_SHAPES = [
    "model.t1_shape=[64,64,64]", "model.patch_grid=[2,2,2]", "model.channels=[8,16,32,32]",
    "model.fmri_shape=[32,32,32]", "model.fmri_frames=50", "model.fmri_channels=[8,16,32,32]",
]
"""Overrides giving a CPU-sized model with every structural feature of the full one."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_TARGET = "GPU target (bf16 + checkpointing, docs/performance.md): <= 60 ms and <= 12 GiB per sample"


@dataclass
class Result:
    precision: str
    checkpointing: bool
    ms_per_sample: float
    peak_mib_per_sample: float


def measure(cfg: RunConfig, device: str, precision: str, checkpointing: bool, batch: int, warmup: int,
            steps: int) -> Result:
    """One configuration in this process: ``warmup`` untimed steps, then ``steps`` timed ones."""
    torch.manual_seed(0)
    model_cfg: ModelConfig = cfg.model
    model_cfg.activation_checkpointing = checkpointing
    classes = len(cfg.data.classes)
    model = build_model(model_cfg, classes).to(device).train()
    data = {"label": torch.arange(batch, device=device) % classes}
    if model_cfg.arch == "hfcn" or model_cfg.modalities != "fmri":
        data["t1"] = torch.randn(batch, 1, *model_cfg.t1_shape, device=device)
    if model_cfg.arch == "masan" and model_cfg.modalities != "t1":
        data["fmri"] = torch.randn(batch, model_cfg.fmri_frames, *model_cfg.fmri_shape, device=device)
    dtype = PRECISIONS[precision]
    cuda = device.startswith("cuda")
    device_type = torch.device(device).type

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(t1=data.get("t1"), fmri=data.get("fmri"))
            terms = masan_loss(out, data, cfg.loss, "joint")
        terms["total"].backward()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        model.zero_grad(set_to_none=True)
        base = rss_bytes()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else peak_rss_bytes() - base
    return Result(precision, checkpointing, 1000 * seconds / batch, max(peak, 0) / 2**20 / batch)


def _format(results: list[Result], header: str) -> str:
    ref = next((r for r in results if r.precision == "fp32" and not r.checkpointing), results[0])
    columns = f"{'precision':<9} {'ckpt':<4} {'ms/sample':>10} {'x time':>7} {'peak MiB/sample':>16} {'x mem':>6}"
    lines = [header, columns]
    for r in results:
        lines.append(f"{r.precision:<9} {'on' if r.checkpointing else 'off':<4} {r.ms_per_sample:>10.1f} "
                     f"{r.ms_per_sample / ref.ms_per_sample:>7.2f} {r.peak_mib_per_sample:>16.1f} "
                     f"{r.peak_mib_per_sample / max(ref.peak_mib_per_sample, 1e-9):>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring for details.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--full", action="store_true", help="on CPU too, use the configured (full) resolution")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on GPU, 3 on CPU)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    cfg = config_from_args(args, defaults=() if device == "cuda" or args.full else CPU_SHAPES)
    steps = args.steps or (10 if device == "cuda" else 3)
    m = cfg.model
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = (f"{m.arch} fwd+bwd, batch {args.batch}, {steps} steps on {name}, torch {torch.__version__}\n"
              f"T1 {m.t1_shape} in {m.patch_grid} patches, channels {m.channels}; fMRI {m.fmri_frames} x "
              f"{m.fmri_shape} ({m.fmri_time}, {m.fmri_layout}); fusion {m.fusion}, modalities {m.modalities}")
    modes = [(p, c == "on") for p in args.precisions for c in args.checkpointing]
    results = []
    context = multiprocessing.get_context("spawn")
    for precision, ckpt in tqdm(modes, desc="configurations", file=sys.stderr):
        # a fresh process per configuration: peak memory and allocator caches start from zero
        with futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            job = pool.submit(measure, cfg, device, precision, ckpt, args.batch, args.warmup, steps)
            try:
                results.append(job.result())
            except Exception as e:  # noqa: BLE001 - report the failing mode, keep measuring the others
                print(f"{precision} checkpointing={'on' if ckpt else 'off'} failed: {type(e).__name__}: {e}",
                      file=sys.stderr)
    if not results:
        return 1
    print(_format(results, header))
    if device == "cuda":
        print(GPU_TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
