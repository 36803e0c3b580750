"""Time and memory of one MASAN training step (forward + loss + backward) per sample.

Runs fp32 / bf16 autocast (fp32 weights, as torch.amp trains) x activation checkpointing
off / on side by side, each in a fresh process so that peak-memory figures do not leak between
configurations, and prints a table with ratios to fp32 without checkpointing. Peak memory is
what the timed steps add to what they start with (the model; bench/harness.py, ``StepCost``).

* GPU (CUDA available): the configured model at full resolution (paper defaults: T1
  240x256x176 in 4x4x4 patches, fMRI 976 frames of 60x64x44); peak memory from
  ``torch.cuda.max_memory_allocated``.
* CPU (no GPU): a small model (T1 64^3 in 2x2x2 patches, fMRI 50 frames of 32^3; see
  ``CPU_SHAPES``) unless ``--full``; peak memory is the growth of the process's peak resident
  set size during the steps, which includes allocator caching.

Examples::

    python -m bench.model                                  # CPU small or GPU full, all four modes
    python -m bench.model --config hpc/configs/paper.yaml --batch 2 --steps 10
    python -m bench.model model.fmri_time=temporal_conv --precisions bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import multiprocessing
import platform
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.gpu_check import STEP_TARGET
from bench.harness import synthetic_batch, time_training_step
from masan.argtypes import number
from masan.config import RunConfig, add_config_arguments, config_or_exit
from masan.model import build_model

CPU_SHAPES = [
    "model.t1_shape=[64,64,64]", "model.patch_grid=[2,2,2]", "model.channels=[8,16,32,32]",
    "model.fmri_shape=[32,32,32]", "model.fmri_frames=50", "model.fmri_channels=[8,16,32,32]",
]
"""Overrides giving a CPU-sized model with every structural feature of the full one."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--precisions``: the dtype autocast runs the fp32 model in (None: no autocast)."""
GPU_TARGET = f"GPU target (bf16 + checkpointing, docs/performance.md): {STEP_TARGET}"


@dataclass
class Result:
    precision: str
    checkpointing: bool
    ms_per_sample: float
    peak_mib_per_sample: float


def measure(cfg: RunConfig, device: str, precision: str, checkpointing: bool, batch: int, warmup: int,
            steps: int) -> Result:
    """One configuration in this process: ``warmup`` untimed steps, then ``steps`` timed ones of
    forward + loss + backward (no optimizer step) of the fp32 model under ``precision``'s autocast."""
    torch.manual_seed(0)
    m = cfg.model
    m.activation_checkpointing = checkpointing
    classes = len(cfg.data.classes)
    model = build_model(m, classes).to(device).train()
    data = synthetic_batch(m, batch, torch.device(device), torch.float32, classes)
    cost = time_training_step(model, data, cfg.loss, torch.device(device), warmup, steps,
                              autocast=PRECISIONS[precision])
    return Result(precision, checkpointing, cost.ms_per_sample, cost.step_gib * 1024 / batch)


def _format(results: list[Result], header: str) -> str:
    ref = next((r for r in results if r.precision == "fp32" and not r.checkpointing), results[0])
    columns = f"{'precision':<13} {'ckpt':<4} {'ms/sample':>10} {'x time':>7} {'peak MiB/sample':>16} {'x mem':>6}"
    lines = [header, columns]
    for r in results:
        label = r.precision if PRECISIONS[r.precision] is None else f"{r.precision} autocast"
        lines.append(f"{label:<13} {'on' if r.checkpointing else 'off':<4} {r.ms_per_sample:>10.1f} "
                     f"{r.ms_per_sample / ref.ms_per_sample:>7.2f} {r.peak_mib_per_sample:>16.1f} "
                     f"{r.peak_mib_per_sample / max(ref.peak_mib_per_sample, 1e-9):>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring for details.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--full", action="store_true", help="on CPU too, use the configured (full) resolution")
    parser.add_argument("--batch", type=number(int, 1), default=1, help="samples per step (default 1)")
    parser.add_argument("--warmup", type=number(int, 0), default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=number(int, 1), default=None, help="timed steps (default: 10 on GPU, 3 on CPU)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    cfg = config_or_exit(args.config, args.overrides, () if device == "cuda" or args.full else CPU_SHAPES,
                       "the bench's CPU-sized model (--full: the configured resolution)")
    steps = args.steps if args.steps is not None else (10 if device == "cuda" else 3)
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
