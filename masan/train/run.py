"""``run_training(cfg, stop)``: one run from its config to predictions, resumable at any point.

Order of a start: process group -> the run-directory lock when ``run.lock`` exists (a live
run there refuses this start, :mod:`masan.train.runlock`) -> DONE check -> every check
(:func:`preflight`: the run directory is writable, the cohort, split and batch fit the
config, the newest checkpoint accepts this config) -> only then the first change to the run
directory (``run.lock`` created and locked when it was missing, this run's record written
into it) -> model and DeepSpeed engine -> resume from the newest complete, intact
checkpoint -> run directory access, DONE removed (a changed target reopens the run),
config.yaml -> TensorBoard -> :func:`masan.train.loop.train` -> predictions, metrics.json and
DONE (rank 0). A start that is refused (bad config, incompatible checkpoint, another run
holding the lock) therefore leaves the run directory byte for byte as it was. Rank 0 holds
the lock until the run returns or its process dies. Every launcher (local, torchrun,
submitit on SLURM) ends here.

Access: the run directory (checkpoints, logs, predictions.csv naming each subject with its
diagnosis) is never more open than the store it trains on: files are created under a umask
derived from the store's mode (:mod:`masan.access`), and an existing run directory is closed
to the same mode (and the store's group) once the start is accepted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from masan import distributed as D
from masan.access import (
    AccessError,
    apply_access,
    creation_umask,
    describe_mode,
    nearest_existing,
    on_read_only_mount,
    owner_name,
    restrictive_mode,
    write_refusal,
)
from masan.config import ConfigError, RunConfig, config_hash, save_config, unused_inputs, validate_for_training
from masan.files import atomic_write_json, disk_refusal
from masan.predictions import write_predictions
from masan.rundir import RunDir, ended_early
from masan.train.checkpoint import CheckpointManager, ResumeError, set_rng_state
from masan.train.logging import TrainLogger
from masan.train.loop import LoopParts, TrainState, evaluate, train
from masan.train.revision import resume_warning
from masan.train.runlock import RunLock, RunLockedError, default_wait_s
from masan.train.stop import StopRequest

log = logging.getLogger(__name__)

SPLIT_KEYS = ("repeat", "seed", "test_fraction", "val_fraction")
"""The split settings a saved split.json records (:class:`masan.data.splits.Split`)."""


class DiskRefused(ConfigError):
    """The run directory's file system refused a write (full, over quota, read-only): a restart
    would fail alike until the user frees space, so launchers do not restart it."""


USER_ERRORS = (ConfigError, ResumeError)
"""Errors of the input, not of the machine: launchers exit 2 and never restart them (a full
disk under the run directory among them: :class:`DiskRefused`)."""


@dataclass
class TrainOutcome:
    """How run_training ended: ``completed`` (all epochs done, predictions written), ``max_steps``
    (``train.max_steps`` ended it before its epochs; predictions written, and predict and evaluate
    call the run unfinished) or ``stopped`` (a stop request; a complete checkpoint was saved; run
    again to go on)."""

    status: str
    step: int
    epoch: int
    """Epochs finished over both phases."""
    run_dir: str


def _ended(epochs_done: int, cfg: RunConfig) -> str:
    """``max_steps`` when the run ended before its epochs (:func:`masan.rundir.ended_early`), else ``completed``."""
    return "max_steps" if ended_early({"epochs_done": epochs_done}, cfg) else "completed"


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python/numpy/torch; in deterministic mode also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory this user cannot write (or its nearest existing parent, for a
    new one), and its checkpoint and TensorBoard folders, now rather than at the first save
    hours in (:func:`masan.access.write_refusal`: asks the kernel, writes nothing, so a refused
    start changes nothing)."""
    rd = RunDir(run_dir)
    folders = [run_dir, *(d for d in (rd.checkpoints, rd.tb) if d.is_dir())] if run_dir.exists() else [
        nearest_existing(run_dir)]
    for d in folders:
        why = write_refusal(d)
        if why is not None:
            owner = d.stat().st_uid if d.exists() else os.geteuid()
            fix = ("choose a run_dir=... on a writable one" if on_read_only_mount(d) else
                   f"make it writable (chmod u+wx {d}) or choose another run_dir=..." if owner == os.geteuid() else
                   f"it belongs to {owner_name(owner)}: choose a run_dir=... in a folder you may write (e.g. in "
                   f"your home or scratch folder), or, if it is a shared project folder of your group, ask them "
                   f"to let the group write it (chmod g+w {d})")
            raise ConfigError(f"{why}: checkpoints and results of run_dir={run_dir} could not be saved there; {fix}")


def check_place(cfg: RunConfig) -> None:
    """Refuse a run_dir that is or lies in a cohort store, or that holds the run's own store:
    a conversion prunes what it did not write into its store, and to_zarr.py refuses to update
    a store inside a run directory, so either nesting breaks the other tool
    (:mod:`masan.store.places`)."""
    from masan.store.places import enclosing, is_cohort_store

    run = Path(cfg.run_dir).resolve()
    store = enclosing(run, is_cohort_store)
    if store is not None:
        raise ConfigError(f"run_dir={cfg.run_dir} is {'' if store == run else 'inside '}the cohort store {store}: "
                          "a later conversion would prune the run's files from it; choose a run_dir outside every "
                          f"store, e.g. run_dir={store.parent / 'runs' / run.name}")
    own = Path(cfg.data.store).resolve()
    if run == own or run in own.parents:
        raise ConfigError(f"run_dir={cfg.run_dir} holds the run's store data.store={cfg.data.store}: to_zarr.py "
                          "would then refuse to update the store (it lies in a run directory); choose a run_dir "
                          f"beside the store, e.g. run_dir={own.parent / 'runs' / 'run'}")


@dataclass
class Preflight:
    """What rank 0 found before any change to the run directory (sent to every rank)."""

    subjects: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    split: object = None
    """The :class:`masan.data.splits.Split` of this repeat (from split.json when it exists)."""
    split_is_new: bool = False
    file_mode: int = 0o600
    gid: int | None = None
    geometry: dict = field(default_factory=dict)
    """The store's geometry (:class:`masan.data.contract.Geometry` as JSON)."""
    data: dict[str, str] = field(default_factory=dict)
    """:func:`data_fingerprint` of the split's subjects, saved in every checkpoint."""


def data_fingerprint(store, subjects: list[str]) -> dict[str, str]:
    """Subject -> a short digest of what training reads of it from ``store``: its label and
    each stored image's checksum, shape and TR (the cohort table's row). A reconverted or
    relabelled subject, or another cohort under the same ids, digests differently."""
    out = {}
    for s in subjects:
        row = store.row(s)
        images = {m: [row[m].get(k) for k in ("checksum", "shape", "tr_seconds")] for m in ("t1", "fmri") if row.get(m)}
        out[s] = hashlib.sha256(json.dumps([row.get("label"), images], sort_keys=True).encode()).hexdigest()[:12]
    return out


def changed_data_note(saved: dict[str, str] | None, now: dict[str, str], tag: str, store: str) -> str | None:
    """A warning when the subjects' data differ from what checkpoint ``tag`` was trained on
    (None: the same, or a checkpoint from before fingerprints were saved)."""
    if not saved:
        return None
    changed = sorted(s for s in now if saved.get(s, now[s]) != now[s])
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
    return (f"the store data.store={store} holds other data than {tag} was trained on for {len(changed)} of "
            f"{len(now)} subjects ({shown}): reconverted, relabelled or another cohort under the same ids; the run "
            "goes on with this data, so its model has seen both; start a new run_dir to train on this store alone")


def preflight(cfg: RunConfig, world_size: int, ckpt: CheckpointManager, chash: str,
              node_local: bool = True) -> Preflight:
    """Every check of a start, read-only (rank 0): the run directory is the run's own
    (:func:`check_place`, :meth:`masan.rundir.RunDir.require_folder` before) and writable, the cohort
    has the classes, the split exists or can be made, an optimizer step's batch fits the
    training part, the newest complete checkpoint accepts this config; and the access mode of
    the run directory: the store's (mode and group). ``node_local=False`` leaves out what only
    the training node can tell (``data.cache_dir``, often a node's own disk)."""
    from masan.data.cache import check_host_fits
    from masan.data.dataset import select_subjects
    from masan.data.splits import Split, SplitError, make_split

    run_dir = Path(cfg.run_dir)
    check_place(cfg)
    check_writable(run_dir)
    store = open_store(cfg)
    subjects, labels, class_names = select_subjects(store, cfg.data, every_class=True)
    split_path = RunDir(run_dir).split
    # a split.json without a complete checkpoint is from a start that never trained: the config decides
    trained = split_path.is_file() and bool(ckpt.complete_tags())
    try:
        split = Split.load(split_path) if trained else make_split(subjects, labels, cfg.split, class_names)
    except SplitError as e:
        raise ConfigError(str(e)) from None
    moved = [f"split.{k}: {getattr(split, k)!r} -> {getattr(cfg.split, k)!r}" for k in SPLIT_KEYS
             if getattr(split, k) != getattr(cfg.split, k)]
    if moved:
        raise ConfigError(f"{split_path} was made with other split settings than this config's ({'; '.join(moved)}), "
                          "and the run has trained on it: restore those settings, or start a new run_dir for the "
                          "new split")
    missing = sorted(set(split.train + split.val + split.test) - set(subjects))
    if missing:
        raise ConfigError(f"{split_path} names subjects not in the store {cfg.data.store} with data.classes "
                          f"{cfg.data.classes}: {missing[:5]}...; use the store the run started with (data.store=...) "
                          "or a new run_dir")
    per_step = cfg.optim.micro_batch * cfg.optim.grad_accum * world_size
    if per_step > len(split.train):
        raise ConfigError(
            f"optim.micro_batch={cfg.optim.micro_batch} x optim.grad_accum={cfg.optim.grad_accum} x {world_size} "
            f"rank(s) = {per_step} samples per optimizer step, but the training part of the split has "
            f"{len(split.train)} subjects; lower optim.micro_batch or optim.grad_accum, or use fewer ranks")
    refusal = ckpt.refusal(cfg, chash)
    if refusal:
        raise ResumeError(refusal)
    if node_local and cfg.data.cache != "none":  # its folder, and room for the training part on this node
        check_host_fits(store, split.train, cfg.data)
    file_mode, gid = restrictive_mode([cfg.data.store])
    return Preflight(subjects, labels, class_names, split, not trained, file_mode, gid,
                     data=data_fingerprint(store, split.train + split.val + split.test))


SHARED_ERRORS = (("locked", RunLockedError), ("resume", ResumeError), ("config", ConfigError))
"""User errors a collective start step raises with the same type on every rank (most specific first)."""


def _on_main(info: D.DistInfo, compute):
    """Collective: ``compute()`` on rank 0, its value on every rank. A user error
    (:data:`SHARED_ERRORS`) raises the same type on every rank, so no rank waits for one that
    gave up; any other error is told to the other ranks as a RuntimeError and raised on rank 0
    as it is."""
    found = None
    if info.is_main:
        try:
            found = ("ok", compute())
        except tuple(t for _, t in SHARED_ERRORS) as e:
            found = (next(kind for kind, t in SHARED_ERRORS if isinstance(e, t)), str(e))
        except Exception as e:
            D.broadcast_object(("other", f"{type(e).__name__}: {e}"))
            raise
    kind, value = D.broadcast_object(found)
    if kind != "ok":
        raise dict(SHARED_ERRORS).get(kind, RuntimeError)(value)
    return value


def _datasets(cfg: RunConfig, pre: Preflight):
    from masan.data.dataset import CohortDataset

    label_of = dict(zip(pre.subjects, pre.labels))

    def dataset(part):
        return CohortDataset(cfg.data.store, part, [label_of[s] for s in part], cfg.data)

    split = pre.split
    return dataset(split.train), (dataset(split.val) if split.val else None), dataset(split.test)


def _shm_free() -> str:
    """Free space of /dev/shm, where DataLoader workers hand their batches over, for a message."""
    try:
        return f"{shutil.disk_usage('/dev/shm').free / 2**20:.0f} MiB free in /dev/shm"
    except OSError:
        return "no /dev/shm"


def run_training(cfg: RunConfig, stop: StopRequest | None = None) -> TrainOutcome:
    """Train one run (see docs/architecture.md); collective over all ranks of the process group.

    Initialises torch.distributed from the environment when nobody did, and then also tears
    it down at the end (after a barrier; on an error without one: the other ranks may never
    reach it).
    """
    created_group = not torch.distributed.is_initialized()
    info = D.init_distributed(cfg.train)
    lock = RunLock(cfg.run_dir, default_wait_s())  # held by rank 0 only

    def take_existing_folder() -> None:  # before anything else reads or writes run_dir
        RunDir(cfg.run_dir).require_folder()
        lock.take_existing()

    try:
        _on_main(info, take_existing_folder)
        outcome = _run(cfg, stop, info, lock)
    except BaseException as e:
        lock.release()
        if created_group:
            D.shutdown()
        why = disk_refusal(e)
        if why is not None:
            raise DiskRefused(f"{why}: training stopped; its last complete checkpoint is intact. Free space (or "
                              f"raise the quota, or make it writable) where run_dir={cfg.run_dir} lies, then run the "
                              "same command again to resume") from e
        if isinstance(e, RuntimeError) and "shared memory" in str(e) and cfg.data.num_workers:
            raise DiskRefused(f"the data loader's workers could not get shared memory ({str(e).splitlines()[-1]}; "
                              f"{_shm_free()}): training stopped. Set data.num_workers=0 (items read in the rank), "
                              "or give the job a larger /dev/shm (containers: --shm-size), then run the same command "
                              "again to resume") from e
        raise
    lock.release()
    if created_group:
        D.barrier()
        D.shutdown()
    return outcome


def open_store(cfg: RunConfig):
    """The run's cohort store (:class:`masan.store.cohort.CohortStore`), its root read. A path
    that is no cohort store is the user's input, not the machine's: a ConfigError (exit 2, never
    restarted) that names ``data.store``."""
    from masan.store.cohort import CohortStore, StoreError

    try:
        store = CohortStore(cfg.data.store)
        _ = store.attrs  # opens the root: a Zarr group that is not a cohort store fails here, not mid-start
    except StoreError as e:
        raise ConfigError(f"data.store={cfg.data.store}: {e}") from None
    return store


def resolve_from_store(cfg: RunConfig):
    """(the geometry of the run's subjects in its store (:mod:`masan.data.contract`), what was
    filled, the store's notes), with the model's null input shapes filled from it in ``cfg``;
    raises ContractError (a ConfigError) when the store or the config breaks the contract.
    Read-only and silent (:func:`store_contract` says what it found)."""
    from masan.data.contract import resolve_inputs, store_geometry
    from masan.data.dataset import select_subjects, used_modalities

    store = open_store(cfg)
    subjects, _, _ = select_subjects(store, cfg.data)
    geo = store_geometry(store, subjects, used_modalities(cfg.data))
    return geo, resolve_inputs(cfg, geo), [*geo.notes, store.unfinished_conversion()]


def store_contract(cfg: RunConfig):
    """:func:`resolve_from_store`, its warnings and what it filled logged; returns the geometry."""
    geo, filled, notes = resolve_from_store(cfg)
    for note in [*notes, *unused_inputs(cfg)]:
        if note:
            log.warning(note)
    if filled:
        log.info("from the store %s: %s", cfg.data.store, ", ".join(filled))
    return geo


def check_settings(cfg: RunConfig, device_type: str | None) -> None:
    """The settings of a resolved config (input shapes from the store) that every start checks
    before it reads the run directory: the engine's for ``device_type`` (None: those that hold
    on every device), what no training should start with, and the model's build."""
    from masan.model.checks import check_model
    from masan.train.engine import check_config

    check_config(cfg, device_type)
    validate_for_training(cfg)
    check_model(cfg)  # a model that cannot be built or evaluated: refused now, not after training


def check_start(cfg: RunConfig, world_size: int, device_type: str | None = None) -> None:
    """The read-only checks of a start (:func:`store_contract`, :func:`check_settings` for
    ``device_type``, :func:`preflight`) on a login node, before a job waits in the queue to meet
    them: raises ConfigError or ResumeError as the job would. What only the training node can
    tell (``data.cache_dir``) is left to the job; ``cfg`` is not changed."""
    cfg = copy.deepcopy(cfg)
    cfg.data.store = os.path.abspath(cfg.data.store)
    store_contract(cfg)
    check_settings(cfg, device_type)
    ckpt = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep)
    preflight(cfg, world_size, ckpt, config_hash(cfg), node_local=False)


def _run(cfg: RunConfig, stop: StopRequest | None, info: D.DistInfo, lock: RunLock) -> TrainOutcome:
    from masan.data.contract import resolve_inputs

    # the saved config.yaml must lead predict, evaluate and a later start to the same places from any folder
    cfg.data.store, cfg.run_dir = os.path.abspath(cfg.data.store), os.path.abspath(cfg.run_dir)
    run_dir = Path(cfg.run_dir)
    done = RunDir(run_dir).finished(cfg)
    if done is None:
        # before the hash: null input shapes take the store's (rank 0 reads the store's metadata once)
        geometry = _on_main(info, lambda: store_contract(cfg))
        if not info.is_main:
            resolve_inputs(cfg, geometry)
        done = RunDir(run_dir).finished(cfg)  # a config with null shapes names its finished run only now
    if done is not None:
        log.info("%s is finished (DONE at step %d); nothing to do", run_dir, done["step"])
        return TrainOutcome(_ended(done["epochs_done"], cfg), done["step"], done["epochs_done"], str(run_dir))
    check_settings(cfg, info.device.type)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep, info.rank, info.world_size)
    chash = config_hash(cfg)
    pre = _on_main(info, lambda: preflight(cfg, info.world_size, ckpt, chash))  # nothing in run_dir changed yet
    pre.geometry = geometry.to_json()
    # every file of the run, on every rank (checkpoint shards too), is created at most this open
    with creation_umask(pre.file_mode):
        _on_main(info, lock.take)  # the first change: run.lock created if missing, this run's record
        return _train(cfg, stop or StopRequest(run_dir), info, ckpt, chash, pre)


def _train(cfg: RunConfig, stop: StopRequest, info: D.DistInfo, ckpt: CheckpointManager, chash: str,
           pre: Preflight) -> TrainOutcome:
    from masan.model import build_model, compile_modality_modules
    from masan.train.engine import LRSchedule, build_engine

    run_dir = Path(cfg.run_dir)
    rd = RunDir(run_dir)
    seed_everything(cfg.seed, cfg.deterministic)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if pre.split_is_new:
            pre.split.save(rd.split)
    train_set, val_set, test_set = _datasets(cfg, pre)
    class_names = pre.class_names

    model = build_model(cfg.model, len(class_names))  # same seed: same init on every rank
    if cfg.model.compile:
        # torch sets this variable to its /tmp default as it imports: the config decides instead
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cfg.model.compile_cache or str(rd.compile_cache)
        keep_inductor_files_in(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        names = compile_modality_modules(model, cfg.model.compile_backend, cfg.model.compile_mode)
        if info.is_main:
            log.info("model.compile: %s compiled with torch.compile (%s, mode %s) on their first step of each "
                     "mode; the first steps are slow (kernels cached in %s)", ", ".join(names),
                     cfg.model.compile_backend, cfg.model.compile_mode, os.environ["TORCHINDUCTOR_CACHE_DIR"])
    schedule = LRSchedule(cfg.optim)
    engine = build_engine(model, cfg, info.world_size, schedule)
    resumed = ckpt.resume(engine, cfg, chash)
    if info.is_main:  # the start is accepted: only now change what was there
        try:
            applied = apply_access(run_dir, pre.file_mode, pre.gid)
        except AccessError as e:  # a group member's file more open than the run may be: theirs to close
            raise ConfigError(str(e)) from None
        log.info("run directory %s: %s (never more open than the store %s)", run_dir, describe_mode(*applied),
                 cfg.data.store)
        rd.reopen()  # a changed target reopens the run
        save_config(cfg, rd.config)
        atomic_write_json(rd.store_geometry, pre.geometry)  # the contract masan.predict holds stores to

    state = TrainState()
    random.seed(cfg.seed + 1 + info.rank)  # per-rank streams (dropout) after the shared init
    np.random.seed((cfg.seed + 1 + info.rank) % 2**32)
    torch.manual_seed(cfg.seed + 1 + info.rank)
    if resumed is not None:
        state = TrainState.from_dict(resumed.state)
        if not resumed.world_changed:
            set_rng_state(resumed.state["rng"][info.rank])
        else:
            torch.manual_seed(cfg.seed + 1 + info.rank + state.step)
        if info.is_main:
            log.warning(resumed.note)
            changed = changed_data_note(resumed.state.get("data"), pre.data, resumed.tag, cfg.data.store)
            for note in (changed, resume_warning(resumed.state, cfg, resumed.tag)):
                if note:
                    log.warning(note)
    elif info.is_main:
        log.info("no complete checkpoint in %s: starting from scratch", rd.checkpoints)

    # points up to the checkpoint's step were logged before it was saved; a start from scratch
    # drops every point an earlier start logged (killed before its first checkpoint)
    earlier = rd.tb.is_dir() and any(rd.tb.iterdir())
    logger = TrainLogger(run_dir, cfg.log, enabled=info.is_main,
                         purge_step=state.step + 1 if resumed is not None else 0 if earlier else None)
    if resumed is None:
        logger.hparams(cfg)
    parts = LoopParts(cfg=cfg, info=info, engine=engine, schedule=schedule, train_set=train_set,
                      val_set=val_set, class_names=class_names, ckpt=ckpt, logger=logger, stop=stop,
                      config_hash=chash, data=pre.data, geometry=pre.geometry)
    try:
        status = train(parts, state)
        state = _final_state(ckpt)
        if status == "stopped":
            if info.is_main:
                stop.clear_file()
                with contextlib.suppress(OSError):  # only status reads it
                    atomic_write_json(rd.stopped, {"step": state.step, "reason": stop.reason or "a stop request",
                                                   "time": datetime.now().astimezone().isoformat(timespec="seconds")})
            return TrainOutcome("stopped", state.step, state.epochs_done, str(run_dir))
        finish(parts, state, test_set)
        return TrainOutcome(_ended(state.epochs_done, cfg), state.step, state.epochs_done, str(run_dir))
    finally:
        logger.close()


def keep_inductor_files_in(cache: str) -> None:
    """Make torch.compile write nothing outside ``cache``. TORCHINDUCTOR_CACHE_DIR moves the
    kernels, but inductor keeps its precompiled C++ headers (a large folder) in
    ``<tmp>/torchinductor_<user>/precompiled_headers`` whatever that variable says: the path is
    ``torch._inductor.codecache._HEADER_DIR``, fixed from ``default_cache_dir()`` (tempfile's
    directory, not the variable) as the module is imported, and read again at each use. So it
    is pointed into ``cache`` here; a torch without that global gets no precompiled headers
    (a slower first compile) rather than files in /tmp."""
    import torch._inductor.codecache as codecache
    import torch._inductor.config as inductor_config

    if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
        codecache._HEADER_DIR = os.path.join(cache, "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")
    else:
        inductor_config.cpp_cache_precompile_headers = False
        inductor_config.aot_inductor.precompile_headers = False


def _final_state(ckpt: CheckpointManager) -> TrainState:
    """The position recorded in the newest complete checkpoint (the loop always ends with one)."""
    return TrainState.from_dict(ckpt.manifest(ckpt.complete_tags()[0])["state"])


def finish(p: LoopParts, state: TrainState, test_set) -> None:
    """Predictions of the test split, metrics.json, and the DONE marker (rank 0 writes)."""
    preds, _, _ = evaluate(p, test_set)
    if p.info.is_main:
        write_predictions(preds, p.cfg.run_dir, p.class_names, p.cfg.data.positive_class, split="test")
        RunDir(p.cfg.run_dir).mark_done(p.cfg, state.step, state.epochs_done)
    D.barrier()
