"""The DeepSpeed engine of a run: its JSON config derived from RunConfig, Adam, the LR schedule.

The DeepSpeed config is never written by hand: :func:`deepspeed_config` derives it from the
run config (one row per key, with the config field it comes from, see :data:`DS_ROWS`), and
``python -m masan.train.engine --config X [key=value ...]`` prints it, the template users
inspect. ``hpc/deepspeed/README.md`` is that command's ``--markdown`` output for the paper
config (a test checks it is current).

Optimizer: plain ``torch.optim.Adam`` (the paper's optimizer) wrapped by DeepSpeed's ZeRO /
bf16 machinery, not DeepSpeed's fused or CPU Adam ops (they JIT-compile CUDA/AVX kernels and
differ numerically). Activation checkpointing is a model setting
(``model.activation_checkpointing``: torch.utils.checkpoint per 3-D block), not DeepSpeed's.

LR schedule (per phase, the choice documented in docs/paper-mapping.md): each phase
(pretrain, joint) starts with ``optim.warmup_steps`` of linear warmup, then stays constant or
follows a cosine from ``optim.lr`` down to ``optim.lr * optim.min_lr_ratio`` at the phase's
last step. The joint phase starts a fresh curve because it adds a new objective (the
classifier's cross-entropy) on top of the pretrained encoders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from masan.config import ConfigError, OptimConfig, RunConfig, add_config_arguments, config_from_args

STEPS_PER_PRINT_OFF = 10**9
BUCKET_ALIGN = 1024
"""ZeRO bucket sizes are rounded up to a multiple of this (DeepSpeed asserts alignment)."""
"""DeepSpeed's own step printing is off: the run logs to TensorBoard instead."""


@dataclass(frozen=True)
class DSRow:
    """One DeepSpeed config key: dotted JSON path, value, where it comes from, why."""

    key: str
    value: object
    source: str
    note: str


def _rows(cfg: RunConfig, world_size: int, num_params: int | None = None) -> list[DSRow]:
    o, t = cfg.optim, cfg.train
    bucket = t.zero_bucket_elements
    if num_params is not None:  # DeepSpeed wants a multiple of its alignment (2 or 4 elements)
        bucket = min(bucket, -(-num_params // BUCKET_ALIGN) * BUCKET_ALIGN)
    rows = [
        DSRow("train_micro_batch_size_per_gpu", o.micro_batch, "optim.micro_batch",
              "samples per rank per forward pass"),
        DSRow("gradient_accumulation_steps", o.grad_accum, "optim.grad_accum",
              "micro-batches summed before each optimizer step"),
        DSRow("train_batch_size", o.micro_batch * o.grad_accum * world_size,
              "optim.micro_batch * optim.grad_accum * world size",
              f"global batch per optimizer step ({world_size} data-parallel ranks)"),
        DSRow("gradient_clipping", o.grad_clip, "optim.grad_clip", "global gradient-norm clip (0: off)"),
        DSRow("zero_optimization.stage", t.zero_stage, "train.zero_stage",
              "1: Adam state sharded over ranks; 2: gradients too (3 is refused)"),
        DSRow("zero_optimization.reduce_bucket_size", bucket, "train.zero_bucket_elements",
              "gradient all-reduce bucket (elements), capped at the model's parameter count"),
        DSRow("zero_optimization.allgather_bucket_size", bucket, "train.zero_bucket_elements",
              "updated-weight all-gather bucket (elements), same cap"),
        DSRow("bf16.enabled", t.precision == "bf16", "train.precision",
              "bf16 weights/activations, fp32 master weights and Adam state"),
        DSRow("fp16.enabled", t.precision == "fp16", "train.precision",
              "fp16 with dynamic loss scaling (CUDA only)"),
    ]
    if t.precision == "fp16":
        rows.append(DSRow("fp16.loss_scale", 0, "fixed", "0 = dynamic loss scaling"))
    if t.precision == "bf16":
        rows.append(DSRow("bf16.check_grad_overflow", False, "fixed",
                          "no per-tensor inf/NaN scan before each step (about 12 kernel launches per "
                          "parameter tensor, host work while the GPU idles: docs/performance.md); "
                          "the training loop stops on a non-finite gradient norm instead (bf16 has fp32's range)"))
    rows += [
        DSRow("checkpoint.tag_validation", "FAIL", "fixed",
              "every rank must save under the same tag (a mismatch is a bug, not a warning)"),
        DSRow("steps_per_print", STEPS_PER_PRINT_OFF, "fixed", "DeepSpeed's own printing off; see run_dir/tb"),
        DSRow("wall_clock_breakdown", False, "fixed", "no per-step timers (they synchronise)"),
    ]
    return rows


def check_config(cfg: RunConfig, device_type: str | None) -> None:
    """Refuse settings the engine cannot run on ``device_type``, with what to change (None: not
    known yet, e.g. on a login node). The device-free ranges (ZeRO stage, batch sizes) are
    config rules (:mod:`masan.config.validation`), refused when the config loads."""
    if cfg.train.precision == "fp16" and device_type not in ("cuda", None):
        raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed's loss scaler); use bf16 or fp32 on the CPU")


def deepspeed_config(cfg: RunConfig, world_size: int, num_params: int | None = None) -> dict:
    """The DeepSpeed JSON config of ``cfg`` for ``world_size`` data-parallel ranks
    (bucket sizes capped at ``num_params`` when the model is known)."""
    out: dict = {}
    for row in _rows(cfg, world_size, num_params):
        node = out
        *parents, leaf = row.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = row.value
    return out


class LRSchedule:
    """LR factor per optimizer step; the current phase's span is set by the training loop.

    ``factor(s)`` is the multiplier of ``optim.lr`` for the optimizer step with global index
    ``s`` (0-based). The schedule is a pure function of the step, the phase span and an anchor,
    all restored from the checkpoint's training state: the cosine's progress runs linearly from
    0 at the end of the warm-up to 1 at the phase's last step, or, after a resume on another
    number of ranks (the rest of the phase then has another number of steps), from the progress
    reached at the resume (the anchor) to 1 over the steps left, so the LR goes on from where it
    was instead of jumping.
    """

    def __init__(self, optim_cfg: OptimConfig):
        self.cfg = optim_cfg
        self.phase_start = 0
        self.phase_steps = 1
        self.anchor: tuple[int, float] | None = None

    def set_phase(self, start_step: int, total_steps: int, anchor: tuple[int, float] | None = None) -> None:
        """The current phase runs optimizer steps ``start_step .. start_step + total_steps - 1``;
        ``anchor``: (global step, cosine progress at it) the curve continues from (None: progress
        0 at the end of the warm-up)."""
        self.phase_start, self.phase_steps = int(start_step), max(1, int(total_steps))
        self.anchor = None if anchor is None else (int(anchor[0]), float(anchor[1]))

    def progress(self, step: int) -> float:
        """Progress along the cosine, 0 to 1, at global step ``step`` (0 during the warm-up)."""
        local = step - self.phase_start
        at, start = (self.cfg.warmup_steps, 0.0) if self.anchor is None else (self.anchor[0] - self.phase_start,
                                                                               self.anchor[1])
        span = max(1, self.phase_steps - 1 - at)
        return min(1.0, max(0.0, start + (local - at) * (1.0 - start) / span))

    def factor(self, step: int) -> float:
        c = self.cfg
        local = step - self.phase_start
        if c.warmup_steps > 0 and local < c.warmup_steps:
            return (local + 1) / c.warmup_steps
        if c.schedule == "constant":
            return 1.0
        return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, schedule: LRSchedule):
    """``deepspeed.initialize`` with torch Adam and a LambdaLR driven by ``schedule``.

    Call after :func:`masan.distributed.init_distributed` (it selects DeepSpeed's
    accelerator and the process group). Returns the DeepSpeed engine; its ``lr_scheduler``
    is stepped by DeepSpeed after each optimizer step.
    """
    import deepspeed  # after DS_ACCELERATOR is set

    if os.environ.get("MASAN_DS_SHM_COMM", "0") != "1":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op with g++
        # in every fresh environment (slow: docs/performance.md, "Sizes and costs behind the
        # code"; and rebuilt whenever two environments share ~/.cache/torch_extensions). Training
        # all-reduces through the gloo group just as well; MASAN_DS_SHM_COMM=1 brings the op
        # back. No effect on CUDA.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    # DeepSpeed's ZeRO all-gathers through a torch call that newer torch marks deprecated; every
    # rank would print the same warning, about code no user of this suite can change
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    o = cfg.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    # a closure, so LambdaLR.state_dict() keeps no copy of the schedule in checkpoints
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))
    ds_config = deepspeed_config(cfg, world_size, sum(p.numel() for p in model.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    hold_to_run_timeout(engine, cfg.train.dist_timeout_minutes)
    return engine


ENGINE_GROUPS = ("data_parallel_group", "seq_data_parallel_group")
"""Attributes of a DeepSpeed engine that hold the process groups of its own collectives."""


def hold_to_run_timeout(engine, minutes: float) -> None:
    """Give the engine's process groups the run's collective timeout (``train.dist_timeout_minutes``).

    DeepSpeed runs its gradient collectives on groups it makes itself (a copy of the world
    group), and torch gives a new group its default timeout (30 min on gloo, 10 on NCCL), not
    the run's: a rank that stopped answering held the others in their optimizer step that long,
    whatever the config said, before any of them failed and the launcher could restart the run.
    """
    import torch.distributed as dist

    # public in newer torch; before that the private helper torchtitan also uses
    set_timeout = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:
        warnings.warn("this torch cannot set a process group's timeout: DeepSpeed's collectives keep torch's "
                      "default timeout rather than train.dist_timeout_minutes", stacklevel=2)
        return
    groups = {id(g): g for g in (getattr(engine, a, None) for a in ENGINE_GROUPS) if g is not None}
    for group in groups.values():
        set_timeout(datetime.timedelta(minutes=minutes), group)


def grad_norm(engine) -> float | None:
    """The global gradient norm of the engine's last optimizer step (before clipping), or None
    where DeepSpeed computed none (no clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def set_schedule_step(engine, step: int) -> None:
    """Put the engine's LR scheduler at global step ``step`` (after a resume or phase change)."""
    sched = engine.lr_scheduler
    sched.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


def current_lr(engine) -> float:
    return float(engine.lr_scheduler.get_last_lr()[0])


# --------------------------------------------------------------------------- CLI


def readme_markdown(cfg: RunConfig, world_size: int, command: str) -> str:
    """hpc/deepspeed/README.md: the derived config with one annotated row per key."""
    rows = _rows(cfg, world_size)
    table = "\n".join(f"| `{r.key}` | `{json.dumps(r.value)}` | {r.source} | {r.note} |" for r in rows)
    return f"""# DeepSpeed config (derived, do not edit)

The DeepSpeed JSON is derived from the run config by `masan/train/engine.py`; nobody edits a
DeepSpeed JSON by hand. This page is generated by

```
{command}
```

and `tests/test_train_engine.py` fails when it is out of date. Print the config of any run with
`python -m masan.train.engine --config CONFIG --world-size N [key=value ...]`.

Example: a 4-node job with 8 GPUs per node ({world_size} data-parallel ranks,
`hpc/configs/paper.yaml`):

```json
{json.dumps(deepspeed_config(cfg, world_size), indent=2)}
```

| key | value | from | why |
|---|---|---|---|
{table}

Not in this JSON, on purpose: the optimizer (`torch.optim.Adam` built by the engine from
`optim.lr/betas/weight_decay`, no DeepSpeed fused/CPU Adam op), the LR schedule (a torch
`LambdaLR`: warmup then cosine per phase, `optim.warmup_steps/schedule/min_lr_ratio`) and
activation checkpointing (`model.activation_checkpointing`: torch.utils.checkpoint per 3-D
block inside the model).
"""


README_WORLD_SIZE = 32
"""4 nodes x 8 GPUs: the example job of hpc/deepspeed/README.md."""
README_COMMAND = ("python -m masan.train.engine --config hpc/configs/paper.yaml "
                  f"--world-size {README_WORLD_SIZE} --markdown > hpc/deepspeed/README.md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m masan.train.engine",
        description="Print the DeepSpeed JSON config derived from a run config (the template the "
                    "training engine uses; nothing to edit by hand).")
    ap.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (nodes x GPUs per node)")
    ap.add_argument("--markdown", action="store_true", help="print the annotated README page instead of JSON")
    add_config_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    if args.world_size < 1:
        print("error: --world-size must be at least 1", file=sys.stderr)
        return 2
    if args.markdown:
        sys.stdout.write(readme_markdown(cfg, args.world_size, README_COMMAND))
    else:
        print(json.dumps(deepspeed_config(cfg, args.world_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
