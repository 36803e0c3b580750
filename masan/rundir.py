"""The run directory: every file name in it, and whether the run is finished.

One training run keeps everything in one folder (``cfg.run_dir``). Training writes it, and
the launchers, ``launch/status.py``, the evaluation report and the benchmarks read it; each
of them asks this object for a path instead of spelling the name again, so a file is renamed
or added here and nowhere else. Layout (docs/architecture.md explains each file)::

    config.yaml            resolved config, written at every accepted start
    submitted_config.yaml  the config launch/submit.py hands a local run (before it starts)
    split.json             the split of this repeat
    checkpoints/           complete checkpoints (layout: masan.train.checkpoint)
    tb/                    TensorBoard events (rank 0)
    progress.json          the last logged intervals (wall time, step, epochs) and loss: what status reads
    STOP                   created by a user: every rank stops at the next step and saves
    STOPPED                the last start stopped on request with a checkpoint (JSON: step, reason,
                           time); removed by the next accepted start (ignored once a later start took
                           run.lock): status tells a stop from a crash
    predictions.csv        test predictions, end of the run (masan.predictions)
    region_weights.npy     region weights of the test subjects
    metrics.json           test metrics
    DONE                   the run finished this config's epoch target (JSON record)
    jobs.json (+ .lock)    SLURM jobs and events of this run (launch.slurm.jobs)
    slurm/                 submitit's job scripts and logs
    train.log, bench_run.json   output and stamp of a run of python -m experiments.science

:meth:`RunDir.finished` imports neither torch nor DeepSpeed: ``launch/submit.py`` and
``launch/status.py`` ask it on a login node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from masan.access import not_a_folder
from masan.config import ConfigError, RunConfig, config_from_dict, config_hash, config_to_dict, load_config
from masan.files import atomic_write_json


def _when(text: object) -> datetime | None:
    """An ISO time of a run-directory record, in local time when it names no zone; None if none."""
    try:
        t = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return None if t is None else t if t.tzinfo else t.astimezone()


def done_target(cfg: RunConfig) -> dict:
    """What 'finished' means for this config: its epoch target and the config fingerprint. A
    longer target or another config reopens a DONE run (the resume then refuses a config
    the checkpoints cannot serve)."""
    return {"pretrain_epochs": cfg.train.pretrain_epochs, "joint_epochs": cfg.train.joint_epochs,
            "max_steps": cfg.train.max_steps, "config_hash": config_hash(cfg)}


def ended_early(done: dict, cfg: RunConfig) -> bool:
    """Whether a DONE record (:meth:`RunDir.finished`) ends the run before all its epochs:
    ``train.max_steps`` stopped it (predict and evaluate then call the run unfinished)."""
    epochs = sum(cfg.epochs.values())
    return done.get("epochs_done", epochs) < epochs


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created until something is written).

    ``RunDir(cfg.run_dir).split`` is ``run_dir/split.json``; the ``*_NAME`` class attributes
    are the bare names, for code that lists folders.
    """

    root: Path

    CONFIG_NAME = "config.yaml"
    SUBMITTED_CONFIG_NAME = "submitted_config.yaml"
    SPLIT_NAME = "split.json"
    STORE_GEOMETRY_NAME = "store_geometry.json"
    LOCK_NAME = "run.lock"
    CHECKPOINTS_NAME = "checkpoints"
    TB_NAME = "tb"
    PROGRESS_NAME = "progress.json"
    STOP_NAME = "STOP"
    STOPPED_NAME = "STOPPED"
    PREDICTIONS_NAME = "predictions.csv"
    REGION_WEIGHTS_NAME = "region_weights.npy"
    METRICS_NAME = "metrics.json"
    DONE_NAME = "DONE"
    JOBS_NAME = "jobs.json"
    SLURM_NAME = "slurm"
    TRAIN_LOG_NAME = "train.log"
    BENCH_STAMP_NAME = "bench_run.json"
    COMPILE_CACHE_NAME = "compile_cache"

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    # ------------------------------------------------------------------ paths

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG_NAME

    @property
    def submitted_config(self) -> Path:
        return self.root / self.SUBMITTED_CONFIG_NAME

    @property
    def split(self) -> Path:
        return self.root / self.SPLIT_NAME

    @property
    def lock(self) -> Path:
        """The run's one-writer lock (masan/train/runlock.py)."""
        return self.root / self.LOCK_NAME

    @property
    def store_geometry(self) -> Path:
        """The geometry of the store the run trained on (masan/data/contract.py)."""
        return self.root / self.STORE_GEOMETRY_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS_NAME

    @property
    def tb(self) -> Path:
        return self.root / self.TB_NAME

    @property
    def progress(self) -> Path:
        """The last logged intervals and loss (:meth:`masan.train.logging.TrainLogger.progress`)."""
        return self.root / self.PROGRESS_NAME

    @property
    def stop(self) -> Path:
        return self.root / self.STOP_NAME

    @property
    def stopped(self) -> Path:
        """Written when a start stops on request with a complete checkpoint (:meth:`stopped_record`)."""
        return self.root / self.STOPPED_NAME

    def stopped_record(self) -> dict | None:
        """The STOPPED record (``step``, ``reason``, ``time``); None when absent, unreadable, or
        older than the start the run lock's record names (``since``): a later start took the lock
        (it writes its record there before anything that may fail) and did not get as far as
        removing STOPPED. Times, not file dates: a copy that does not keep them must not turn a
        stop into a crash."""
        try:
            record = json.loads(self.stopped.read_text())
            lock = json.loads(self.lock.read_text() or "{}") if self.lock.is_file() else {}
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return None
        stopped, started = _when(record.get("time")), _when(lock.get("since") if isinstance(lock, dict) else None)
        return None if stopped and started and started > stopped else record

    @property
    def predictions(self) -> Path:
        return self.root / self.PREDICTIONS_NAME

    @property
    def region_weights(self) -> Path:
        return self.root / self.REGION_WEIGHTS_NAME

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS_NAME

    @property
    def done(self) -> Path:
        return self.root / self.DONE_NAME

    @property
    def jobs(self) -> Path:
        return self.root / self.JOBS_NAME

    @property
    def jobs_lock(self) -> Path:
        return self.root / (self.JOBS_NAME + ".lock")

    @property
    def slurm(self) -> Path:
        return self.root / self.SLURM_NAME

    @property
    def train_log(self) -> Path:
        return self.root / self.TRAIN_LOG_NAME

    @property
    def bench_stamp(self) -> Path:
        return self.root / self.BENCH_STAMP_NAME

    @property
    def compile_cache(self) -> Path:
        return self.root / self.COMPILE_CACHE_NAME

    def start_config(self, given: str | os.PathLike | None) -> str | None:
        """The config file a start uses: ``given`` (--config), else this run's own config.yaml
        when it has one (its checkpoints refuse the built-in defaults), else None (the defaults)."""
        if given is not None:
            return str(given)
        return str(self.config) if self.config.is_file() else None

    def any_config(self) -> Path | None:
        """The config a run was started with (``config.yaml``), else the one it was submitted
        with (a local run that has not started), else None."""
        return next((p for p in (self.config, self.submitted_config) if p.is_file()), None)

    # ------------------------------------------------------------------ DONE

    def own_names(self) -> set[str]:
        """The names a run (or its launcher) writes into its folder: the ``*_NAME``s, and the
        jobs.json lock."""
        names = {v for k, v in vars(type(self)).items() if k.endswith("_NAME")}
        return names | {self.jobs_lock.name}

    def require_folder(self) -> None:
        """Refuse (ConfigError) a run directory that is, or lies below, something else than a
        folder (a file there would surface as NotADirectoryError from whichever file is read
        first), or an existing folder that holds files and none of a run's: an accepted start
        closes its whole run directory to the store's access mode (mode bits and group of every
        file, :func:`masan.access.apply_access`), which must never reach a user's other files
        (a home or project folder given as run_dir, or an empty run_dir: the current folder)."""
        why = not_a_folder(self.root)
        if why:
            raise ConfigError(f"run_dir {self.root} {why}; choose another run_dir=... (--run-dir for "
                              "launch/submit.py) or move the file away")
        try:
            present = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".nfs"))
        except FileNotFoundError:
            return
        if present and not set(present) & self.own_names():
            shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
            raise ConfigError(f"run_dir {self.root} is a folder of other files ({shown}), not a training run: a run "
                              "writes its checkpoints into its run directory and gives every file there the store's "
                              f"access mode; choose a new or empty folder, e.g. run_dir={self.root / 'run'}")

    def finished(self, cfg: RunConfig) -> dict | None:
        """The DONE record (``step``, ``epochs_done``, ``target``, ``config``) when the run finished
        this config's target (:func:`done_target`), else None: no DONE, an unreadable one (a write
        that never finished counts as not done), or one of a shorter target or other config.

        A record whose fingerprint alone differs is this config's when the config it was written
        for (its ``config``; a record from before it was kept: the run's config.yaml, which every
        start that could change it rewrites with DONE) fingerprints as ``cfg`` does now: a newer
        version may fingerprint the same settings otherwise (a setting made resumable drops out
        of every fingerprint), and must not call every finished run unfinished."""
        try:
            record = json.loads(self.done.read_text())
        except (FileNotFoundError, IsADirectoryError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("target"), dict):
            return None
        want = done_target(cfg)
        if record["target"] == want:
            return record
        if {k: v for k, v in record["target"].items() if k != "config_hash"} != \
                {k: v for k, v in want.items() if k != "config_hash"}:
            return None
        return record if self._fingerprint_now(record.get("config")) == want["config_hash"] else None

    def _fingerprint_now(self, written_for: dict | None) -> str | None:
        """Today's fingerprint of the config a DONE record was written for (None: unreadable)."""
        try:
            return config_hash(load_config(self.config) if written_for is None else config_from_dict(written_for))
        except Exception:  # noqa: BLE001 - missing, damaged or of a layout this code cannot read: not finished
            return None

    def unfinished(self, cfg: RunConfig) -> str | None:
        """Why the run has not finished this config's target, in words that name the file (None:
        DONE records this target and all its epochs). Predict and evaluate refuse such a run
        unless asked: its scores would be those of a partly trained model."""
        done = self.finished(cfg)
        if done is None:
            why = (f"{self.done} does not exist" if not self.done.exists() else
                   f"{self.done} is not a record of this config's target (empty, damaged, or written for another "
                   f"target or config than {self.config})")
            return f"the run has not finished ({why}: it stopped or is still training)"
        if ended_early(done, cfg):
            return (f"the run stopped at train.max_steps={cfg.train.max_steps} after {done.get('epochs_done')} of its "
                    f"{sum(cfg.epochs.values())} epochs ({self.done})")
        return None

    def mark_done(self, cfg: RunConfig, step: int, epochs_done: int) -> Path:
        """Write DONE (atomically: a reader never sees half a record) for this config's target."""
        return atomic_write_json(self.done, {"step": step, "epochs_done": epochs_done,
                                             "target": done_target(cfg), "config": config_to_dict(cfg)}, indent=None)

    def reopen(self) -> None:
        """Remove DONE (a run started again with a changed target is not finished) and STOPPED
        (this start is running)."""
        self.done.unlink(missing_ok=True)
        self.stopped.unlink(missing_ok=True)
