"""Config values no run can use, refused when a config loads (:func:`validate_config`): one
rule per key (:data:`_RULES`), finite floats everywhere, and the few rules between keys."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from masan.config.schema import ConfigError, ModelConfig, RunConfig, SplitConfig, get_dotted

REGION_POOL_MODES = ("avg", "max")
"""The pooling modes ``model.region_pool`` may list (:data:`masan.model.regions.POOL_MODES`, which
the config cannot import without importing torch; tests/test_config_rules.py keeps them equal)."""
ZERO_STAGES = (0, 1, 2)
"""The ZeRO stages the engine runs: 3 shards the weights, but rank 0 evaluates the whole model alone."""
ZERO_BUCKET_ALIGN = 2
"""DeepSpeed's ZeRO 1/2 optimizer asserts that its all-gather bucket is a multiple of this
(``nccl_start_alignment_factor``: 4 bytes of fp16), while it is built, after the run started."""
SPLIT_SEEDS = 2**32
"""scikit-learn's random states: ``split.seed + split.repeat`` must lie in ``[0, SPLIT_SEEDS)``."""
MIN_TRAIN_SHARE = 0.25
"""Smallest share of the cohort the training part may keep, ``(1 - split.test_fraction) x (1 -
split.val_fraction)`` (the validation part is carved from the training part). The paper trains
on 0.7 of it, the shipped configs on 0.63 to 0.7; below a quarter the held-out parts outnumber
the training subjects three to one: a misread fraction (``val_fraction`` taken as a share of the
whole cohort), not a protocol. Whether a given cohort splits at all is checked at training start
(:func:`masan.data.splits.make_split`)."""


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


def _odd_positive(v) -> bool:
    return v > 0 and v % 2 == 1


def _pool_modes(v) -> bool:
    return bool(v) and set(v) <= set(REGION_POOL_MODES) and len(set(v)) == len(v)


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
    ("train.zero_bucket_elements", lambda v: v > 0 and v % ZERO_BUCKET_ALIGN == 0,
     f"a positive multiple of {ZERO_BUCKET_ALIGN} elements (DeepSpeed's alignment), e.g. 200000000"),
    ("train.zero_stage", lambda v: v in ZERO_STAGES, "ZeRO stage 0, 1 or 2 (3 shards the weights, but rank 0 "
     "evaluates the whole model alone; a conv autoencoder fits without it)"),
    ("split.test_fraction", _fraction_open, "a fraction strictly between 0 and 1 (the paper: 0.3)"),
    ("split.val_fraction", _fraction_right_open, "0 (no validation part) or a fraction below 1, e.g. 0.1"),
    ("split.repeat", _non_negative, "a repeat index of 0 or more"),
    ("split.seed", lambda v: 0 <= v < SPLIT_SEEDS, f"a seed from 0 to {SPLIT_SEEDS - 1}, e.g. 1234"),
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
    ("data.classes", lambda v: len(v) >= 2 and len(set(v)) == len(v), "at least two distinct classes, e.g. [NC, AD]"),
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
    ("model.attn_dim", _positive, "a positive query/key width, e.g. 64"),
    ("model.value_dim", _positive, "a positive value width, e.g. 64 (0 would leave the classifier no input)"),
    ("model.mlp_hidden", _non_negative, "a hidden width, e.g. 256, or 0 for one fully connected layer"),
    ("model.temporal_features", _positive, "a positive number of temporal-conv features, e.g. 32"),
    ("model.temporal_kernel", _positive, "a positive kernel length in frames, e.g. 8"),
    ("model.temporal_stride", _positive, "a positive stride in frames, e.g. 4"),
    ("model.temporal_chunk", _non_negative, "0 (all voxels at once) or a number of voxels, e.g. 16384"),
    ("model.channel_reduction", _positive, "a positive divisor of the channel-attention width, e.g. 4"),
    ("model.spatial_kernel", _positive, "a positive kernel size, e.g. 3"),
    ("model.fusion_cells", _positive, "at least 1 cell per region and axis, e.g. 1"),
    ("model.region_pool", _pool_modes, f"a non-empty list of distinct modes out of {list(REGION_POOL_MODES)}, "
     "e.g. [avg, max]"),
    ("model.hfcn_features", _positive, "a positive feature width, e.g. 64"),
    ("model.hfcn_region_group", _positive, "at least 1 patch per axis, e.g. 2"),
    ("model.patch_chunk", _non_negative, "0 (all patches at once) or a number of patches per pass, e.g. 16"),
    ("model.dropout", _fraction_right_open, "a probability in [0, 1), e.g. 0.2"),
    ("model.region_std_floor", _non_negative, "0 or more, e.g. 0.1"),
    ("model.head_grad_to_encoders", _non_negative, "0 (default) or a positive scale, e.g. 1"),
    ("model.occlusion_limit_gib", _positive, "a positive number of GiB, e.g. 4"),
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
    _check_inputs(cfg)
    if cfg.split.seed + cfg.split.repeat >= SPLIT_SEEDS:
        raise ConfigError(f"split.seed={cfg.split.seed} + split.repeat={cfg.split.repeat} is past the largest split "
                          f"seed {SPLIT_SEEDS - 1} (repeat r splits with seed + r); lower split.seed")
    if bool(cfg.model.connectivity_cells) != bool(cfg.model.connectivity_keep):
        raise ConfigError(f"model.connectivity_cells={cfg.model.connectivity_cells} and model.connectivity_keep="
                          f"{cfg.model.connectivity_keep}: set both (connectivity on) or neither")
    if cfg.model.screen_features and cfg.model.screen_fraction:
        raise ConfigError(f"model.screen_features={cfg.model.screen_features} and model.screen_fraction="
                          f"{cfg.model.screen_fraction} are both set; give one of them (the other 0)")
    _check_groups(cfg.model)


def validate_for_training(cfg: RunConfig) -> None:
    """Refuse what a config may hold but no new training should start with (ConfigError, naming
    the keys and the fix): an even spatial kernel, loss weights that leave an autoencoder or the
    pretraining nothing to learn, a training share under :data:`MIN_TRAIN_SHARE`, fp16 on raw
    intensities, a cache folder or reserve that would overrun memory. Checked at
    every start (and on the login node before a job is queued), not when a config loads: a
    finished run's config.yaml holding one of them must still be read by evaluate, predict and
    status."""
    if not _odd_positive(cfg.model.spatial_kernel):
        raise ConfigError(f"model.spatial_kernel={cfg.model.spatial_kernel}: use an odd kernel size, e.g. 3 (the conv "
                          "pads kernel // 2 voxels on each side, which keeps the region map's size only for an odd "
                          "kernel)")
    _check_encoders_learn(cfg)
    _check_train_share(cfg.split)
    if not cfg.data.cache_dir.strip():
        raise ConfigError("data.cache_dir='' would put the host cache in the current folder; give a shared-memory "
                          "folder, e.g. /dev/shm")
    if cfg.train.precision == "fp16" and not cfg.data.normalize:
        raise ConfigError("train.precision=fp16 with data.normalize=false feeds raw intensities to the model, where "
                          "fp16's largest value (65504) is within reach of T1 scanners' units and of the first "
                          "layers' sums; use data.normalize=true (the default) or train.precision=bf16")
    if cfg.data.cache_reserve_gib < 0:
        raise ConfigError(f"data.cache_reserve_gib={cfg.data.cache_reserve_gib} would let the cache take more than "
                          "the free memory; give 0 or more GiB to leave free, e.g. 8")


def _autoencoders(model: ModelConfig) -> dict[str, tuple[str, list[int]]]:
    """Modality -> (key, widths) of each autoencoder the model builds and reconstructs with: sPM's
    ``model.channels`` (MASAN with T1, and the H-FCN, which is T1 only), fPM's ``model.fmri_channels``."""
    out = {}
    if model.arch == "hfcn" or model.modalities in ("both", "t1"):
        out["t1"] = ("model.channels", model.channels)
    if model.arch == "masan" and model.modalities in ("both", "fmri"):
        out["fmri"] = ("model.fmri_channels", model.fmri_channels)
    return out


def _model_choice(model: ModelConfig) -> str:
    """The keys that decide which images the model reads, as the user would set them."""
    return "model.arch=hfcn" if model.arch == "hfcn" else f"model.modalities={model.modalities}"


def _check_inputs(cfg: RunConfig) -> None:
    """Every autoencoder the model builds has its images loaded: without them the first step
    fails on a batch that lacks them."""
    for m in _autoencoders(cfg.model):
        key = f"data.use_{m}"
        if not get_dotted(cfg, key):
            raise ConfigError(f"{_model_choice(cfg.model)} reads the {m} images, but {key}=false leaves them out of "
                              f"every batch; set {key}=true, or choose a model without them (model.modalities)")


def unused_inputs(cfg: RunConfig) -> list[str]:
    """One line per modality the data loads and the model never reads (each sample would read,
    decode and cache it for nothing; the store must still hold it for every subject), and for
    connectivity pairs asked of a model that reads no fMRI (its config.yaml would say they are on)."""
    used = _autoencoders(cfg.model)
    out = [f"data.use_{m}=true, but {_model_choice(cfg.model)} never reads the {m} images: every sample reads "
           f"them for nothing (and subjects without them are refused); set data.use_{m}=false"
           for m in ("t1", "fmri") if get_dotted(cfg, f"data.use_{m}") and m not in used]
    if cfg.model.connectivity_cells and "fmri" not in used:
        out.append(f"model.connectivity_cells={cfg.model.connectivity_cells} is ignored: {_model_choice(cfg.model)} "
                   "reads no fMRI, so the model has no connectivity pairs; set model.connectivity_cells=0")
    return out


def _check_groups(model: ModelConfig) -> None:
    """GroupNorm splits the channels of every autoencoder level after InitConv (which has no norm)
    into ``model.groups`` equal groups, so the model cannot be built unless it divides them."""
    g = model.groups
    for key, widths in _autoencoders(model).values():
        bad = [w for w in widths[1:] if w % g]
        if bad:
            common = math.gcd(*widths[1:])
            fix = max(d for d in range(1, min(g, common) + 1) if common % d == 0)
            raise ConfigError(f"model.groups={g} does not divide the width(s) {bad} of {key}={widths}: GroupNorm "
                              "splits each level's channels after the first into equal groups; use a divisor of "
                              f"{widths[1:]}, e.g. model.groups={fix}")


def _check_encoders_learn(cfg: RunConfig) -> None:
    """The encoders learn from their reconstruction terms, weighted by ``loss.alpha`` (T1) and
    ``loss.beta`` (fMRI), in both phases, and from the classifier only through
    ``model.head_grad_to_encoders``; ``loss.sparsity`` lies inside those terms. With no weighted term
    the pretrain phase optimises a loss that is identically 0; an autoencoder whose term weighs 0,
    cut off from the classifier, keeps its random weights (the classifier trains on noise features)."""
    weights = {"t1": ("loss.alpha", cfg.loss.alpha), "fmri": ("loss.beta", cfg.loss.beta)}
    models = _autoencoders(cfg.model)
    if cfg.train.pretrain_epochs and not any(weights[m][1] for m in models):
        raise ConfigError(f"loss.alpha={cfg.loss.alpha} and loss.beta={cfg.loss.beta} weigh no reconstruction term of "
                          f"the model's autoencoders, so the train.pretrain_epochs={cfg.train.pretrain_epochs} "
                          "pretraining epochs minimise a loss that is identically 0; give loss.alpha (T1) or "
                          "loss.beta (fMRI) a positive weight (the paper: 0.5 each)")
    if cfg.model.head_grad_to_encoders:
        return
    for m, (key, _) in models.items():
        name, weight = weights[m]
        if not weight:
            raise ConfigError(f"{name}={weight} weighs the {m} autoencoder's reconstruction ({key}) at 0, and "
                              "model.head_grad_to_encoders=0 keeps the classifier's gradient from it: it would never "
                              f"learn (the classifier would train on its random features); give {name} a positive "
                              "weight (the paper: 0.5), set model.head_grad_to_encoders above 0, or leave the "
                              "modality out (model.modalities)")


def _check_train_share(split: SplitConfig) -> None:
    share = (1 - split.test_fraction) * (1 - split.val_fraction)
    if share < MIN_TRAIN_SHARE:
        raise ConfigError(f"split.test_fraction={split.test_fraction} and split.val_fraction={split.val_fraction} "
                          f"leave {share:.0%} of the subjects for training (the validation part is a share of the "
                          f"training part: (1 - test) x (1 - val)); keep at least {MIN_TRAIN_SHARE:.0%}: lower "
                          "them (the paper: 0.3 and 0)")
