"""One typed run configuration: YAML file + ``key.sub=value`` CLI overrides.

Every knob of a run lives here; modules receive the section they need and never read
constants of their own. A run writes the resolved config as ``config.yaml`` in its run
directory (see :func:`save_config`), and :func:`config_hash` fingerprints the parts that
must match for a checkpoint to be resumed.

Example::

    cfg = load_config("hpc/configs/demo.yaml", ["optim.lr=3e-4", "model.fusion=add"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from masan.files import atomic_write_text


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


# Field metadata: which keys may differ, and where (a flagged section counts whole). Two flags,
# because the two questions differ: an epoch budget may grow on resume but changes the result of
# a repeat; the repeat index changes the split, so no checkpoint serves it, but it is the one
# thing repeats of a method differ in.
RESUMABLE = "resumable"
"""May change between a checkpoint and its resume: :func:`config_hash` leaves the key out."""
SAME_METHOD = "same_method"
"""May differ between repeats of one method: the report (masan.evaluate.report) does not warn."""
HASHED_WHEN_SET = "hashed_when_set"
"""Added after runs existed: :func:`config_hash` leaves the key out while it has its default,
so checkpoints written before it existed still resume."""
PLUMBING = {RESUMABLE: True, SAME_METHOD: True}
"""Where and how a run runs, not what it computes: both of the first two flags."""


@dataclass
class AugmentConfig:
    """Train-only data augmentation (masan/data/transforms.py; not in the paper; all off by default).

    Each training sample draws its transform from a generator seeded by (seed, epoch, subject
    index): a resumed run, and any number of ranks or loader workers, draws the same transforms.
    T1 and every fMRI frame get the same spatial transform; validation and test subjects (and
    the fitted cohort standardisers) never see one."""

    flip: bool = False
    """Mirror the first axis (left-right in a store reoriented to RAS) with probability 0.5."""
    rotate_deg: float = 0.0
    """Rotation about each axis through the volume centre, uniform in ±rotate_deg degrees."""
    shift: float = 0.0
    """Translation along each axis, uniform in ±shift x the field of view (0.02: ±2 %)."""
    scale: float = 0.0
    """Zoom, uniform in 1 ± scale (the same along every axis)."""
    intensity: float = 0.0
    """Per modality, a gain uniform in 1 ± intensity and an offset uniform in ±intensity
    (z-score units; every frame of the fMRI run gets the same)."""


@dataclass
class DataConfig:
    """Where the cohort lives and how samples are shaped."""

    store: str = field(default="runs/cohort.zarr", metadata=PLUMBING)
    """Zarr store written by ``data_tools/to_zarr.py``."""
    classes: list[str] = field(default_factory=lambda: ["NC", "EMCI", "LMCI", "AD"])
    """Classes the model predicts, a subset of the store's classes, in output order.
    ``[NC, AD]`` gives the binary AD-vs-NC task; subjects of other classes are left out.
    Use ``merge`` to pool classes instead."""
    merge: dict[str, str] = field(default_factory=dict)
    """Store class -> model class, e.g. ``{EMCI: MCI, LMCI: MCI}`` for NC/MCI/AD."""
    positive_class: str = "AD"
    """Positive class for precision/recall (the paper: AD vs the rest)."""
    fmri_frames: int | None = None
    """Frames fed to the model: the first N of each run (None: all; runs must then agree)."""
    use_t1: bool = True
    use_fmri: bool = True
    normalize: bool = True
    """Z-score each subject with the statistics stored at conversion time (the fMRI only when
    ``fmri_temporal=none``)."""
    fmri_temporal: Literal["none", "psc", "mean_psc", "demean", "zscore"] = "none"
    """How the fMRI run reaches fPM (masan/data/temporal.py): ``none``: the whole 4-D run z-scored
    with one mean/std (fPM then mostly sees the static EPI image); ``psc``: each voxel's percent
    signal change around its temporal mean (fluctuation amplitude and correlations);
    ``mean_psc``: the z-scored temporal mean image plus those fluctuations at the same scale;
    ``demean``: each voxel minus its temporal mean, over the run's global temporal std;
    ``zscore``: each voxel's series standardised (correlations only)."""
    num_workers: int = field(default=2, metadata=PLUMBING)
    """DataLoader worker processes per rank."""
    prefetch_factor: int = field(default=2, metadata=PLUMBING)
    """Batches each worker (or, with a cache, the copy thread) prepares ahead of the step."""
    cache: Literal["none", "host", "device"] = field(default="none", metadata=PLUMBING)
    """Cohort cache for training (masan/data/cache.py): ``none``: every step decodes its subjects
    from the Zarr store in DataLoader workers; ``host``: each subject is decoded once per node
    into shared memory (``cache_dir``) as its stored integers, every rank maps it, batches are
    copied to the GPU asynchronously and scaled/z-scored there; ``device``: the same, then the
    whole cohort is copied into each rank's GPU memory (CPU memory on the CPU). Samples are
    numerically identical to ``none``."""
    cache_dir: str = field(default="/dev/shm", metadata=PLUMBING)
    """Shared-memory directory of the ``host`` cache (a tmpfs: its pages are RAM)."""
    cache_reserve_gib: float = field(default=8.0, metadata=PLUMBING)
    """Memory the cache must leave free (host RAM for ``host``, GPU memory for the model with
    ``device``), GiB; caching is refused before it starts when it would not."""
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={HASHED_WHEN_SET: True})
    """Train-only augmentation, off by default (see :class:`AugmentConfig`)."""


@dataclass
class ModelConfig:
    """MASAN architecture (see docs/paper-mapping.md for each choice)."""

    arch: Literal["masan", "hfcn"] = "masan"
    """``masan``: the paper's model; ``hfcn``: the T1-only H-FCN-style baseline."""
    t1_shape: list[int] | None = field(default_factory=lambda: [240, 256, 176])
    """T1 input (X, Y, Z) voxels; must be divisible by patch_grid (patch sizes need not be
    divisible by 2**levels: odd sizes are handled, e.g. 60 -> 30 -> 15 -> 8). null: the
    store's (training fills it in at start, masan/data/contract.py); a value must equal it."""
    fmri_shape: list[int] | None = field(default_factory=lambda: [60, 64, 44])
    """fMRI frame (X, Y, Z) voxels, same field of view as T1; each axis at least patch_grid
    (and divisible by it when ``fmri_layout=patches``). null: the store's, as ``t1_shape``."""
    fmri_layout: Literal["volume", "patches"] = "volume"
    """``volume``: fPM encodes the whole frame volume and its feature maps are pooled onto the
    patch grid; ``patches``: the frame volume is cut into the patch grid like T1."""
    fmri_frames: int | None = 976
    """Frames T per fMRI run entering fPM (input channels of InitConv, or the temporal conv's
    series) and reconstructed by its decoder. One number with ``data.fmri_frames``: null takes
    that one (or, both null, the store's run length); both set must agree."""
    patch_grid: list[int] = field(default_factory=lambda: [4, 4, 4])
    """Non-overlapping regions along X, Y, Z (paper: 4x4x4 = 64 regions)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    """sPM widths: InitConv output, then each of the three encoder levels (Table 1)."""
    fmri_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    """fPM widths, same layout as ``channels``."""
    fmri_time: Literal["channels", "temporal_conv"] = "channels"
    """How time enters fPM: frames as input channels, or a 1D temporal conv per voxel first."""
    temporal_features: int = 32
    """Output features of the temporal conv when ``fmri_time=temporal_conv``."""
    temporal_kernel: int = 8
    """Temporal conv kernel length (frames)."""
    temporal_stride: int = 4
    """Temporal conv stride (frames); the responses are then averaged over time."""
    temporal_chunk: int = 16384
    """Voxels per checkpointed piece of the temporal conv when activation_checkpointing is on
    (0: all voxels at once); its full-resolution response is ~2.6 GB in bf16 otherwise."""
    groups: int = 8
    """GroupNorm groups."""
    decoder_skips: Literal["all", "coarse", "none"] = "all"
    """Encoder-decoder concatenations of the autoencoders: ``all`` (Table 1), ``coarse`` (none at
    full resolution, so reconstruction has to pass through a downsampled level and pretraining
    shapes the deeper features), ``none`` (the code alone)."""
    upsample: Literal["trilinear", "nearest"] = field(default="trilinear", metadata={HASHED_WHEN_SET: True})
    """Decoder upsampling (Table 1's "upsampling", mode not given): ``trilinear`` (smooth), or
    ``nearest``, whose backward is a plain sum over each coarse voxel's children instead of
    trilinear's scattered atomic adds (see docs/performance.md for what each costs)."""
    region_pool: list[str] = field(default_factory=lambda: ["avg", "max"])
    """How each level's feature map is pooled onto the regions ("multiscale" features): any of
    ``avg``, ``max``; the pooled features of all modes are concatenated."""
    fusion_cells: int = 1
    """Cells per region and axis of the region maps that fusion works on (1: one vector per
    region; 2: a 2x2x2 sub-grid per region gives spatial attention finer resolution)."""
    connectivity_cells: int = field(default=0, metadata={HASHED_WHEN_SET: True})
    """Functional connectivity features (not in the paper; masan/model/connectivity.py): the
    Fisher-z correlations between the mean time courses of every pair of the fMRI's cells, ``k``
    cells per region and axis (``k`` = fMRI voxels per region: one cell per voxel), screened on
    their own (``connectivity_keep``) and joined to the classifier's input, so a coupling change
    between distant structures is visible to the head. 0: off (the paper)."""
    connectivity_keep: int = field(default=0, metadata={HASHED_WHEN_SET: True})
    """Cell pairs the connectivity screening keeps (ANOVA F on the training subjects, fitted with
    the region features' statistics); needed when ``connectivity_cells`` is set."""
    attn_dim: int = 64
    """Query/key width of region self-attention (eq. 3-5)."""
    region_norm: Literal["cohort", "layer"] = "cohort"
    """How region features are standardised before self-attention (not in the paper):
    ``cohort``: each feature by its mean/std over the training subjects, fitted by a no-grad
    pass after pretraining (and every ``train.norm_refresh_epochs``), all-reduced over ranks,
    frozen in between and kept in the checkpoint (keeps the between-subject differences,
    removes the anatomy all subjects share); ``layer``: LayerNorm over each region's features
    (per subject; the model then barely learns on the demo)."""
    region_std_floor: float = 0.1
    """``cohort`` standardisation divides by at least this fraction of the median feature std, so
    a nearly constant feature (background) does not amplify noise and its gradients."""
    screen_features: int = 0
    """Univariate screening before the region head (``region_norm=cohort`` only): keep the
    features (of regions x features) with the largest ANOVA F between the classes on the
    training subjects, fitted with the cohort statistics; the others are set to the cohort mean.
    0: keep all. Small cohorts need it (a focal effect among ~10^4-10^5 region features); see
    docs/paper-mapping.md."""
    screen_fraction: float = field(default=0.0, metadata={HASHED_WHEN_SET: True})
    """Screening as a fraction of all region features (regions x features), instead of the count
    ``screen_features`` (give one of the two): a focal effect covers a constant fraction of the
    brain, so at a finer grid or wider model the same fraction keeps the same anatomy, where a
    fixed count keeps ever less of it. Kept features: ``max(1, round(fraction * total))``."""
    value_dim: int = 64
    """Value width of region self-attention: features per region fed to the classifier."""
    fusion: Literal["attention", "add"] = "attention"
    """T1-guided attention fusion (eq. 6) or element-wise addition (the paper's ablation)."""
    channel_reduction: int = 4
    """Hidden width divisor of the channel-attention MLP (CBAM's r)."""
    spatial_kernel: int = 3
    """Kernel of the spatial-attention conv over the region map (odd)."""
    modalities: Literal["both", "t1", "fmri"] = "both"
    region_weights: Literal["occlusion", "attention", "embedding"] = "occlusion"
    """What ``out["region_weights"]`` (the region ranking and figures) reports: ``occlusion``:
    how much the predicted class probabilities change when the region's features are set to the
    cohort mean (which regions carry the decision); ``attention``: attention each region
    receives (column mean of eq. 4: where the model looks, not what decides); ``embedding``:
    the norm of each region's fused embedding (the paper's Fig. 4)."""
    head_grad_to_encoders: float = 0.0
    """Scale of the classifier's gradient (eq. 7) flowing back into sPM/fPM through the region
    maps. 0 (default): the encoders learn from the reconstruction terms of eq. 8 only and the
    region head (fusion, attention, MLP) from the cross-entropy, on features whose cohort
    statistics stay valid between fits. 1: end to end, as the paper may have meant; with
    fitted (frozen) standardisation the classifier's gradient, amplified by 1/std, moves the
    encoders' features far from their fitted statistics within an epoch and the head
    collapses to one class (docs/paper-mapping.md). H-FCN (``arch=hfcn``) takes the same
    setting: its patch autoencoder learns from reconstruction like sPM."""
    mlp_hidden: int = 256
    dropout: float = 0.2
    hfcn_region_group: int = 2
    """H-FCN baseline: neighbouring patches per axis merged into one region-level unit."""
    hfcn_features: int = 64
    """H-FCN baseline: width of the patch-level and region-level features."""
    patch_chunk: int = 0
    """Patches per pass through the patch autoencoder (0: all at once); lowers the peak of
    activation recomputation at full resolution."""
    activation_checkpointing: bool = False
    """Recompute each encoder/decoder block in backward (torch.utils.checkpoint, non-reentrant)."""
    channels_last: bool = False
    """Lay the patches' and volumes' activations out as ``torch.channels_last_3d`` (NDHWC) from
    the input on: cuDNN runs bf16 3-D convs natively in that layout (NCDHW costs a conversion
    around each, a noticeable share of a CUDA step: docs/performance.md, "the engine's step")
    and the fast paths keep it. Eager CUDA
    GroupNorm converts back, so it is meant with ``model.compile`` (inductor's norm follows the
    layout); not yet measured on a GPU with the layout kept end to end (docs/performance.md)."""
    compile: bool = field(default=False, metadata=PLUMBING)
    """Training compiles the modality modules (sPM, fPM: the autoencoders and their region
    pooling, nearly all of a step's time; the H-FCN's patch encoder) with ``torch.compile``, in
    place (checkpoints are unchanged). On CUDA at full resolution (bf16) it makes the DeepSpeed
    step faster, after minutes of compiling at the first start, so it pays off only on long
    runs (docs/performance.md, "the engine's step"); restarts read the kernels from
    ``compile_cache`` instead of compiling again (docs/performance.md, "Without a GPU")."""
    compile_backend: str = field(default="inductor", metadata=PLUMBING)
    """The ``torch.compile`` backend of ``compile``: ``inductor`` (generated kernels), or
    ``aot_eager`` (traced, nothing generated: checks that the model compiles, as the tests do)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = field(
        default="default", metadata=PLUMBING)
    """inductor's ``torch.compile`` mode: ``reduce-overhead`` replays each compiled forward and
    backward as CUDA graphs (one launch instead of hundreds: a compiled DeepSpeed step keeps the
    host busy longer than the GPU, so it is bound by the host's launches; docs/performance.md,
    "Without a GPU"), at the price of static memory pools; other backends ignore it."""
    compile_cache: str = field(default="", metadata=PLUMBING)
    """Where inductor keeps what it compiled (``TORCHINDUCTOR_CACHE_DIR``, set by the run; this
    key wins over the variable): empty is ``run_dir/compile_cache``, which every restart
    (preemption, time limit, crash) and every node of the job reads, so only the first start
    pays the full compile (minutes cold, seconds from the cache: docs/performance.md,
    "Without a GPU"). Inductor's default is node-local ``/tmp``."""

    def screen_keep(self, total: int) -> int:
        """Region features the screening keeps out of ``total`` (``screen_features`` or
        ``screen_fraction`` of it; 0: no screening)."""
        if self.screen_fraction:
            return max(1, round(self.screen_fraction * total))
        return self.screen_features


@dataclass
class LossConfig:
    """L = alpha * Ls + beta * Lf + CE (eq. 8), Ls/Lf with the L1 sparsity term of eq. 1."""

    alpha: float = 0.5
    beta: float = 0.5
    sparsity: float = 1e-4
    """lambda of eq. 1, on the mean absolute bottleneck encoding."""
    recon: Literal["mse", "l1"] = "mse"
    class_weights: Literal["none", "balanced"] = field(default="none", metadata={HASHED_WHEN_SET: True})
    """Weights of the classes in the cross-entropy (eq. 7, which has none): ``balanced`` weighs
    class c by ``n / (k * n_c)`` over the training subjects (scikit-learn's convention), so a
    cohort with ADNI's proportions (AD the largest class) is not learnt as "call everyone the
    largest class"; ``none``: every subject counts once, as in the paper."""


@dataclass
class OptimConfig:
    """Adam (torch.optim.Adam inside DeepSpeed) and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate (the paper: 1e-3)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); 0 disables it."""
    micro_batch: int = 1
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch * grad_accum * ranks."""
    warmup_steps: int = 0
    """Linear warmup at the start of EACH phase (optimizer steps)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Per phase: warmup, then constant or cosine decay to ``lr * min_lr_ratio`` at the
    phase's last step. Each phase (pretrain, joint) runs its own schedule."""
    min_lr_ratio: float = 0.05


@dataclass
class TrainConfig:
    """Phases, precision and parallelism of the DeepSpeed engine."""

    pretrain_epochs: int = field(default=100, metadata={RESUMABLE: True})
    """Phase 1: reconstruction-only pretraining of sPM/fPM (and of H-FCN's patch autoencoder)."""
    joint_epochs: int = field(default=700, metadata={RESUMABLE: True})
    """Phase 2: the full loss of eq. 8."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Model/activation dtype; Adam keeps fp32 master weights for bf16/fp16. fp16 needs CUDA."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0, 1 or 2 (3 is refused: rank 0 evaluates the whole model)."""
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=PLUMBING)
    """auto: CUDA when a GPU is visible, else the CPU (DS_ACCELERATOR=cpu, gloo)."""
    max_steps: int | None = field(default=None, metadata={RESUMABLE: True})
    """Stop after this many optimizer steps in total (smoke tests); None: all epochs."""
    norm_refresh_epochs: int = 5
    """Refit the cohort standardisers (``model.region_norm=cohort``) on all training subjects every
    N joint epochs (a no-grad pass, ~1/3 of an epoch's compute); they are always fitted when the
    joint phase starts. 0: only then."""
    rescreen_on_refresh: bool = False
    """With screening (``model.screen_features``), refits after the first also choose the kept
    features anew (True), or keep the first fit's choice and refresh only mean and std (False).
    A late re-screen swaps the features the head was trained on; on the realistic cohort one
    split's training loss jumped 0.59 -> 1.57 and never recovered (docs/validation-cohort.md)."""
    dist_timeout_minutes: float = field(default=30.0, metadata=PLUMBING)
    """Collective timeout; long checkpoint saves on slow file systems need headroom."""
    zero_bucket_elements: int = field(default=200_000_000, metadata=PLUMBING)
    """ZeRO gradient reduce / allgather bucket (elements), capped at the model's parameter
    count: DeepSpeed allocates it per step, which a large bucket makes slow on the CPU."""


@dataclass
class SplitConfig:
    """Stratified subject-level train/test split (the paper: 70/30, repeated 10 times)."""

    test_fraction: float = 0.3
    """Fraction of each class's subjects held out for the final test (never for model selection)."""
    val_fraction: float = 0.0
    """Fraction of the training part (stratified, subject-level; at least one subject per class)
    held out as a validation part, saved in split.json, monitored every ``log.eval_every_epochs``
    and never trained on. 0 (the paper's protocol: no validation set): nothing is monitored."""
    repeat: int = field(default=0, metadata={SAME_METHOD: True})
    """Repeat index; each repeat is a different split seed, nothing else changes."""
    seed: int = 1234
    """Base seed: repeat r splits with random state ``seed + r`` (scikit-learn train_test_split)."""


@dataclass
class CheckpointConfig:
    """When complete checkpoints are written (always also at phase ends and on stop)."""

    every_steps: int = 500
    """Save every N optimizer steps (0: never by step count)."""
    every_minutes: float = 30.0
    """Save when this many minutes passed since the last save (0: never by time)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    at_epoch_end: bool = True
    """Also save at the end of every epoch. Turn off when epochs last a few steps (a small
    cohort on many ranks), where epoch-end saves would cost more than the training itself;
    every_steps / every_minutes then bound what a crash can lose."""


@dataclass
class LogConfig:
    """TensorBoard (rank 0) under ``run_dir/tb``."""

    every_steps: int = 10
    """Scalars (loss terms, LR, samples/s, GPU memory) every N optimizer steps."""
    tensorboard: bool = True
    eval_every_epochs: int = 10
    """Validation-part metrics (``split.val_fraction``) and region-weight images every N joint
    epochs (0: never), logged under ``monitor_val/``. The test part is touched only by the final
    evaluation."""
    grad_norm_every_steps: int = 50
    """Log the gradient norm of each loss term (``train/grad_norm_<term>``) every N optimizer
    steps, from a side pass (one forward and one backward per term there); 0: never."""
    flush_secs: int = 30


@dataclass
class RunConfig:
    """Everything one training run needs; saved as ``run_dir/config.yaml`` at every start."""

    run_dir: str = field(default="runs/default", metadata=PLUMBING)
    """Checkpoints, TensorBoard events, split, predictions. A new run_dir starts fresh."""
    seed: int = 0
    """Seeds model init, dropout and data order (per epoch: seed + epoch)."""
    deterministic: bool = False
    """Deterministic algorithms and data order (bit-identical resume on the same hardware)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=PLUMBING)
    log: LogConfig = field(default_factory=LogConfig, metadata=PLUMBING)

    @property
    def epochs(self) -> dict[str, int]:
        """Epochs each phase trains: ``train.pretrain_epochs`` and ``train.joint_epochs`` (the
        H-FCN baseline pretrains its patch autoencoder like MASAN's sPM)."""
        return {"pretrain": self.train.pretrain_epochs, "joint": self.train.joint_epochs}


# --------------------------------------------------------------------------- loading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type; raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.strip(), value


def config_from_dict(values: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from a nested dict plus dotted overrides (validated)."""
    tree = json.loads(json.dumps(values or {}))  # deep copy, plain types
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(tree, k, v)
    cfg = _build(RunConfig, tree)
    validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


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
    ("model.screen_features", _non_negative, "0 (no screening) or a number of region features to keep"),
    ("model.screen_fraction", _fraction_right_open, "0 (no screening) or a fraction below 1, e.g. 0.0005"),
    ("model.connectivity_cells", _non_negative, "0 (off) or cells per region and axis, e.g. 2"),
    ("model.connectivity_keep", _non_negative, "0 (off) or a number of cell pairs to keep, e.g. 10"),
    ("data.num_workers", _non_negative, "0 (load in the training process) or more worker processes"),
    ("data.prefetch_factor", _positive, "at least 1 batch per worker"),
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


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def validate_config(cfg: RunConfig) -> None:
    """Refuse values no run can use (nan, a fraction above 1, negative epochs, ...).

    Raises ConfigError naming the key, its value and what to use instead; called by every
    loader (:func:`config_from_dict`, :func:`load_config`).
    """
    for key, value in _float_leaves(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not a finite number; give a finite value")
    for key, ok, fix in _RULES:
        value = _get_dotted(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range; use {fix}")
    if not (cfg.data.use_t1 or cfg.data.use_fmri):
        raise ConfigError("data.use_t1 and data.use_fmri are both false; a run needs at least one modality")
    if bool(cfg.model.connectivity_cells) != bool(cfg.model.connectivity_keep):
        raise ConfigError(f"model.connectivity_cells={cfg.model.connectivity_cells} and model.connectivity_keep="
                          f"{cfg.model.connectivity_keep}: set both (connectivity on) or neither")
    if cfg.model.screen_features and cfg.model.screen_fraction:
        raise ConfigError(f"model.screen_features={cfg.model.screen_features} and model.screen_fraction="
                          f"{cfg.model.screen_fraction} are both set; give one of them (the other 0)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config file (None: defaults) and apply ``key.sub=value`` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file (see hpc/configs/)")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{e}{_source_of(e, values, path, overrides)}") from None


def _source_of(error: ConfigError, values: dict, path: str | os.PathLike | None, overrides) -> str:
    """Where a config error comes from, for its message: the file when the file alone gives the
    same error, else the command-line overrides."""
    if not overrides:
        return f" (in {path})" if path else ""
    try:
        config_from_dict(values, [])
    except ConfigError as alone:
        if str(alone) == str(error):
            return f" (in {path})" if path else ""
    return f" (from the overrides {' '.join(overrides)})"


def add_config_arguments(parser) -> None:
    """Give an argparse parser the config arguments every command shares: --config and KEY=VALUE."""
    parser.add_argument("--config", metavar="YAML",
                        help="run config file (see hpc/configs/*.yaml); the built-in defaults when omitted")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides section.key=value, e.g. optim.lr=3e-4 model.fusion=add")


def config_from_args(args, defaults: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config named by :func:`add_config_arguments`' arguments; ``defaults`` go before the
    user's overrides. A bad file or override prints the reason and exits with status 2."""
    try:
        return load_config(args.config, [*defaults, *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (:mod:`masan.files`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flagged_keys(flag: str, cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys whose field carries the metadata ``flag`` (:data:`RESUMABLE`, :data:`SAME_METHOD`,
    :data:`HASHED_WHEN_SET`); a flagged section is one key (e.g. ``"checkpoint"``)."""
    cls = cls or RunConfig
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get(flag):
            out.append(key)
        elif dataclasses.is_dataclass(hints[f.name]):
            out.extend(flagged_keys(flag, hints[f.name], key + "."))
    return tuple(out)


def _pop_dotted(tree: dict, dotted: str) -> Any:
    *path, last = dotted.split(".")
    for k in path:
        tree = tree[k]
    return tree.pop(last, None)


def config_hash(cfg: RunConfig) -> str:
    """Fingerprint of everything that must match for a checkpoint to be resumed.

    Paths, logging and checkpoint cadence, worker counts and epoch budgets may change
    between submissions (e.g. to extend a run); model, loss, optimiser, precision, split and
    data selection may not. Which keys may change is the :data:`RESUMABLE` metadata of the
    config fields.
    """
    d = config_to_dict(cfg)
    defaults = RunConfig()
    for dotted in flagged_keys(HASHED_WHEN_SET):
        if _get_dotted(cfg, dotted) == _get_dotted(defaults, dotted):
            _pop_dotted(d, dotted)
    for dotted in flagged_keys(RESUMABLE):
        _pop_dotted(d, dotted)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Human-readable list of ``key: old -> new`` differences (for resume errors)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(f"{prefix}: {x!r} -> {y!r}")

    walk(config_to_dict(a), config_to_dict(b), "")
    return out
