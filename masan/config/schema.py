"""The run config's schema: :class:`RunConfig` and its sections (data, model, loss, optim, train,
split, checkpoint, log), each field with its default and what it means, and the field flags
that say which keys may differ (:data:`RESUMABLE`, :data:`SAME_METHOD`, :data:`HASHED_WHEN_SET`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
    """Mirror the left-right axis (found from the store's orientation) with probability 0.5."""
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
    positive_class: str = field(default="AD", metadata={RESUMABLE: True})
    """Positive class for precision/recall (the paper: AD vs the rest), one of ``classes``. It
    changes only the reported metrics, so a resume may change it."""
    decision: Literal["argmax", "expected_stage"] = field(default="argmax", metadata={RESUMABLE: True})
    """How a subject's class is called from its class probabilities p (masan.predictions.decide):
    ``argmax`` (the paper); ``expected_stage``: ``classes`` are ordered stages (NC < EMCI < LMCI <
    AD) and the call is the stage nearest the expected stage sum_k k p_k, so a subject whose
    probability is split between two neighbouring stages is not called the larger one by a hair
    and the middle stages get called. With two classes both rules call the same class. It changes
    only how the trained model's outputs are called (predictions, metrics), so a resume may change it."""
    fmri_frames: int | None = None
    """Frames fed to the model: the first N of each run. None: ``model.fmri_frames``'s count, or,
    when that is null too, all frames (every run must then have the same count)."""
    use_t1: bool = True
    """Load each subject's T1 image. The model must not read what is not loaded (refused when
    the config loads); one that never reads it (``model.modalities=fmri``) gets a warning."""
    use_fmri: bool = True
    """Load each subject's fMRI run (the largest input by far). Set it false for a model that
    never reads it (``model.modalities=t1``, ``model.arch=hfcn``)."""
    normalize: bool = True
    """Z-score each subject with the statistics stored at conversion time (the fMRI only when
    ``fmri_temporal=none``). ``train.precision=fp16`` needs it (raw intensities reach fp16's
    largest value)."""
    fmri_temporal: Literal["none", "psc", "mean_psc", "demean", "zscore"] = "none"
    """How the fMRI run reaches fPM (masan/data/temporal.py): ``none``: the whole 4-D run z-scored
    with one mean/std (fPM then mostly sees the static EPI image); ``psc``: each voxel's percent
    signal change around its temporal mean (fluctuation amplitude and correlations);
    ``mean_psc``: the z-scored temporal mean image plus those fluctuations at the same scale;
    ``demean``: each voxel minus its temporal mean, over the run's global temporal std;
    ``zscore``: each voxel's series standardised (correlations only)."""
    num_workers: int = field(default=2, metadata=PLUMBING)
    """DataLoader worker processes per rank."""
    worker_start: Literal["forkserver", "spawn", "fork"] = field(default="forkserver", metadata=PLUMBING)
    """How the workers start (masan/data/workers.py): ``forkserver``: forked from a clean helper
    process started once per rank; ``fork``: forked from the rank itself, which can hang a worker
    on Python 3.11 when another thread of the rank holds a lock at that instant; ``spawn``: a new
    interpreter per worker and epoch (slow start). Samples are identical either way."""
    worker_timeout_minutes: float = field(default=30.0, metadata=PLUMBING)
    """Longest wait for one batch from the workers: past it the rank stops with an error saying
    so (a worker stuck, e.g. on a stalled file system), and the launcher restarts the run from its
    last checkpoint instead of the job idling until its time limit. 0: wait forever."""
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
    (0: all voxels at once); unchunked, its full-resolution response is large (about
    ``temporal_features / temporal_stride`` times the fMRI input)."""
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
    """Which patch modules MASAN builds: ``both`` (sPM and fPM, fused), or one of them alone (the
    single-modality ablations; its region maps go straight to the attention)."""
    region_weights: Literal["occlusion", "attention", "embedding"] = "occlusion"
    """What ``out["region_weights"]`` (the region ranking and figures) reports: ``occlusion``:
    how much the predicted class probabilities change when the region's features are set to the
    cohort mean (which regions carry the decision); ``attention``: attention each region
    receives (column mean of eq. 4: where the model looks, not what decides); ``embedding``:
    the norm of each region's fused embedding (the paper's Fig. 4)."""
    occlusion_limit_gib: float = field(default=4.0, metadata=PLUMBING)
    """Most memory the occlusion pass (``region_weights=occlusion``) may need per rank, GiB; a
    config past it is refused before training (masan/model/checks.py). It runs at every
    validation evaluation and at the end of the run, on the training device beside the weights,
    the optimizer state and DeepSpeed's buckets; raise it on a card with room to spare."""
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
    """Hidden width of the classifier MLP (Sec. 2.3: Linear -> ReLU -> Dropout -> Linear); 0: one
    fully connected layer after the dropout (Sec. 3.2's "a fully connected layer")."""
    dropout: float = 0.2
    """Dropout probability before the classifier's last layer (Sec. 2.3)."""
    head: Literal["softmax", "ordinal"] = field(default="softmax", metadata={HASHED_WHEN_SET: True})
    """The classifier head (masan/model/heads.py): ``softmax``, one logit per class (the paper);
    ``ordinal``, the classes as ordered stages in ``data.classes`` order (NC < EMCI < LMCI < AD):
    one disease score per subject and learnt cut-points between the stages (cumulative link), so
    every stage trains the direction that separates AD from the rest. Its logits are
    log-probabilities: the loss, class weights and predictions are unchanged."""
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
    layout); what it gains on a GPU with the layout kept end to end: docs/performance.md,
    "Without a GPU"."""
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
    """Weight of sPM's (T1) reconstruction loss Ls in eq. 8."""
    beta: float = 0.5
    """Weight of fPM's (fMRI) reconstruction loss Lf in eq. 8."""
    sparsity: float = 1e-4
    """lambda of eq. 1, on the mean absolute bottleneck encoding."""
    recon: Literal["mse", "l1"] = "mse"
    """The reconstruction error of eq. 2: mean squared (``mse``) or mean absolute (``l1``) over voxels."""
    class_weights: Literal["none", "balanced"] = field(default="none", metadata={HASHED_WHEN_SET: True})
    """Weights of the classes in the cross-entropy (eq. 7, which has none): ``balanced`` weighs
    class c by ``n / (k * n_c)`` over the training subjects (scikit-learn's convention), so a
    cohort with ADNI's proportions (AD the largest class) is not learnt as "call everyone the
    largest class"; ``none``: every subject counts once, as in the paper."""
    label_smoothing: float = field(default=0.0, metadata={HASHED_WHEN_SET: True})
    """Label smoothing of the cross-entropy (``F.cross_entropy``'s: the target keeps ``1 - eps``
    and spreads ``eps`` evenly over all classes). 0 (the paper): one-hot targets, which a small
    cohort lets the head fit to zero loss, so its training scores separate the classes further
    than unseen subjects' do and the cut between neighbouring stages lands at the training
    classes' edge."""


@dataclass
class OptimConfig:
    """Adam (torch.optim.Adam inside DeepSpeed) and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate (the paper: 1e-3)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2): decay rates of its first and second moment estimates."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient by ``torch.optim.Adam`` (coupled, not AdamW's decoupled decay)."""
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
    """The cosine schedule's final LR as a fraction of ``lr``."""


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
    """Write TensorBoard event files (false: the text log only)."""
    eval_every_epochs: int = 10
    """Validation-part metrics (``split.val_fraction``) and region-weight images every N joint
    epochs (0: never), logged under ``monitor_val/``. The test part is touched only by the final
    evaluation."""
    grad_norm_every_steps: int = 50
    """Log the gradient norm of each loss term (``train/grad_norm_<term>``) every N optimizer
    steps, from a side pass (one forward and one backward per term there); 0: never. Each rank's
    norm on its last micro-batch, averaged over the ranks: the terms' balance, at a scale that
    depends on the micro-batch size (the step's ``train/grad_norm`` does not)."""
    flush_secs: int = 30
    """Seconds between TensorBoard's writes of its event files to disk."""


@dataclass
class RunConfig:
    """Everything one training run needs; saved as ``run_dir/config.yaml`` at every start."""

    run_dir: str = field(default="runs/masan", metadata=PLUMBING)
    """Checkpoints, TensorBoard events, split, predictions. A new run_dir starts fresh."""
    seed: int = 0
    """Seeds model init, dropout and data order (per epoch: seed + epoch)."""
    deterministic: bool = False
    """Deterministic algorithms and data order (bit-identical resume on the same hardware with the
    same number of CPU threads per rank: the launcher gives each rank the cores it may use unless
    OMP_NUM_THREADS says otherwise, and reductions split over another thread count round
    differently; checkpoints record the count, and a resume under another names it)."""
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


def get_dotted(cfg: Any, dotted: str) -> Any:
    """The value at a dotted key of a config (``"optim.lr"`` -> ``cfg.optim.lr``)."""
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg
