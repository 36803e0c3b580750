"""The training objective (eq. 1, 7, 8), term by term.

``L = alpha * Ls + beta * Lf + Lreg`` (eq. 8) with
``Ls = recon(t1_recon, t1) + lambda * mean|t1_code|`` and likewise ``Lf`` for fMRI
(reconstruction plus the L1 sparsity penalty of eq. 1 on the bottleneck encoding; the mean
instead of eq. 1's sum keeps lambda independent of the resolution), and ``Lreg`` the
cross-entropy of eq. 7. Everything is computed in fp32 whatever the autocast dtype.

Phase ``pretrain`` (the paper pre-trains the feature extraction network on the
reconstruction loss first) optimises ``alpha * Ls + beta * Lf`` only, but adds
``0 * Lreg`` so every parameter (fusion, attention, classifier) stays in the autograd graph and
gets a (zero) gradient, which DDP and DeepSpeed ZeRO expect on every rank at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from masan.config import LossConfig

PHASES = ("pretrain", "joint")
"""Phase 1: reconstruction pretraining of sPM/fPM; phase 2: the full loss (eq. 8)."""


def _reconstruction(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction of shape {tuple(recon.shape)} does not match its input {tuple(target.shape)}")
    if kind == "mse":
        return F.mse_loss(recon.float(), target.float())
    if kind == "l1":
        return F.l1_loss(recon.float(), target.float())
    raise ValueError(f"loss.recon={kind!r}: use 'mse' or 'l1'")


def class_weights(labels: list[int], num_classes: int, kind: str) -> torch.Tensor | None:
    """fp32 ``(num_classes,)`` cross-entropy weights for ``loss.class_weights`` from the training
    subjects' ``labels`` (class indices), or None for ``none``. ``balanced``: ``n / (k * n_c)``
    with k the classes present; a class absent from the labels gets weight 0 (it cannot be
    learnt, and DeepSpeed's ranks must agree on the weights, so they come from the whole split)."""
    if kind == "none":
        return None
    if kind != "balanced":
        raise ValueError(f"loss.class_weights={kind!r}: use 'none' or 'balanced'")
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def masan_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], loss_cfg: LossConfig,
               phase: str = "joint", class_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one batch as fp32 scalars: ``total``, ``recon_t1``, ``recon_fmri``,
    ``sparsity_t1``, ``sparsity_fmri`` (already multiplied by lambda) and ``ce``.

    ``out``: the model's output dict; a modality the model does not reconstruct (switched
    off) gives zero terms. ``batch``: the dataset dict with
    ``"label" (B,) int64`` and ``"t1"``/``"fmri"`` for the modalities reconstructed.
    ``loss_cfg.label_smoothing`` smooths the cross-entropy's targets (an ordinal head's
    log-probabilities pass ``log_softmax`` unchanged, so it applies to both heads alike).
    ``class_weight``: ``(C,)`` weights of the cross-entropy (:func:`class_weights`): each
    subject's (smoothed) cross-entropy is multiplied by its class's weight and the batch takes
    the mean. Balanced weights average 1 over the training part, so a batch's loss is an
    unbiased estimate of the training part's weighted loss whatever the micro-batch, gradient
    accumulation or number of ranks. (``F.cross_entropy``'s weighted mean divides by the batch's
    weight sum instead, which cancels the weights of a batch of one class: at micro-batch 1 they
    did nothing.)
    """
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: use one of {PHASES}")
    logits = out["logits"]
    zero = logits.new_zeros((), dtype=torch.float32)
    weight = None if class_weight is None else class_weight.to(logits.device, torch.float32)
    labels = batch["label"].to(logits.device)
    per_subject = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=loss_cfg.label_smoothing)
    terms = {"ce": (per_subject if weight is None else per_subject * weight[labels]).mean()}
    modality = {}
    for name in ("t1", "fmri"):
        if f"{name}_recon" in out:
            if name not in batch:
                raise ValueError(f"the model reconstructs {name} but the batch has no {name!r} entry")
            terms[f"recon_{name}"] = _reconstruction(out[f"{name}_recon"], batch[name], loss_cfg.recon)
            terms[f"sparsity_{name}"] = loss_cfg.sparsity * out[f"{name}_code"].float().abs().mean()
        else:
            terms[f"recon_{name}"] = terms[f"sparsity_{name}"] = zero
        modality[name] = terms[f"recon_{name}"] + terms[f"sparsity_{name}"]
    autoencoders = loss_cfg.alpha * modality["t1"] + loss_cfg.beta * modality["fmri"]
    ce_weight = 1.0 if phase == "joint" else 0.0
    terms["total"] = autoencoders + ce_weight * terms["ce"]
    return terms
