"""Config values no run can use, refused when a config loads (:func:`validate_config`): one
rule per key (:data:`_RULES`), finite floats everywhere, and the few rules between keys."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from masan.config.schema import ConfigError, RunConfig, get_dotted


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction_open(v) -> bool:
    return 0 < v < 1


def _fraction_right_open(v) -> bool:
    return 0 <= v < 1


def _optional_positive(v) -> bool:
    return v is None or v > 0


def _optional(test):
    """``test``, or None."""
    return lambda v: v is None or test(v)


def _positive_list(n: int):
    """Test: exactly ``n`` values, all positive."""
    return lambda v: len(v) == n and all(x > 0 for x in v)


# (dotted key, test, what to use instead). Checked when a config loads, so a wrong value is
# refused before a job is submitted or a run directory touched; checks against the cohort
# (batch vs training subjects, class sizes vs fractions) need the store and run at training
# start (masan.train.run). Non-finite numbers (nan, inf) are refused for every float field.
_RULES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("optim.lr", _positive, "a positive learning rate, e.g. 1e-3"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1), e.g. [0.9, 0.999]"),
    ("optim.weight_decay", _non_negative, "0 or more"),
    ("optim.grad_clip", _non_negative, "0 (off) or a positive gradient-norm bound, e.g. 1.0"),
    ("optim.micro_batch", _positive, "at least 1 sample per rank per forward pass"),
    ("optim.grad_accum", _positive, "at least 1 micro-batch per optimizer step"),
    ("optim.warmup_steps", _non_negative, "0 or more optimizer steps"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a fraction of optim.lr in [0, 1], e.g. 0.05"),
    ("train.pretrain_epochs", _non_negative, "0 (no pretraining) or more epochs"),
    ("train.joint_epochs", _positive, "at least 1 epoch (0 would end with an untrained classifier)"),
    ("train.max_steps", _optional_positive, "null (all epochs) or at least 1 step"),
    ("run_dir", lambda v: bool(str(v).strip()), "a folder for the run, e.g. runs/my_run (empty would be the "
     "current folder)"),
    ("train.norm_refresh_epochs", _non_negative, "0 (refit only when the joint phase starts) or more epochs"),
    ("train.dist_timeout_minutes", _positive, "a positive number of minutes, e.g. 30"),
    ("train.zero_bucket_elements", _positive, "a positive number of elements, e.g. 200000000"),
    ("split.test_fraction", _fraction_open, "a fraction strictly between 0 and 1 (the paper: 0.3)"),
    ("split.val_fraction", _fraction_right_open, "0 (no validation part) or a fraction below 1, e.g. 0.1"),
    ("split.repeat", _non_negative, "a repeat index of 0 or more"),
    ("checkpoint.every_steps", _non_negative, "0 (never by step count) or more steps"),
    ("checkpoint.every_minutes", _non_negative, "0 (never by time) or more minutes"),
    ("checkpoint.keep", _positive, "at least 1 complete checkpoint"),
    ("log.every_steps", _positive, "at least 1 step"),
    ("log.eval_every_epochs", _non_negative, "0 (never) or more epochs"),
    ("log.grad_norm_every_steps", _non_negative, "0 (never) or more steps"),
    ("log.flush_secs", _positive, "at least 1 second"),
    ("loss.alpha", _non_negative, "a weight of 0 or more (the paper: 0.5)"),
    ("loss.beta", _non_negative, "a weight of 0 or more (the paper: 0.5)"),
    ("loss.sparsity", _non_negative, "a weight of 0 or more (the paper: 1e-4)"),
    ("loss.label_smoothing", _fraction_right_open, "0 (off, the paper) or a fraction below 1, e.g. 0.1"),
    ("model.screen_features", _non_negative, "0 (no screening) or a number of region features to keep"),
    ("model.screen_fraction", _fraction_right_open, "0 (no screening) or a fraction below 1, e.g. 0.0005"),
    ("model.connectivity_cells", _non_negative, "0 (off) or cells per region and axis, e.g. 2"),
    ("model.connectivity_keep", _non_negative, "0 (off) or a number of cell pairs to keep, e.g. 10"),
    ("data.num_workers", _non_negative, "0 (load in the training process) or more worker processes"),
    ("data.prefetch_factor", _positive, "at least 1 batch per worker"),
    ("data.worker_timeout_minutes", _non_negative, "0 (wait forever) or minutes, e.g. 30"),
    ("data.fmri_frames", _optional_positive, "null (all frames) or at least 1 frame"),
    ("data.classes", lambda v: len(v) >= 2, "at least two classes, e.g. [NC, AD]"),
    ("data.augment.rotate_deg", lambda v: 0 <= v <= 180, "0 (off) or a small angle in degrees, e.g. 5"),
    ("data.augment.shift", _fraction_right_open, "0 (off) or a small fraction of the field of view, e.g. 0.02"),
    ("data.augment.scale", _fraction_right_open, "0 (off) or a small fraction, e.g. 0.05"),
    ("data.augment.intensity", _fraction_right_open, "0 (off) or a small fraction, e.g. 0.1"),
    ("model.t1_shape", _optional(_positive_list(3)), "three positive sizes (X, Y, Z), or null (the store's)"),
    ("model.fmri_shape", _optional(_positive_list(3)), "three positive sizes (X, Y, Z), or null (the store's)"),
    ("model.patch_grid", _positive_list(3), "three positive counts, e.g. [4, 4, 4]"),
    ("model.channels", _positive_list(4), "four positive widths, e.g. [32, 64, 128, 128]"),
    ("model.fmri_channels", _positive_list(4), "four positive widths, e.g. [32, 64, 128, 128]"),
    ("model.fmri_frames", _optional_positive, "at least 1 frame, or null (data.fmri_frames, or the store's)"),
    ("model.groups", _positive, "at least 1 GroupNorm group"),
    ("model.dropout", _fraction_right_open, "a probability in [0, 1), e.g. 0.2"),
    ("model.region_std_floor", _non_negative, "0 or more, e.g. 0.1"),
    ("model.head_grad_to_encoders", _non_negative, "0 (default) or a positive scale, e.g. 1"),
)


def _float_leaves(node: Any, prefix: str = ""):
    """(dotted key, value) of every float in a config (lists included)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _float_leaves(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _float_leaves(v, f"{prefix}[{i}]")
    elif isinstance(node, float):
        yield prefix, node


def validate_config(cfg: RunConfig) -> None:
    """Refuse values no run can use (nan, a fraction above 1, negative epochs, ...).

    Raises ConfigError naming the key, its value and what to use instead; called by every
    loader (:func:`config_from_dict`, :func:`load_config`).
    """
    for key, value in _float_leaves(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not a finite number; give a finite value")
    for key, ok, fix in _RULES:
        value = get_dotted(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range; use {fix}")
    if cfg.data.positive_class not in cfg.data.classes:  # else found only when the trained run is scored
        raise ConfigError(f"data.positive_class={cfg.data.positive_class!r} is not one of data.classes="
                          f"{cfg.data.classes}; set data.positive_class to the class that precision and recall "
                          "count as positive (the paper: AD)")
    if not (cfg.data.use_t1 or cfg.data.use_fmri):
        raise ConfigError("data.use_t1 and data.use_fmri are both false; a run needs at least one modality")
    if bool(cfg.model.connectivity_cells) != bool(cfg.model.connectivity_keep):
        raise ConfigError(f"model.connectivity_cells={cfg.model.connectivity_cells} and model.connectivity_keep="
                          f"{cfg.model.connectivity_keep}: set both (connectivity on) or neither")
    if cfg.model.screen_features and cfg.model.screen_fraction:
        raise ConfigError(f"model.screen_features={cfg.model.screen_features} and model.screen_fraction="
                          f"{cfg.model.screen_fraction} are both set; give one of them (the other 0)")
