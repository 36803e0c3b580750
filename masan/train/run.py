"""``run_training(cfg, stop)``: one run from its config to predictions, resumable at any point.

Order of a start: process group -> DONE check -> seeds -> data and split -> model and
DeepSpeed engine -> resume from the newest complete checkpoint (or refuse an incompatible
config) -> config.yaml -> TensorBoard -> :func:`masan.train.loop.train` -> predictions,
metrics.json and DONE (rank 0). Every launcher (local, torchrun, submitit on SLURM) ends here.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from masan.config import RunConfig, config_hash, save_config
from masan.train import distributed as D
from masan.train.checkpoint import CheckpointManager, set_rng_state
from masan.train.logging import TrainLogger
from masan.train.loop import LoopParts, TrainState, evaluate, train
from masan.train.stop import StopRequest

log = logging.getLogger(__name__)

DONE_FILE = "DONE"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainOutcome:
    """How run_training ended: ``completed`` (all epochs or train.max_steps done, predictions
    written) or ``stopped`` (a stop request; a complete checkpoint was saved; run again to go on)."""

    status: str
    step: int
    epoch: int
    """Epochs finished over both phases."""
    run_dir: str


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


def _target(cfg: RunConfig) -> dict:
    """What 'finished' means for this config (a changed target or config reopens a DONE run;
    an incompatible config is then refused by the resume)."""
    return {"pretrain_epochs": cfg.train.pretrain_epochs, "joint_epochs": cfg.train.joint_epochs,
            "max_steps": cfg.train.max_steps, "config_hash": config_hash(cfg)}


def finished_run(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The DONE record of a run that finished this config's epoch target, else None."""
    f = run_dir / DONE_FILE
    if not f.is_file():
        return None
    try:
        done = json.loads(f.read_text())
    except ValueError:
        return None
    return done if done.get("target") == _target(cfg) else None


def _data(cfg: RunConfig, info: D.DistInfo, run_dir: Path):
    """Subjects, the split of this repeat (made once by rank 0, saved in run_dir) and the datasets."""
    from masan.data.dataset import CohortDataset, select_subjects
    from masan.data.splits import SPLIT_FILE, Split, make_split
    from masan.data.store import CohortStore

    subjects, labels, class_names = select_subjects(CohortStore(cfg.data.store), cfg.data)
    label_of = dict(zip(subjects, labels))
    split_path = run_dir / SPLIT_FILE
    if info.is_main and not split_path.is_file():
        make_split(subjects, labels, cfg.split).save(split_path)
    D.barrier()
    split = Split.load(split_path)
    missing = sorted(set(split.train + split.val + split.test) - set(label_of))
    if missing:
        raise ValueError(f"{split_path} names subjects not in the store {cfg.data.store} with data.classes "
                         f"{cfg.data.classes}: {missing[:5]}...; use the store the run started with or a new run_dir")

    def dataset(part):
        return CohortDataset(cfg.data.store, part, [label_of[s] for s in part], cfg.data)

    return dataset(split.train), (dataset(split.val) if split.val else None), dataset(split.test), class_names


def run_training(cfg: RunConfig, stop: StopRequest | None = None) -> TrainOutcome:
    """Train one run (see docs/architecture.md); collective over all ranks of the process group.

    Initialises torch.distributed from the environment when nobody did, and then also tears
    it down at the end (after a barrier; on an error without one: the other ranks may never
    reach it).
    """
    created_group = not torch.distributed.is_initialized()
    info = D.init_distributed(cfg.train)
    try:
        outcome = _run(cfg, stop, info)
    except BaseException:
        if created_group:
            D.shutdown()
        raise
    if created_group:
        D.barrier()
        D.shutdown()
    return outcome


def _run(cfg: RunConfig, stop: StopRequest | None, info: D.DistInfo) -> TrainOutcome:
    from masan.model import build_model
    from masan.train.engine import LRSchedule, build_engine, check_config

    run_dir = Path(cfg.run_dir)
    done = finished_run(run_dir, cfg)
    if done is not None:
        log.info("%s is finished (DONE at step %d); nothing to do", run_dir, done["step"])
        return TrainOutcome("completed", done["step"], done["epochs_done"], str(run_dir))
    check_config(cfg, info.device.type)
    stop = stop or StopRequest(run_dir)
    seed_everything(cfg.seed, cfg.deterministic)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DONE_FILE).unlink(missing_ok=True)  # a changed target reopens the run
    train_set, val_set, test_set, class_names = _data(cfg, info, run_dir)

    model = build_model(cfg.model, len(class_names))  # same seed: same init on every rank
    schedule = LRSchedule(cfg.optim)
    engine = build_engine(model, cfg, info.world_size, schedule)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep, info.rank, info.world_size)
    chash = config_hash(cfg)
    resumed = ckpt.resume(engine, cfg, chash)
    if info.is_main:
        save_config(cfg, run_dir / CONFIG_FILE)  # after the compatibility check: a refused start changes nothing

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
    elif info.is_main:
        log.info("no complete checkpoint in %s: starting from scratch", run_dir / "checkpoints")

    logger = TrainLogger(run_dir, cfg.log, enabled=info.is_main,
                         # points up to the checkpoint's step were logged before it was saved
                         purge_step=state.step + 1 if resumed is not None else None)
    if resumed is None:
        logger.hparams(cfg)
    parts = LoopParts(cfg=cfg, info=info, engine=engine, schedule=schedule, train_set=train_set,
                      val_set=val_set, class_names=class_names, ckpt=ckpt, logger=logger, stop=stop,
                      config_hash=chash)
    try:
        status = train(parts, state)
        state = _final_state(ckpt)
        if status == "stopped":
            if info.is_main:
                stop.clear_file()
            return TrainOutcome("stopped", state.step, state.epochs_done, str(run_dir))
        finish(parts, state, test_set)
        return TrainOutcome("completed", state.step, state.epochs_done, str(run_dir))
    finally:
        logger.close()


def _final_state(ckpt: CheckpointManager) -> TrainState:
    """The position recorded in the newest complete checkpoint (the loop always ends with one)."""
    return TrainState.from_dict(ckpt.manifest(ckpt.complete_tags()[0])["state"])


def finish(p: LoopParts, state: TrainState, test_set) -> None:
    """Predictions of the test split, metrics.json, and the DONE marker (rank 0 writes)."""
    from masan.evaluate.predict import write_predictions

    preds, _, _ = evaluate(p, test_set)
    if p.info.is_main:
        write_predictions(preds, p.cfg.run_dir, p.class_names, p.cfg.data.positive_class, split="test")
        done = {"step": state.step, "epochs_done": state.epochs_done, "target": _target(p.cfg)}
        tmp = Path(p.cfg.run_dir) / f".{DONE_FILE}.tmp"
        tmp.write_text(json.dumps(done))
        os.replace(tmp, Path(p.cfg.run_dir) / DONE_FILE)
    D.barrier()
