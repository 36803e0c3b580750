"""The training loop, whole: two phases, epochs, steps, logging, checkpoints, stop requests.

Read :func:`train` top to bottom; everything it calls is a few lines below it. Position
bookkeeping (:class:`TrainState`) counts optimizer steps and the samples of the current
epoch's order already consumed by all ranks, which is what a checkpoint stores and what
:class:`ResumableSampler` needs to continue an epoch without repeating or skipping a sample,
even on a different number of ranks.

An optimizer step is ``optim.grad_accum`` micro-batches of ``optim.micro_batch`` subjects per
rank. An epoch is every training subject once (in a per-epoch shuffled order seeded by
``seed + epoch``) cut to whole steps: no subject is ever seen twice in an epoch, and the few
that do not fill a last step (``n mod samples-per-step``) rotate out of that epoch, a different
few each epoch (the log says how many), so checkpoints always fall on step boundaries and
never hold half-accumulated gradients.

At the start of the joint phase, and every ``train.norm_refresh_epochs`` joint epochs, the
model's cohort standardisers are fitted on all training subjects
(:func:`masan.train.standardize.fit_standardizers`). Every ``log.every_steps`` steps the loss
terms, the optimizer steps DeepSpeed skipped for non-finite gradients, the LR, the
throughput, the ETA of the whole run, each rank's data wait and the peak memory are logged; every
``log.grad_norm_every_steps`` steps the gradient norm of each term.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from masan import distributed as D
from masan.batch import MODALITY_KEYS
from masan.config import RunConfig
from masan.data.cache import open_cache
from masan.data.transforms import Augment
from masan.data.workers import data_loader
from masan.distributed import DistInfo
from masan.inference import predict_subjects
from masan.metrics import prediction_metrics
from masan.model import masan_loss
from masan.model.inputs import PRECISION_DTYPES as DTYPES
from masan.model.loss import PHASES, class_weights
from masan.train import revision
from masan.train.checkpoint import CheckpointManager
from masan.train.engine import LRSchedule, current_lr, set_schedule_step
from masan.train.eta import ETA_INTERVALS, duration_text, epoch_fraction, eta_seconds
from masan.train.gradients import DIVERGED_FIX, Diverged, check_grad_norm, skipped_steps, term_grad_norms
from masan.train.logging import TrainLogger, interval_stats
from masan.train.standardize import fit_standardizers
from masan.train.stop import StopRequest

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (JSON-ready)."""

    phase: str = PHASES[0]
    epoch: int = 0
    """Epoch within the phase (the next one to run when ``consumed`` is 0)."""
    consumed: int = 0
    """Samples of this epoch's order already used, over all ranks."""
    step: int = 0
    """Optimizer steps over both phases: the TensorBoard step and the checkpoint name."""
    phase_start: int = 0
    """Global step at which this phase began (start of its LR curve)."""
    epochs_done: int = 0
    """Finished epochs over both phases (seeds the data order, x-axis of epoch metrics)."""
    phase_steps: int = 0
    """Optimizer steps the phase's LR curve runs over, as last planned (0: not recorded, a
    checkpoint from before it was); another number of ranks plans another."""
    lr_anchor: tuple[int, float] | None = None
    """(global step, cosine progress) the phase's LR curve continues from after a resume on
    another number of ranks (:class:`masan.train.engine.LRSchedule`); None: the phase's start."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        state = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        return state if state.lr_anchor is None else dataclasses.replace(state, lr_anchor=tuple(state.lr_anchor))


class ResumableSampler(DistributedSampler):
    """DistributedSampler over subjects that can start an epoch at a global position.

    The epoch's order is ``randperm(n)`` seeded with ``seed + epoch`` (no shuffle: 0..n-1),
    padded to a multiple of the world size like DistributedSampler; rank r takes positions
    ``start + r, start + r + W, ...``. So after ``start`` samples consumed by all ranks
    together, any world size continues with exactly the samples not yet seen.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        padded = math.ceil(n / self.num_replicas) * self.num_replicas
        order += (order * math.ceil(padded / n))[: padded - n]
        return order

    def __iter__(self):
        return iter(self._order()[self.start + self.rank:: self.num_replicas])

    def __len__(self) -> int:
        padded = math.ceil(len(self.dataset) / self.num_replicas) * self.num_replicas
        return max(0, math.ceil((padded - self.start - self.rank) / self.num_replicas))


@dataclass
class LoopParts:
    """Everything the loop uses, built by :func:`masan.train.run.run_training`."""

    cfg: RunConfig
    info: DistInfo
    engine: object
    schedule: LRSchedule
    train_set: Dataset
    val_set: Dataset | None
    """Validation subjects (carved from the training part) for monitoring; None: no monitoring."""
    class_names: list[str]
    ckpt: CheckpointManager
    logger: TrainLogger
    stop: StopRequest
    config_hash: str
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    """Subject -> digest of its data (:func:`masan.train.run.data_fingerprint`), saved with each checkpoint."""
    geometry: dict = dataclasses.field(default_factory=dict)
    """The store's geometry (:class:`masan.data.contract.Geometry` as JSON): orientation and voxel sizes."""


def train(p: LoopParts, state: TrainState) -> str:
    """Train from ``state`` to the end; returns ``"completed"``, ``"stopped"`` or ``"max_steps"``."""
    run = _setup(p, state)
    epochs = p.cfg.epochs
    for phase in PHASES[PHASES.index(state.phase):]:
        state = _start_phase(p, run, state, phase)
        while state.epoch < epochs[phase]:
            ended, loss = _epoch(p, run, state, phase)
            if ended:
                return ended
            state = _end_epoch(p, run, state, phase, loss)
    return "completed"


# --------------------------------------------------------------------------- the loop's steps


@dataclass
class _Run:
    """What every epoch of one :func:`train` call shares."""

    sampler: ResumableSampler
    per_step: int
    """Samples per optimizer step, over all ranks."""
    last_save: dict
    """Step and time.monotonic() of the newest save (:func:`save_due`)."""
    cache: object | None
    """data.cache: None, or the cohort decoded once per node."""
    augment: Augment | None
    """data.augment: None, or the train-only transforms."""
    weight: torch.Tensor | None
    """loss.class_weights: (C,) float32, or None."""
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    """Seconds per optimizer step of the recent logged intervals, oldest first (for the ETA)."""


class EpochLoss(NamedTuple):
    """The loss of an epoch as one start ran it: the mean over its ``steps`` (all ranks and
    micro-batches; nan when none was left), and whether they were the ``whole`` epoch (not a
    resume's rest of it)."""

    mean: float = math.nan
    steps: int = 0
    whole: bool = False


@dataclass
class _Interval:
    """Since the last logged step: its start (time.perf_counter() s), the samples over all ranks
    and the seconds this rank waited for its loader."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    samples: int = 0
    waited: float = 0.0
    lr: float = math.nan
    """The learning rate of its last optimizer step (read before the step moves the schedule on)."""


def _setup(p: LoopParts, state: TrainState) -> _Run:
    cfg = p.cfg
    cache = open_cache(p.train_set, cfg.data, p.info.device)
    if cache is not None:  # a second Ctrl-C ends the rank without unwinding: no shared memory left behind
        p.stop.before_exit(cache.discard_files)
    return _Run(sampler=ResumableSampler(p.train_set, p.info.world_size, p.info.rank, shuffle=True, seed=cfg.seed),
                per_step=cfg.optim.micro_batch * cfg.optim.grad_accum * p.info.world_size,
                last_save={"step": state.step, "time": time.monotonic()},
                cache=cache,
                augment=Augment.from_config(cfg.data.augment, cfg.seed, p.geometry),
                weight=class_weights(p.train_set.labels, len(p.class_names), cfg.loss.class_weights))


def _start_phase(p: LoopParts, run: _Run, state: TrainState, phase: str) -> TrainState:
    """Enter ``phase`` (a new one: fresh epoch count and LR curve; or the one resumed into)."""
    if state.phase != phase:
        state = dataclasses.replace(state, phase=phase, epoch=0, consumed=0, phase_start=state.step, phase_steps=0,
                                    lr_anchor=None)
    n_epochs = p.cfg.epochs[phase]
    total, anchor = phase_steps(p, state, n_epochs, run.per_step), state.lr_anchor
    if state.phase_steps and total != state.phase_steps and p.schedule.cfg.schedule != "constant" \
            and state.step - state.phase_start > p.schedule.cfg.warmup_steps:
        # resumed on another number of ranks: the curve goes on from where it was, over the steps left
        p.schedule.set_phase(state.phase_start, state.phase_steps, anchor)
        anchor = (state.step, p.schedule.progress(state.step))
        if p.info.is_main:
            log.info("phase %s: %d optimizer steps in all at this number of ranks (%d before): the LR curve goes on "
                     "from %.0f%% of its decay", phase, total, state.phase_steps, 100 * anchor[1])
    state = dataclasses.replace(state, phase_steps=total, lr_anchor=anchor)
    p.schedule.set_phase(state.phase_start, total, anchor)
    set_schedule_step(p.engine, state.step)
    if p.info.is_main:
        n, per_step = len(p.train_set), run.per_step
        log.info("phase %s: epoch %d/%d, step %d; %d steps per epoch (%d subjects, %d per step over %d ranks; "
                 "%d subject(s) rotate out of each epoch)", phase, state.epoch, n_epochs, state.step,
                 steps_left(n, 0, per_step), n, per_step, p.info.world_size, n % per_step)
    return state


def _epoch(p: LoopParts, run: _Run, state: TrainState, phase: str) -> tuple[str | None, EpochLoss]:
    """The steps left of the current epoch (advancing ``state`` in place). Returns (``"stopped"``
    or ``"max_steps"`` when the run ends inside it, else None; the mean loss of the steps this
    start ran of it, over all ranks and micro-batches). Collective, as every step is."""
    cfg = p.cfg
    if at_max_steps(cfg, state):
        return "max_steps", EpochLoss()  # resumed at or past the cap: not one step more (that step's checkpoint exists)
    if phase == "joint" and state.consumed == 0 and refit_due(cfg, state.epoch):
        fit_norms(p)
    run.sampler.set_epoch(state.epochs_done, start=state.consumed)
    batches = iter(make_loader(p, run.sampler, state.epochs_done, run.cache, run.augment))
    interval = _Interval()
    n_steps = steps_left(len(p.train_set), state.consumed, run.per_step)
    bar = tqdm(total=n_steps, desc=f"{phase} epoch {state.epoch}", unit="step", leave=False,
               disable=not (p.info.is_main and sys.stderr.isatty()))
    whole = state.consumed == 0
    total = 0.0  # this rank's step losses (each the mean over its micro-batches)
    for i in range(n_steps):
        log_due = (state.step + 1) % cfg.log.every_steps == 0
        terms, norm = _step(p, run, state, phase, batches, interval)
        total += terms["total"]
        state.step += 1
        state.consumed += run.per_step
        interval.samples += run.per_step
        bar.update()
        if log_due:
            _log_interval(p, run, state, terms, norm, interval)
            interval = _Interval()
        if p.stop.agreed():
            if p.info.is_main:  # e.g. a STOP file left from before the start: the log says what stopped it
                log.warning("stopping at step %d: asked by %s; saving a checkpoint", state.step, p.stop.reason)
            save(p, state, run.last_save)
            return "stopped", EpochLoss()
        if at_max_steps(cfg, state):
            save(p, state, run.last_save)
            return "max_steps", EpochLoss()
        if i < n_steps - 1 and save_due(cfg, state, run.last_save):  # the epoch-end save follows
            save(p, state, run.last_save)
    bar.close()
    if not n_steps:
        return None, EpochLoss()
    # every rank ran as many steps, so the mean of the ranks' means is the mean over all
    return None, EpochLoss(D.mean_over_ranks({"total": total / n_steps})["total"], n_steps, whole)


def _batch_inputs(p: LoopParts, batch: dict) -> str:
    """The micro-batch's subjects and whether each input was finite: a diverged step's first suspect."""
    subjects = getattr(p.train_set, "subjects", None)
    names = [subjects[i] if subjects else f"index {i}" for i in batch["index"].reshape(-1).tolist()]
    finite = ", ".join(f"{k} {'finite' if torch.isfinite(batch[k]).all() else 'NOT finite'}"
                       for k in MODALITY_KEYS if batch.get(k) is not None)
    return f"subjects {', '.join(names)}: inputs {finite}"


def _step(p: LoopParts, run: _Run, state: TrainState, phase: str, batches, interval: _Interval):
    """One optimizer step over ``optim.grad_accum`` micro-batches. Returns (this rank's loss
    terms, averaged over the micro-batches; the gradient norm before clipping, or None)."""
    cfg, engine = p.cfg, p.engine
    terms: dict[str, float] = {}
    interval.lr = current_lr(engine)  # what this step's optimizer update uses: engine.step() advances it
    bad = None  # this rank's first non-finite loss: every rank stops together (a restart would diverge again)
    for _ in range(cfg.optim.grad_accum):
        t_wait = time.perf_counter()  # blocked on the loader (and the host-to-device copy)
        batch = to_device(next(batches), p.info.device, DTYPES[cfg.train.precision])
        interval.waited += time.perf_counter() - t_wait
        out = engine(**{k: batch.get(k) for k in MODALITY_KEYS})
        loss = masan_loss(out, batch, cfg.loss, phase=phase, class_weight=run.weight)
        engine.backward(loss["total"])
        engine.step()  # DeepSpeed: optimizer + LR step on the last micro-batch only
        for k, v in loss.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.optim.grad_accum
        if bad is None and not torch.isfinite(loss["total"].detach()):
            bad = f"rank {p.info.rank} ({ {k: float(v.detach()) for k, v in loss.items()} }; {_batch_inputs(p, batch)})"
    if D.any_rank(bad is not None):
        raise Diverged(f"the {phase} loss is not finite at step {state.step} on "
                       f"{bad or 'another rank (its log names it)'}; {DIVERGED_FIX}")
    norm = check_grad_norm(engine, state.step, phase, p.info.rank)
    every = cfg.log.grad_norm_every_steps
    if every and (state.step + 1) % every == 0:
        grad_norms = D.mean_over_ranks(term_grad_norms(engine.module, batch, cfg.loss, phase, run.weight))
        p.logger.scalars(grad_norms, state.step + 1)
    return terms, norm


def _log_interval(p: LoopParts, run: _Run, state: TrainState, terms: dict, norm, interval: _Interval) -> None:
    """Log the step just taken (collective): the loss terms averaged over the ranks, the
    gradient norm, LR, throughput, the whole run's ETA and where the interval's time went."""
    terms = D.mean_over_ranks(terms)
    elapsed = time.perf_counter() - interval.start
    rate = interval.samples / elapsed
    run.step_seconds = [*run.step_seconds[1 - ETA_INTERVALS:], elapsed * run.per_step / interval.samples]
    eta = eta_seconds(run.step_seconds, run_steps_left(p.cfg, state, len(p.train_set), run.per_step))
    skipped = skipped_steps(p.engine)
    if skipped and p.info.is_main:
        log.warning("%d optimizer step(s) skipped so far for non-finite gradients", skipped)
    norm_log = {} if norm is None else {"grad_norm": norm}  # this step's, before clipping
    epochs = state.epochs_done + epoch_fraction(state.consumed, len(p.train_set), run.per_step)
    p.logger.scalars({**terms, **norm_log, "lr": interval.lr, "samples_per_s": rate, "eta_s": eta,
                      "skipped_steps": skipped, "epoch": epochs}, state.step)
    p.logger.progress(state.step, epochs, terms["total"])
    line = p.logger.interval(D.all_gather_objects(interval_stats(interval.waited, elapsed, p.info.device)),
                             state.step)
    if p.info.is_main:
        log.info("step %d: loss %.4g, %.2f samples/s, ETA %s, %s", state.step, terms["total"], rate,
                 duration_text(eta), line)


def _end_epoch(p: LoopParts, run: _Run, state: TrainState, phase: str, loss: EpochLoss) -> TrainState:
    """Count the finished epoch; its mean loss, validation monitoring and the epoch-end save when due."""
    cfg, n_epochs = p.cfg, p.cfg.epochs[phase]
    state = dataclasses.replace(state, epoch=state.epoch + 1, consumed=0, epochs_done=state.epochs_done + 1)
    if loss.whole:  # a resume's rest of an epoch is not the epoch's mean: logged in words only
        p.logger.scalars({"epoch_loss": loss.mean}, state.step)
    if p.info.is_main:
        # no step: resumed from a checkpoint saved at its last step; a loss that is not finite stops
        # the run (Diverged) before an epoch can end
        said = ("resumed at its end: no step left" if not loss.steps else
                f"mean loss {loss.mean:.4g} over its {loss.steps} steps" if loss.whole else
                f"mean loss {loss.mean:.4g} over its last {loss.steps} steps, run since the resume")
        log.info("%s epoch %d/%d done at step %d (%s)", phase, state.epoch, n_epochs, state.step, said)
    if phase == "joint" and cfg.log.eval_every_epochs and state.epoch % cfg.log.eval_every_epochs == 0:
        monitor_val(p, state.step)
    # the same decision on every rank: save_due is collective, the rest is config and state
    if cfg.checkpoint.at_epoch_end or state.epoch == n_epochs or save_due(cfg, state, run.last_save):
        save(p, state, run.last_save)  # epoch end (the last epoch's is the phase end)
    return state


# --------------------------------------------------------------------------- pieces of the loop


def steps_left(n: int, consumed: int, per_step: int) -> int:
    """Whole optimizer steps left in an epoch of ``n`` subjects after ``consumed`` samples (never
    reaching the sampler's padding, so no subject is used twice in an epoch)."""
    return max(0, n - consumed) // per_step


def phase_steps(p: LoopParts, state: TrainState, n_epochs: int, per_step: int) -> int:
    """Total optimizer steps of the current phase: steps done + steps left (at this world size)."""
    n, world = len(p.train_set), p.info.world_size
    if steps_left(n, 0, per_step) == 0:
        raise ValueError(
            f"an optimizer step needs {per_step} samples (optim.micro_batch * optim.grad_accum * {world} ranks) "
            f"but the training split has only {n} subjects; lower optim.micro_batch/grad_accum or use fewer ranks")
    return (state.step - state.phase_start) + _epochs_steps_left(n, state, n_epochs, per_step)


def _epochs_steps_left(n: int, state: TrainState, n_epochs: int, per_step: int) -> int:
    """Optimizer steps left in a phase of ``n_epochs`` epochs from ``state``'s epoch and position."""
    left = steps_left(n, state.consumed, per_step) + (n_epochs - state.epoch - 1) * steps_left(n, 0, per_step)
    return left if state.epoch < n_epochs else 0


def at_max_steps(cfg: RunConfig, state: TrainState) -> bool:
    """Whether ``state`` has reached ``train.max_steps`` (None: never)."""
    return cfg.train.max_steps is not None and state.step >= cfg.train.max_steps


def run_steps_left(cfg: RunConfig, state: TrainState, n: int, per_step: int) -> int:
    """Optimizer steps left in the whole run from ``state`` (a resumed run: only those), capped by max_steps."""
    later = sum(cfg.epochs[phase] for phase in PHASES[PHASES.index(state.phase) + 1:])
    left = _epochs_steps_left(n, state, cfg.epochs[state.phase], per_step) + later * steps_left(n, 0, per_step)
    if cfg.train.max_steps is not None:
        left = min(left, max(0, cfg.train.max_steps - state.step))
    return left


def make_loader(p: LoopParts, sampler, epoch: int, cache=None, augment: Augment | None = None):
    """Workers read the Zarr store; a loader-owned generator keeps the global RNG untouched,
    so a resumed run (new iterator mid-epoch) draws the same dropout masks as an unbroken one.
    With a cohort cache, its batches (already on the device) in the sampler's order instead.
    ``augment`` (train-only, :mod:`masan.data.transforms`) transforms each sample, seeded by
    (seed, epoch, subject index): the same draws on either path, after a resume, at any worker count."""
    d = p.cfg.data
    if cache is not None:
        following = copy.copy(sampler)  # the next epoch's order, prepared ahead at this one's end
        following.set_epoch(epoch + 1, start=0)
        dtype = DTYPES[p.cfg.train.precision]
        if augment is None:
            return cache.batches(sampler, p.cfg.optim.micro_batch, dtype, d.prefetch_factor, then=following)
        # augmented in float32, then cast, as the store's loader does: a bf16 batch resampled differs
        batches = cache.batches(sampler, p.cfg.optim.micro_batch, torch.float32, d.prefetch_factor, then=following)
        return (to_device(augment.batch(b, epoch), p.info.device, dtype) for b in batches)
    g = torch.Generator()
    g.manual_seed(p.cfg.seed + epoch)
    dataset = p.train_set if augment is None else p.train_set.with_transform(augment, epoch)
    return data_loader(dataset, d, batch_size=p.cfg.optim.micro_batch, sampler=sampler, drop_last=True,
                       pin_memory=p.info.device.type == "cuda", generator=g)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Images to ``device`` in the engine's dtype; labels/indices stay int64."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in batch.items()}


def save_due(cfg: RunConfig, state: TrainState, last_save: dict) -> bool:
    """Every ``checkpoint.every_steps`` steps, or when rank 0's clock says ``every_minutes`` passed
    (agreed by all ranks so that all of them save)."""
    c = cfg.checkpoint
    by_steps = c.every_steps > 0 and state.step - last_save["step"] >= c.every_steps
    by_time = c.every_minutes > 0 and time.monotonic() - last_save["time"] >= 60 * c.every_minutes
    return D.any_rank(by_steps or by_time)


def save(p: LoopParts, state: TrainState, last_save: dict) -> None:
    """One complete checkpoint on all ranks (skipped if this step is already saved)."""
    if last_save.get("saved") == state.step:
        return
    client = {**state.to_dict(), "dp_world_size": p.info.world_size, "config_hash": p.config_hash, "data": p.data,
              revision.KEY: revision.TRAINING_REVISION}
    tag = p.ckpt.save(p.engine, state.step, client, p.cfg)
    if p.info.is_main:
        log.info("saved complete checkpoint %s", tag)
    p.logger.flush()
    last_save.update(step=state.step, time=time.monotonic(), saved=state.step)


def refit_due(cfg: RunConfig, joint_epoch: int) -> bool:
    """Fit the standardisers before joint epoch ``joint_epoch``? (epoch 0, then every refresh)."""
    every = cfg.train.norm_refresh_epochs
    return joint_epoch == 0 or (every > 0 and joint_epoch % every == 0)


def fit_norms(p: LoopParts) -> None:
    """Collective: fit the model's cohort standardisers on every training subject."""
    t0 = time.perf_counter()
    n = fit_standardizers(p.engine.module, p.train_set, p.info.rank, p.info.world_size, p.info.device,
                          DTYPES[p.cfg.train.precision], p.cfg.optim.micro_batch, p.cfg.data,
                          rescreen=p.cfg.train.rescreen_on_refresh)
    if n and p.info.is_main:
        log.info("fitted %d feature standardiser(s) on %d training subjects in %.1f s", n, len(p.train_set),
                 time.perf_counter() - t0)


def monitor_val(p: LoopParts, step: int) -> None:
    """Validation-part metrics and region images for TensorBoard (the test part is never looked at
    before the final evaluation)."""
    if p.val_set is None:
        return
    preds, attention, t1 = evaluate(p, p.val_set, with_images=True)
    if p.info.is_main and len(preds):
        p.logger.monitor_metrics(prediction_metrics(preds, p.class_names, p.cfg.data.positive_class), step)
        if preds.region_weights.size:
            p.logger.region_images(t1, preds.region_weights, p.cfg.model.patch_grid, step, attention)
    p.logger.flush()


def evaluate(p: LoopParts, dataset: Dataset, with_images: bool = False):
    """Collective: predictions of ``dataset`` sharded over the ranks, merged on every rank.

    Returns (Predictions, attention (N, R, R) of rank 0's share or None, rank 0's first T1 or None).
    """
    preds = predict_subjects(p.engine.module, dataset, p.cfg, p.info.device, p.class_names, p.info.rank,
                             p.info.world_size, p.cfg.seed)  # `python -m masan.predict` runs the same code
    attention = t1 = None
    if with_images and p.info.is_main and len(dataset):
        attention, t1 = first_attention(p, dataset)
    return preds, attention, t1


def first_attention(p: LoopParts, dataset: Dataset):
    """Attention matrix (1, R, R) and T1 volume (X, Y, Z) of the dataset's first subject."""
    item = dataset[0]
    batch = to_device({k: v[None] for k, v in item.items() if k in MODALITY_KEYS}, p.info.device,
                      DTYPES[p.cfg.train.precision])
    module = p.engine.module
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(**{k: batch.get(k) for k in MODALITY_KEYS})
    module.train(was)
    att = out.get("attention")
    t1 = item["t1"][0].numpy() if "t1" in item else None
    return (att.float().cpu().numpy() if att is not None else None), t1
