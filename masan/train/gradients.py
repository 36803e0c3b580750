"""Gradient health of a training step: the global norm and the guard that stops a run before
non-finite weights are saved, the steps DeepSpeed skipped for overflow, and each loss term's
own gradient norm (the balance of eq. 8), all read by the training loop's log."""

from __future__ import annotations

import math

import torch

from masan.batch import MODALITY_KEYS
from masan.model import masan_loss
from masan.train.engine import grad_norm

DIVERGED_FIX = ("check the input data (python data_tools/inspect_store.py --verify), then train in a new run_dir "
                "with a lower optim.lr, an optim.grad_clip or train.precision=fp32 (a resume keeps the run's settings, "
                "and its steps would diverge again)")
"""What to do when training diverged (a non-finite loss or gradient norm)."""


class Diverged(FloatingPointError):
    """Training diverged: a non-finite loss or gradient norm, raised on every rank at the same step.

    Not a crash that a restart cures: resumed from its last checkpoint, the run takes the same
    steps and diverges again, so launchers end it without a restart (exit 3:
    ``launch.slurm.jobs.EXIT_DIVERGED``)."""


def check_grad_norm(engine, step: int, phase: str, rank: int) -> float | None:
    """The optimizer step's global gradient norm (the same on every rank); a non-finite one that
    was applied stops the run before anything is saved, so the last checkpoint holds the last
    finite weights. (In bf16 DeepSpeed does not scan for overflow: ``bf16.check_grad_overflow``
    is off, masan.train.engine.)"""
    norm = grad_norm(engine)
    # an fp16 step skipped by the loss scaler (norm inf, weights untouched) is not an error
    if norm is not None and not math.isfinite(norm) and engine.was_step_applied():
        raise Diverged(
            f"the {phase} gradient norm is {norm} at step {step + 1} on rank {rank}: the weights of this step are "
            f"not finite and were not saved; {DIVERGED_FIX}")
    return norm


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed skipped so far for non-finite gradients (overflow)."""
    return int(getattr(engine, "skipped_steps", 0) or 0)


def term_grad_norms(model: torch.nn.Module, batch: dict, loss_cfg, phase: str,
                    class_weight: torch.Tensor | None = None) -> dict[str, float]:
    """Norm of each loss term's gradient over all parameters on ``batch``, as weighted in eq. 8
    (``grad_norm_<term>``: alpha * recon_t1, beta * recon_fmri, ce), so the balance of eq. 8 is
    visible.

    A side pass on detached copies of the weights (``torch.func.functional_call``): the
    engine's gradient hooks (ZeRO buckets) never see it, the step's gradients are untouched, and
    the random streams (dropout) are left where they were, so the trained weights do not depend
    on whether norms are logged.
    Costs one forward and one backward per term, every ``log.grad_norm_every_steps`` steps.
    Eager also where ``model.compile`` compiled the modality modules: swapped-in weights would
    fail the compiled graphs' guards (a recompile each time), and one forward with a backward
    per term is not what CUDA graphs (``model.compile_mode: reduce-overhead``) replay.
    """
    params = {n: q.detach().requires_grad_(q.requires_grad) for n, q in model.named_parameters()}
    leaves = [q for q in params.values() if q.requires_grad]
    weights = {"recon_t1": loss_cfg.alpha, "recon_fmri": loss_cfg.beta, "ce": 1.0 if phase == "joint" else 0.0}
    device = next(iter(params.values())).device
    # the side pass's dropout draws from a forked generator: with the step's own stream shared,
    # every later dropout mask would move, and a logging setting (plumbing) would change the weights
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.compiler.set_stance("force_eager"):
        out = torch.func.functional_call(model, params, kwargs={k: batch.get(k) for k in MODALITY_KEYS},
                                         strict=False)
    loss = masan_loss(out, batch, loss_cfg, phase=phase, class_weight=class_weight)
    norms = {}
    for name, weight in weights.items():
        term = loss[name]
        if not term.requires_grad or weight == 0.0:
            continue
        grads = torch.autograd.grad(term, leaves, retain_graph=True, allow_unused=True)
        sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
        norms[f"grad_norm_{name}"] = weight * math.sqrt(sq)
    return norms
