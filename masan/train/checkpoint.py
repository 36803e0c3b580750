"""Complete checkpoints: all ranks save together; only a marked one is ever resumed.

Layout under ``run_dir/checkpoints``::

    step_000123/            DeepSpeed files of every rank (save_latest=False: no ``latest``)
    step_000123/COMPLETE    JSON manifest written LAST by rank 0 after a barrier:
                            {"tag", "step", "files": {name: {"bytes", "sha256"}}, "state":
                            client state without RNG, "config": the resolved run config}
    latest_complete         the newest complete tag (atomic rename), for people and tools
    step_000123.saving/     a save in progress: renamed to ``step_000123`` once marked, so a
                            save cut short never touches a complete checkpoint of that step
                            (a resume at an epoch's last step saves that step again)

DeepSpeed's own ``latest`` is written by rank 0 right after its own files with no barrier,
so it can name a checkpoint another rank never finished; it is not used. On start the
newest checkpoint whose marker exists and whose files match the manifest is loaded; a
damaged one is skipped with a warning naming it and the file, and the previous one is tried.
Damage is found in three places, all agreed by every rank before the next step:

1. rank 0, choosing: no marker, a missing file or a different size (half-written);
2. every rank, before DeepSpeed reads anything: the SHA-256 of the files it will load
   (its own ZeRO shard; rank 0 also the shared model-states file) against the manifest,
   so same-size damage (zeroed blocks, bit rot) is caught. The verdicts are gathered
   from every rank and all fall back together when any rank found damage: DeepSpeed's
   load has collectives of its own (ZeRO all-gathers the weights), so a rank that failed
   alone before them would leave the others waiting for the collective timeout;
3. every rank, loading: an error DeepSpeed raises (gathered the same way).

Cost of the checksums: each rank hashes only its own files, once when saving (right after
writing them, while they are in the page cache) and once when resuming. SHA-256 (hashlib)
of the paper config's whole checkpoint (bf16 weights, fp32 master weights and two Adam
moments) takes a fraction of what ``torch.save`` + sync of the same data takes
(docs/architecture.md, "Checksums"); with several ranks each hashes its share in parallel.
Cheap enough to be always on. Checkpoints written before checksums existed
(sizes only in the manifest) are still resumed, checked by size.

The client state saved with DeepSpeed (in rank 0's model-states file) holds the training
position (phase, epoch, step, samples consumed in the epoch, phase start step), the
data-parallel world size, the config hash and the RNG states of EVERY rank (gathered to
rank 0, because DeepSpeed keeps the client state of rank 0 only).

A trained model from a run directory (``python -m masan.predict``): :func:`final_tag` (the
newest checkpoint the run recorded), :func:`checkpoint_problem` (the checks a resume makes,
without the optimizer shards), :func:`load_weights` (the model-states file's weights, finite)
and :func:`load_model` (the config's model with them, in the run's precision).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import pickle
import platform
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from masan import distributed as D
from masan.config import RunConfig, config_diff, config_from_dict, config_to_dict
from masan.config import config_hash as fingerprint
from masan.files import atomic_write_json, atomic_write_text, disk_refusal
from masan.model import build_model
from masan.model.inputs import PRECISION_DTYPES
from masan.rundir import RunDir

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
POINTER = "latest_complete"
TAG_RE = re.compile(r"^step_(\d+)$")
SAVING, REPLACED = ".saving", ".replaced"
"""Suffixes of a checkpoint folder being written, and of the complete one of the same step that
it replaces (for the moment between two renames)."""
PROBE_BYTES = 2**20
"""What a failed save writes to learn whether the checkpoints' disk refuses writes (full, over
quota): torch's zip writer reports that as a RuntimeError without the error number."""
ASIDE_RE = re.compile(rf"^step_\d+({re.escape(SAVING)}|{re.escape(REPLACED)})$")
SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_")
"""DeepSpeed's per-rank ZeRO optimizer shard (``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``)."""
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of the (whole, unpartitioned) module weights: the only file a trained model loads."""
HASH = "sha256"
ISSUE_ZERO_RESHAPE = "https://github.com/deepspeedai/DeepSpeed/issues/3810"


class ResumeError(RuntimeError):
    """The run directory cannot be resumed with this config; the message says what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(tag: str) -> int:
    """The step of a checkpoint folder name (inverse of :func:`tag_for`)."""
    return int(TAG_RE.match(tag).group(1))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (checkpoint files can be gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def file_owner(name: str, world_size: int) -> int:
    """The rank that hashes a checkpoint file on save and verifies it on resume: the rank of
    a ZeRO shard (the rank that wrote it and the only one that loads it), rank 0 otherwise."""
    m = SHARD_RE.search(name)
    return int(m.group(1)) if m and int(m.group(1)) < world_size else 0


def _expected(entry) -> tuple[int, str | None]:
    """(bytes, sha256 or None) of a manifest entry; older manifests hold the size alone."""
    if isinstance(entry, dict):
        return entry["bytes"], entry.get(HASH)
    return int(entry), None


def rng_state() -> dict:
    """This process's python, numpy and torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resumed:
    """What a resume restored."""

    tag: str
    state: dict
    """Client state (training position etc.); ``state["rng"]`` holds one entry per saved rank."""
    world_changed: bool
    note: str
    """Human-readable summary of what was restored and what was reset."""


VERSIONED = ("torch", "deepspeed", "numpy", "zarr")
"""The libraries whose versions a checkpoint records (:func:`environment`)."""


def environment() -> dict[str, str | int]:
    """What a run's numbers depend on beyond its config and code: the versions of Python and
    :data:`VERSIONED`, and this rank's CPU threads (reductions split over another count round
    differently, ``deterministic`` or not). Recorded in every checkpoint's manifest; a resume
    under another names what changed."""
    out: dict[str, str | int] = {"python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    for name in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _probe_refusal(folder: Path) -> OSError | None:
    """The OSError with which ``folder``'s file system refuses a write of :data:`PROBE_BYTES`
    (full, over quota, read-only: :func:`masan.files.disk_refusal`), None when it takes it."""
    probe = folder / f".space_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e if disk_refusal(e) is not None else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def past_target(state: dict, before: RunConfig | None, cfg: RunConfig) -> str | None:
    """Why a checkpoint at training position ``state`` (its TrainState) cannot go on under
    ``cfg``'s epoch targets, or None. Epoch budgets may grow between starts, but a run already
    past a lowered target would be marked finished under a config that does not say how long
    it trained, and a run in its joint phase has its pretraining behind it at ``before``'s length."""
    phase, target = state["phase"], cfg.epochs[state["phase"]]
    started = state["epoch"] + (1 if state.get("consumed") else 0)  # a begun epoch counts: it cannot be undone
    if started > target:
        return (f"has trained {started} {phase} epoch(s), more than train.{phase}_epochs={target} now asks for")
    if phase == "joint" and before is not None and before.epochs["pretrain"] != cfg.epochs["pretrain"]:
        return (f"is in the joint phase after {before.epochs['pretrain']} pretrain epochs, and "
                f"train.pretrain_epochs={cfg.epochs['pretrain']} now would rewrite that record")
    return None


class CheckpointManager:
    """Save and find complete checkpoints of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        keep: complete checkpoints kept (older ones are deleted by rank 0).
        rank, world_size: this process's place (rank 0 writes markers and prunes).
    """

    def __init__(self, run_dir: str | Path, keep: int, rank: int = 0, world_size: int = 1):
        self.dir = RunDir(run_dir).checkpoints
        self.keep = max(1, keep)
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ finding

    def tags(self) -> list[str]:
        """Checkpoint folders (complete or not), newest step first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
        return [name for _, name in sorted(found, reverse=True)]

    def manifest(self, tag: str) -> dict:
        return json.loads((self.dir / tag / MARKER).read_text())

    def problem(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be resumed, or None when it is complete and intact."""
        folder = self.dir / tag
        if not (folder / MARKER).is_file():
            return f"no {MARKER} marker (a save that did not finish on every rank)"
        try:
            files = self.manifest(tag)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable {MARKER} manifest ({e})"
        for name, entry in files.items():
            f = folder / name
            size, _ = _expected(entry)
            if not f.is_file():
                return f"file {name} listed in the manifest is missing"
            if f.stat().st_size != size:
                return f"file {name} has {f.stat().st_size} bytes, the manifest says {size} (truncated or rewritten)"
        return None

    def damage(self, tag: str, shards: bool = True) -> str | None:
        """Why this rank's files of checkpoint ``tag`` differ from their manifest checksums
        (None: intact). This rank checks the files it owns (:func:`file_owner`); ZeRO shards
        only with ``shards`` (a resume on a different world size does not load them)."""
        folder = self.dir / tag
        try:
            files = self.manifest(tag)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable {MARKER} manifest ({e})"
        for name, entry in files.items():
            _, digest = _expected(entry)
            if digest is None or file_owner(name, self.world_size) != self.rank:
                continue
            if not shards and SHARD_RE.search(name):
                continue
            try:
                got = file_digest(folder / name)
            except OSError as e:
                return f"file {name} cannot be read ({e})"
            if got != digest:
                return f"file {name} has {HASH} {got[:12]}..., the manifest says {digest[:12]}... (damaged in place)"
        return None

    def complete_tags(self) -> list[str]:
        return [t for t in self.tags() if self.problem(t) is None]

    # ------------------------------------------------------------------ saving

    def save(self, engine, step: int, state: dict, cfg: RunConfig) -> str:
        """Collective: every rank writes its DeepSpeed files; rank 0 then marks the checkpoint.

        Args:
            engine: the DeepSpeed engine (same step on every rank).
            step: global optimizer step, names the folder ``step_<step>``.
            state: JSON-ready client state of the training position (same on every rank).
            cfg: the run config, recorded in the manifest to explain a refused resume.
        Returns:
            the tag.
        """
        tag = tag_for(step)
        folder = self.dir / (tag + SAVING)  # renamed to tag once marked: see the module docstring
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if (self.dir / tag).exists() and self.problem(tag) is not None:  # a damaged leftover at this step
                shutil.rmtree(self.dir / tag)
            shutil.rmtree(folder, ignore_errors=True)  # an earlier save of this step cut short
        D.barrier()
        client = dict(state, rng=D.all_gather_objects(rng_state()))
        try:
            engine.save_checkpoint(str(self.dir), tag=folder.name, client_state=client, save_latest=False)
        except Exception as e:
            full = self._full_disk(e, folder)
            if full is None:
                raise
            raise full from e
        D.barrier()
        mine = {}  # each rank makes its own files durable and hashes them (in parallel, from its page cache)
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = str(f.relative_to(folder))
            if file_owner(name, self.world_size) == self.rank:
                _fsync(f)
                mine[name] = {"bytes": f.stat().st_size, HASH: file_digest(f)}
        gathered = D.all_gather_objects(mine)
        if self.rank == 0:
            files = dict(sorted(kv for part in gathered for kv in part.items()))
            manifest = {"tag": tag, "step": step, "files": files, "state": state, "config": config_to_dict(cfg),
                        "environment": environment()}
            atomic_write_json(folder / MARKER, manifest)
            self._install(folder, tag)
            atomic_write_text(self.dir / POINTER, tag + "\n")
            self._prune()
        D.barrier()
        return tag

    def _full_disk(self, e: Exception, folder: Path) -> OSError | None:
        """For a save that failed because the checkpoints' file system refuses writes (full, over
        quota, read-only): an OSError saying so, naming ``folder`` (the previous checkpoint stays
        the newest complete one; the next start removes the cut-short folder, not this rank: the
        space it gave back would let another rank's probe find room, and call the full disk a
        crash). torch's zip writer reports a full disk as a RuntimeError about stream positions,
        so after any other error a probe of :data:`PROBE_BYTES` asks the disk. None for a failure
        of another kind."""
        if disk_refusal(e) is not None:
            return e
        refusal = _probe_refusal(self.dir)
        if refusal is None:
            return None
        return OSError(refusal.errno, f"{refusal.strerror} (after a failed save: {type(e).__name__}: {str(e)[:200]})",
                       str(folder))

    def _install(self, saved: Path, tag: str) -> None:
        """Rank 0: the marked folder ``saved`` becomes checkpoint ``tag``; a complete one of that
        step is set aside first and deleted only after (a stop between the two renames leaves
        both whole: :meth:`_recover` puts the new one in place)."""
        target, aside = self.dir / tag, self.dir / (tag + REPLACED)
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
            target.rename(aside)
        saved.rename(target)
        _fsync(self.dir)
        shutil.rmtree(aside, ignore_errors=True)

    def _recover(self) -> None:
        """Rank 0, before choosing: remove saves cut short (unmarked), and finish a replacement
        that stopped between its two renames (the new marked folder goes in place, else the one
        set aside goes back)."""
        if not self.dir.is_dir():
            return
        for cut in self.dir.glob("step_*" + SAVING):  # a save cut short: its space back before the next save
            if not (cut / MARKER).is_file() and not (self.dir / (cut.name[: -len(SAVING)] + REPLACED)).exists():
                shutil.rmtree(cut, ignore_errors=True)
        for aside in self.dir.glob("step_*" + REPLACED):
            tag = aside.name[: -len(REPLACED)]
            if (self.dir / tag).exists():
                continue
            saved = self.dir / (tag + SAVING)
            if saved.is_dir() and (saved / MARKER).is_file():
                saved.rename(self.dir / tag)
            else:
                aside.rename(self.dir / tag)

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop anything older than the oldest kept."""
        complete = self.complete_tags()
        if not complete:
            return
        kept = complete[: self.keep]
        oldest_kept = step_of(kept[-1])
        for tag in self.tags():
            if tag not in kept and step_of(tag) < oldest_kept:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        for leftover in self.dir.iterdir():  # saves cut short (a kill during the save)
            if ASIDE_RE.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ resuming

    def _choose(self, skip: set[str]) -> str | None:
        """Rank 0 picks the newest intact checkpoint not in ``skip``, warning about damaged ones."""
        for tag in self.tags():
            if tag in skip:
                continue
            why = self.problem(tag)
            if why is None:
                return tag
            log.warning("skipping damaged checkpoint %s: %s; trying the previous one", self.dir / tag, why)
        return None

    def _any_rank_failed(self, tag: str, what: str, why_here: str | None) -> bool:
        """Collective: True on every rank when any rank gave a reason (rank 0 warns, naming
        each rank's reason), so all ranks fall back to the previous checkpoint together."""
        bad = [f"rank {r}: {w}" for r, w in enumerate(D.all_gather_objects(why_here)) if w]
        if bad and self.rank == 0:
            log.warning("skipping %s checkpoint %s: %s; trying the previous one", what, self.dir / tag, "; ".join(bad))
        return bool(bad)

    def refusal(self, cfg: RunConfig, config_hash: str) -> str | None:
        """Read-only, one process: why the newest complete checkpoint refuses ``cfg``
        (:class:`ResumeError`'s message), or None; lets a start refuse before it changes
        anything in the run directory (the collective :meth:`resume` checks again)."""
        for tag in self.tags():
            if self.problem(tag) is None:
                try:
                    self.check_compatible(tag, cfg, config_hash)
                except ResumeError as e:
                    return str(e)
                return None
        return None

    def check_compatible(self, tag: str, cfg: RunConfig, config_hash: str) -> list[str]:
        """Raise ResumeError when checkpoint ``tag`` cannot go on under ``cfg``; else the settings
        a resume may change that did change since it was written (``key: old -> new``)."""
        saved = self.manifest(tag)
        try:
            before = config_from_dict(saved["config"])
        except Exception as e:  # noqa: BLE001 - an older config layout: the hash alone must do
            before, unreadable = None, f"(saved config unreadable with this code: {e})"
        past = past_target(saved["state"], before, cfg)
        if past:
            raise ResumeError(f"checkpoint {self.dir / tag} {past}; start it again with at least those epochs, or "
                              f"train the shorter schedule in a new run directory (run_dir=...), leaving "
                              f"{self.dir.parent} as it is")
        changed = [] if before is None else config_diff(before, cfg)
        if saved["state"]["config_hash"] == config_hash:
            return changed
        if before is not None and fingerprint(before) == config_hash:
            return changed  # the settings that differ have since become resumable (e.g. data.positive_class)
        diffs = [unreadable] if before is None else config_diff(before, cfg, resumable=False)
        raise ResumeError(
            f"checkpoint {self.dir / tag} was written with a different config "
            f"(hash {saved['state']['config_hash']}, now {config_hash}); these settings differ:\n  "
            + "\n  ".join(diffs)
            + f"\nEither restore those settings to continue this run, or start fresh in a new run "
              f"directory (run_dir=...), leaving {self.dir.parent} as it is.")

    def resume(self, engine, cfg: RunConfig, config_hash: str) -> Resumed | None:
        """Collective: load the newest complete, intact checkpoint into ``engine``.

        Returns None when there is none (a fresh start). Raises ResumeError when the newest
        intact checkpoint belongs to an incompatible config. A different data-parallel world
        size loads the weights only (ZeRO's partitioned Adam state cannot be re-sharded: the
        upstream issue is :data:`ISSUE_ZERO_RESHAPE`) and restarts Adam's moments; the training
        position is kept.
        """
        skip: set[str] = set()
        if self.rank == 0:
            self._recover()
        while True:
            tag = D.broadcast_object(self._choose(skip) if self.rank == 0 else None)
            if tag is None:
                if skip:
                    log.warning("no loadable checkpoint left in %s; starting from scratch", self.dir)
                return None
            error, changed = None, []
            if self.rank == 0:
                try:
                    changed = self.check_compatible(tag, cfg, config_hash)
                except ResumeError as e:
                    error = str(e)
            error = D.broadcast_object(error)
            if error:
                raise ResumeError(error)
            saved_world = self.manifest(tag)["state"]["dp_world_size"]
            world_changed = saved_world != self.world_size
            # agreed BEFORE DeepSpeed reads anything: its load has collectives of its own
            if self._any_rank_failed(tag, "damaged", self.damage(tag, shards=not world_changed)):
                skip.add(tag)
                continue
            unknown = None
            try:
                with checked_objects(engine, trusted=os.environ.get(TRUST_OBJECTS_ENV) == "1"):
                    path, client = engine.load_checkpoint(
                        str(self.dir), tag=tag, load_module_only=world_changed,
                        load_optimizer_states=not world_changed, load_lr_scheduler_states=False)
                why = "DeepSpeed found nothing to load" if path is None or client is None else None
            except UnknownObject as e:  # not a damaged file to skip: every older one would hold the same
                why, unknown = str(e), str(e)
            except Exception as e:  # noqa: BLE001 - any load failure means: try the previous one
                why = f"load failed: {type(e).__name__}: {e}"
            refused = next((u for u in D.all_gather_objects(unknown) if u), None)
            if refused:
                raise ResumeError(refused)
            if self._any_rank_failed(tag, "unloadable", why):
                skip.add(tag)
                continue
            if world_changed:
                note = (f"resumed {tag} written by {saved_world} data-parallel ranks on {self.world_size}: "
                        f"restored model weights, step, epoch, phase and LR schedule position; RESET Adam "
                        f"moments (ZeRO optimizer state cannot be re-sharded, {ISSUE_ZERO_RESHAPE}) and "
                        f"re-seeded per-rank RNGs; the rest of the epoch is re-dealt over the new ranks")
            else:
                note = f"resumed {tag}: weights, Adam state, position, LR schedule and per-rank RNG states"
            if changed:  # rank 0's, which alone logs the note
                note += "; settings changed since it was written: " + ", ".join(changed)
            then, now = self.manifest(tag).get("environment") or {}, environment()
            moved = [f"{k} {then[k]} -> {now[k]}" for k in now if k in then and then[k] != now[k]]
            if moved:  # the numbers may differ from an unbroken run's, deterministic or not
                note += "; written under another environment: " + ", ".join(moved)
            return Resumed(tag=tag, state=client, world_changed=world_changed, note=note)


# ---------------------------------------------------------------------- a trained model's weights


class CheckpointUnusable(ValueError):
    """A checkpoint cannot give a trained model; the message names the file and the fix."""


def final_tag(run_dir: Path, cfg: RunConfig) -> tuple[str | None, str]:
    """The newest checkpoint the run recorded, whether or not it is still intact, and which
    record names it: the step in ``DONE``, ``checkpoints/latest_complete`` or the newest
    ``COMPLETE`` marker. Looking at the records, not at what is on disk, is what finds a
    deleted or truncated newest checkpoint instead of silently taking the one before."""
    rd = RunDir(run_dir)
    named: dict[str, str] = {}
    done = rd.finished(cfg)
    if done is not None:
        named[tag_for(done["step"])] = f"{rd.done} (step {done['step']})"
    try:
        pointed = (rd.checkpoints / POINTER).read_text().strip()
        if TAG_RE.match(pointed):
            named.setdefault(pointed, str(rd.checkpoints / POINTER))
    except OSError:
        pass
    mgr = CheckpointManager(run_dir, keep=1)
    marked = next((t for t in mgr.tags() if (mgr.dir / t / MARKER).is_file()), None)
    if marked is not None:
        named.setdefault(marked, f"its {MARKER} marker")
    if not named:
        return None, ""
    tag = max(named, key=step_of)
    return tag, named[tag]


def checkpoint_problem(run_dir: Path, tag: str) -> str | None:
    """Why checkpoint ``tag`` cannot be predicted with (None: intact), by the checks a resume
    makes: marker, every file's size, then the SHA-256 of the files a trained model loads (the
    optimizer shards are not loaded, so not hashed: gigabytes for nothing)."""
    mgr = CheckpointManager(run_dir, keep=1)
    if not (mgr.dir / tag).is_dir():
        return "the folder does not exist (deleted or moved)"
    return mgr.problem(tag) or mgr.damage(tag, shards=False)


def previous_intact(run_dir: Path, tag: str) -> str | None:
    """The newest checkpoint older than ``tag`` that passes :func:`checkpoint_problem`."""
    older = [t for t in CheckpointManager(run_dir, keep=1).tags() if step_of(t) < step_of(tag)]
    return next((t for t in older if checkpoint_problem(run_dir, t) is None), None)


def _numpy_globals() -> list:
    """What a model-states file holds besides tensors, for ``torch.load(weights_only=True)``: the
    NumPy arrays of each rank's saved RNG state (``np.random.get_state()``), under the module names
    of NumPy 1 and 2 (a run trained under either is read under either)."""
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.uint64, np.int64, np.float64)]
    return [*((multiarray._reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")),
            np.ndarray, np.dtype, *dtypes]


def _deepspeed_globals() -> list:
    """What DeepSpeed's own optimizer shards hold besides tensors and plain values: the ZeRO stage,
    the loss scaler (bf16: static, fp16: dynamic) and the fragment map of each parameter."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


TRUST_OBJECTS_ENV = "MASAN_TRUST_CHECKPOINT_OBJECTS"
"""Set to 1 in the environment of one start, it loads checkpoint files as DeepSpeed does, objects
of any type included. Not a config key: a run's config.yaml lies in the run directory, where whoever
could plant a pickle could also switch the check off, and a saved key would stay on for good."""


class UnknownObject(ResumeError):
    """A checkpoint file holds an object of a type a checkpoint of this tool never holds."""


@contextlib.contextmanager
def checked_objects(engine, trusted: bool = False):
    """While inside, ``engine`` reads checkpoint files with ``torch.load(weights_only=True)``:
    tensors, plain values and the NumPy and DeepSpeed types a checkpoint holds
    (:func:`_numpy_globals`, :func:`_deepspeed_globals`). DeepSpeed itself unpickles whatever the
    file holds, and a pickle can run any code: a run directory others may write (a shared project
    folder) must not hand them this process. A file holding anything else raises
    :class:`UnknownObject`. ``trusted`` (:data:`TRUST_OBJECTS_ENV`) leaves DeepSpeed's loader as
    it is."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if trusted or not isinstance(ce, TorchCheckpointEngine):
        yield
        return
    allowed = [*_numpy_globals(), *_deepspeed_globals()]

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            what = str(e).split("WeightsUnpickler error: ")[-1].splitlines()[0][:200]
            raise UnknownObject(
                f"{path} holds an object a checkpoint of this tool never holds ({what}): the file was altered, or "
                "written by another tool or DeepSpeed version, and loading it could run code hidden in it, so it "
                f"was not loaded. If the run directory is yours alone and its files came from this tool, start it "
                f"once with {TRUST_OBJECTS_ENV}=1 in the environment; else start afresh in a new run_dir") from None

    ce.load = load  # the engine's every read (model states, optimizer shards) goes through it
    try:
        yield
    finally:
        del ce.load


def load_weights(run_dir: Path, tag: str) -> dict:
    """The module weights (name -> tensor, on the CPU) of checkpoint ``tag``'s model-states
    file; CheckpointUnusable for a file torch cannot read or weights that are not all finite
    (a diverged run: every prediction would be NaN or arbitrary while the exit status said
    success)."""
    path = RunDir(run_dir).checkpoints / tag / MODEL_STATES
    try:
        # weights only: a run may be someone else's, and a pickle can run any code when loaded
        with torch.serialization.safe_globals(_numpy_globals()):
            states = torch.load(path, map_location="cpu", weights_only=True)
        module = states["module"]
    except pickle.UnpicklingError as e:
        raise CheckpointUnusable(
            f"{path} holds objects other than tensors and the numbers this tool saves "
            f"({str(e).split('WeightsUnpickler error: ')[-1].splitlines()[0][:200]}): it was not written by this "
            "tool, or was altered, and loading it could run code hidden in it, so it is not loaded. Predict with "
            f"another checkpoint of {RunDir(run_dir).checkpoints} (--checkpoint TAG), or retrain") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler raises, the file is unusable
        raise CheckpointUnusable(f"{path} cannot be loaded ({type(e).__name__}: {e}); restore it from a backup, or "
                                 f"predict with another checkpoint of {RunDir(run_dir).checkpoints} "
                                 f"(--checkpoint TAG)") from None
    bad = [k for k, v in module.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        previous = previous_intact(run_dir, tag)
        fix = f"--checkpoint {previous}" if previous else "retrain the run"
        raise CheckpointUnusable(f"{path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                                 f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the run diverged or the file "
                                 f"was altered. Predict with an earlier checkpoint ({fix}) or retrain with a lower "
                                 f"optim.lr")
    return module


def load_model(run_dir: Path, cfg: RunConfig, tag: str, device: torch.device) -> torch.nn.Module:
    """The model ``cfg`` describes with the weights of checkpoint ``tag`` (:func:`load_weights`),
    in eval mode on ``device``, in the run's precision (``train.precision``); CheckpointUnusable
    when the weights do not fit that model."""
    module = load_weights(run_dir, tag)
    model = build_model(cfg.model, len(cfg.data.classes))
    try:
        model.load_state_dict(module)
    except RuntimeError as e:
        path, config = RunDir(run_dir).checkpoints / tag / MODEL_STATES, RunDir(run_dir).config
        raise CheckpointUnusable(f"{path} does not fit the model {config} describes ({str(e).splitlines()[0]}); "
                                 f"was {config} edited after training? Restore it") from None
    return model.to(device, PRECISION_DTYPES[cfg.train.precision]).eval()
