"""One run directory's status, one row of launch/status.py's table (:class:`RunStatus`): which
folders are runs (:func:`find_runs`), what each run's files say (:func:`run_status`) and all
of them at once (:func:`collect`).

Sources, all in the run directory, read with the project's own readers: config.yaml
(masan.config), checkpoints/*/COMPLETE (masan.train.checkpoint), DONE (masan.rundir),
jobs.json (launch.slurm.jobs), tb/ (TensorBoard's event reader); SLURM's answer from
launch.slurm.queue. A source that cannot be read leaves its columns unknown and adds a note.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import pwd
import re
import socket
import stat
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from launch.slurm import jobs
from launch.slurm.queue import Queued, never_starts, slurm_state, squeue_states
from launch.slurm.submission import failure_logs
from masan.order import natural_path
from masan.rundir import RunDir, ended_early
from masan.train.eta import ETA_INTERVALS, duration_text, epoch_fraction, eta_seconds
from masan.train.runlock import holder_record, local_holders
from masan.train.stop import EXIT_INTERRUPTED

RUN_MARKERS = (RunDir.CONFIG_NAME, RunDir.SUBMITTED_CONFIG_NAME, RunDir.JOBS_NAME, RunDir.CHECKPOINTS_NAME)
"""Any of these marks a run directory (a SLURM run has only jobs.json until its job starts)."""
REPEAT_RE = re.compile(r"^repeat_(\d+)$")
LOSS_TAG, EPOCH_TAG = "train/total", "train/epoch"


NO_JOB = "-"
"""The job column of a run with no job record and no live holder (launch/train_local.py by hand)."""
STALL_INTERVALS = 10
"""A live run that has logged nothing for this many of its recent logging intervals (and for
longer than its collective timeout, which ends ranks waiting in a collective) gets a note: a
rank stuck outside a collective (a dead file system, a hung data read) holds its allocation
until the time limit otherwise."""


@dataclass
class RunStatus:
    """One row of the table (None: not known yet). Times in seconds."""

    run: str
    path: str
    variant: str = "?"
    repeat: int | None = None
    slurm: str = NO_JOB
    job_id: str | None = None
    phase: str | None = None
    epochs_done: float | None = None
    epochs_target: int | None = None
    step: int | None = None
    checkpoint: str | None = None
    checkpoint_age_s: float | None = None
    requeues: int = 0
    restarts: int = 0
    loss: float | None = None
    eta_s: float | None = None
    """Seconds of training left; for a pending job, after it starts (its wait is not known)."""
    logged_age_s: float | None = None
    """Seconds since the newest logged step (TensorBoard's wall time)."""
    done: bool = False
    reason: str | None = None
    """SLURM's reason a pending job waits (squeue %r), None when not pending."""
    note: str = ""

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


def find_runs(paths: list[str | os.PathLike]) -> list[tuple[Path, Path, OSError | None]]:
    """(root given, run directory, None) for every run directory at or below each path, in
    natural order (``repeat_2`` before ``repeat_10``: :func:`masan.order.natural_path`);
    nothing is searched inside a run directory (its checkpoints, tb, slurm folders). A folder
    this user may not list or look into is listed too, with the error: it may hold runs, and
    leaving it out would make the table look complete when it is not."""
    found: dict[Path, tuple[Path, OSError | None]] = {}

    def unreadable(err: OSError) -> None:
        found.setdefault(Path(err.filename), (root, err))

    for root in map(Path, paths):
        for folder, dirs, _ in os.walk(root, onerror=unreadable):
            here = Path(folder)
            if not os.access(here, os.X_OK):  # listed, but nothing in it can be looked at
                found.setdefault(here, (root, PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)))
                dirs.clear()
                continue
            if any(os.path.lexists(here / m) for m in RUN_MARKERS):
                found.setdefault(here, (root, None))
                dirs.clear()
            dirs.sort()
    return sorted(((root, run, err) for run, (root, err) in found.items()), key=lambda r: natural_path(r[1]))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _denied(run: Path, paths: list[Path], consequence: str = "") -> str:
    """One note for every path of a run this user may not read: which, their mode and owner,
    and the fix."""
    def one(path: Path) -> str:
        name = "this folder" if path == run else os.path.relpath(path, run) if path.is_relative_to(run) \
            else str(path)
        try:
            st = os.stat(path)
            return f"{name} (mode {stat.S_IMODE(st.st_mode):o}, owner {_user(st.st_uid)})"
        except OSError:
            return f"{name} (its mode cannot be read either)"

    return (f"cannot read {', '.join(one(p) for p in paths)}: permission denied for {_user(os.geteuid())}"
            f"{consequence}; run status as the owner, or ask them to open it to you (chmod -R g+rX for their "
            "group, o+rX for everyone)")


class _PurgeNotice(logging.Filter):
    """Drops TensorBoard's "Detected out of order event.step ... Purging expired events" warning.

    Every resumed run logs again from its checkpoint's step (masan.train.logging opens the
    writer with purge_step), so the reader meets one step going back per resume and warns,
    while doing the right thing: dropping the points logged past that checkpoint. One
    warning per resumed run buries the table; any other message of that logger still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Detected out of order event.step")


_PURGE_NOTICE = _PurgeNotice()


def _rel(root: Path, run: Path) -> str:
    rel = os.path.relpath(run, root)
    return str(root) if rel == "." else rel


def _scalars(run: Path, tags: tuple[str, ...]) -> dict[str, list]:
    """TensorBoard scalar events (wall_time, step, value) of ``tags`` in run/tb; {} if none.
    OSError when an event file cannot be read (its reader logs some read errors and goes on:
    those are raised here from a readability check first)."""
    tb = RunDir(run).tb
    if not tb.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tb_logging

    for event_file in sorted(tb.rglob("*tfevents*")):
        with open(event_file, "rb"):
            pass
    tb_logging.get_logger().addFilter(_PURGE_NOTICE)  # the same object is added once
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: acc.Scalars(t) for t in tags if t in have}


Logged = collections.namedtuple("Logged", "wall_time step value")
"""A logged value: wall time (s since the epoch), optimizer step, value (as TensorBoard's scalars)."""


def _logged(run: Path) -> dict[str, list]:
    """The ``train/epoch`` events (the last logged intervals) and the last ``train/total`` of a run,
    from its ``progress.json`` (:meth:`masan.train.logging.TrainLogger.progress`), or from its
    TensorBoard events for a run trained before that file existed (a file it cannot read raises
    OSError, as :func:`_scalars` does)."""
    try:
        record = json.loads(RunDir(run).progress.read_text())
        return {EPOCH_TAG: [Logged(*e) for e in record["intervals"]], LOSS_TAG: [Logged(*record["loss"])]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, not ours, or another version's
        return _scalars(run, (LOSS_TAG, EPOCH_TAG))


def eta_from_epochs(epoch_events: list, epochs_target: int, max_steps: int | None) -> float | None:
    """Seconds left from the ``train/epoch`` scalar events (wall_time s, step, epochs as a
    fraction): steps left (epochs left / the median epochs per step, capped by max_steps) by
    :func:`masan.train.eta.eta_seconds` over the last :data:`ETA_INTERVALS` logged intervals."""
    recent = epoch_events[-(ETA_INTERVALS + 1):]
    pairs = [(a, b) for a, b in zip(recent, recent[1:]) if b.step > a.step]
    if not pairs:
        return None
    per_step = [(b.wall_time - a.wall_time) / (b.step - a.step) for a, b in pairs]
    gain = statistics.median((b.value - a.value) / (b.step - a.step) for a, b in pairs)
    if gain <= 0:
        return None
    last = epoch_events[-1]
    steps_left = max(0.0, (epochs_target - last.value) / gain)
    if max_steps is not None:
        steps_left = min(steps_left, max(0, max_steps - last.step))
    return eta_seconds(per_step, steps_left)


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping, in file order (``log.flush_secs``)."""
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return out


def cut_short(path: Path, cfg=None) -> str | None:
    """How the config file ``path`` (written whole by masan.config.save_config: every key of
    ``cfg``, ending in a newline) was cut short, or None. A cut file may still parse, and the
    keys it lost take their defaults: a finished run would show another epoch target, phase
    and eta. Without ``cfg`` only the last line is checked (a file that does not parse)."""
    import yaml

    from masan.config import config_to_dict

    text = path.read_text()
    if text and not text.endswith("\n"):
        return f"{path.name} is truncated (its last line is cut off)"
    if cfg is None:
        return None
    have = set(_leaves(yaml.safe_load(text) or {}))
    full = _leaves(config_to_dict(cfg))
    if full and full[-1] not in have:
        lost = [k for k in full if k not in have]
        return f"{path.name} is truncated (it ends before {lost[0]}; {len(lost)} key(s) missing)"
    return None


def _read_config(run: Path, st: RunStatus):
    """The run's config, or None with a note: a config that cannot be trusted would fill the
    row with default values (another epoch target, phase and eta) instead of the run's."""
    from masan.config import ConfigError, load_config

    rd = RunDir(run)
    path = rd.any_config()
    if path is None:
        if rd.checkpoints.is_dir() or rd.done.exists():  # a run that trained: its config was there
            st.add_note(f"{RunDir.CONFIG_NAME} is missing: its variant, epochs, eta and DONE are not shown (the "
                        "phase is its newest checkpoint's); fix: submit again with the --config the run was "
                        f"started with (training rewrites {RunDir.CONFIG_NAME} at its start)")
        return None
    cfg = None
    why = cut_short(path)
    if why is None:
        try:
            cfg = load_config(path)
            why = cut_short(path, cfg)
        except ConfigError as e:
            why = f"{path.name} is invalid ({' '.join(str(e).split())})"  # YAML's errors span lines
    if why is None:
        return cfg
    st.add_note(f"{why}: its variant, epochs, eta and DONE are not shown (the phase is its newest checkpoint's); "
                "fix: submit again with the "
                f"--config the run was started with (training rewrites {RunDir.CONFIG_NAME} at its start)")
    return None


def job_record(run: Path) -> tuple[dict, str | None]:
    """The run's jobs.json (launch.slurm.jobs) and None, or an empty record and what is wrong
    with the file (OSError is left to the caller: unreadable files get one note per run)."""
    try:
        record = jobs.read_record(run)
    except jobs.RecordError as e:
        problem = e.why
    else:
        if isinstance(record, dict) and isinstance(record.get("jobs"), list) \
                and isinstance(record.get("events"), list) \
                and all(isinstance(j, dict) and {"job_id", "kind"} <= j.keys() for j in record["jobs"]) \
                and all(isinstance(e, dict) for e in record["events"]):
            return record, None
        problem = "not the record launch/submit.py writes"
    return {"jobs": [], "events": []}, (
        f"{RunDir.JOBS_NAME} is corrupt ({problem}): the run's jobs, requeues and restarts are not shown; fix: "
        f"look for its job with squeue -u $USER, then move the file aside (a new submission starts a new record)")


def run_status(root: Path, run: Path, queued: dict[str, Queued] | None, now: float | None = None) -> RunStatus:
    """Everything the table shows about one run directory. A source that cannot be read leaves
    its columns unknown and adds a note; the others are still read."""
    from masan.evaluate.report import method_name

    st = RunStatus(run=_rel(root, run), path=str(run))
    denied: list[Path] = []
    cfg = None
    try:
        cfg = _read_config(run, st)
    except PermissionError as e:
        denied.append(Path(e.filename or run))
    if cfg is not None:
        st.variant = method_name(cfg.model)
        st.repeat = cfg.split.repeat
        st.epochs_target = sum(cfg.epochs.values())
    elif repeat_dir := REPEAT_RE.match(run.name):  # submitted, not started: submit.py's layout names the repeat
        st.repeat = int(repeat_dir.group(1))

    done = None
    sources = (lambda: _jobs_columns(run, st, queued), lambda: _checkpoint_columns(run, st, cfg, now),
               lambda: _tb_columns(run, st, cfg, now), lambda: RunDir(run).finished(cfg) if cfg is not None else None)
    for source in sources:
        try:
            done = source() or done
        except PermissionError as e:
            denied.append(Path(e.filename or run))
    if denied:
        st.add_note(_denied(run, denied))
    if done is None and st.slurm == jobs.LOCAL_ENDED and RunDir(run).stopped_record() is None:
        _local_failure(job_record(run)[0], st)  # a finished or stopped run's exit status says nothing more
    if done is None and st.slurm == "COMPLETED":  # SLURM's word for a job that exited 0, also one that stopped
        spent = any(e.get("event") == jobs.REQUEUES_SPENT and e.get("job_id") == st.job_id
                    for e in job_record(run)[0]["events"])
        why = ("its --max-requeues were used up at a time limit or preemption" if spent else
               "it stopped on request (a STOP file) with a checkpoint")
        st.add_note(f"job {st.job_id} ended before the run finished: {why}; submit the same run directory again to "
                    "resume")
    if done is None and not _may_be_live(run, st):
        st.eta_s = None  # a stopped run has no end time to promise: it ends when it is started again
        started = st.step is not None or RunDir(run).lock.exists()  # a start takes the lock after its checks
        stopped = RunDir(run).stopped_record() if st.slurm in (NO_JOB, jobs.LOCAL_ENDED) else None
        if stopped is not None:
            st.add_note(f"stopped on request ({stopped.get('reason')}) at step {stopped['step']}, with a complete "
                        "checkpoint there; run the command that started it again to resume")
        elif st.slurm == NO_JOB and started:  # started by hand: no exit status was recorded
            st.add_note("not running (no process on this host holds its run.lock) and not finished, and it recorded "
                        "no stop: it crashed or was killed; run the command that started it again to resume from its "
                        "newest complete checkpoint")
    if done is not None:
        # the DONE record's whole epochs: the last logged fraction of a run whose epochs do not
        # divide into steps (or that resumed on another rank count) stops short of the target
        st.eta_s = 0.0
        st.epochs_done = done.get("epochs_done", st.epochs_done)
        if ended_early(done, cfg):
            st.phase = "max_steps"
            st.add_note(f"ended at train.max_steps={cfg.train.max_steps} after {st.epochs_done} of "
                        f"{st.epochs_target} epochs: predict and evaluate take it as unfinished; start it "
                        "again with a larger train.max_steps (or none) to finish it")
        else:
            st.done, st.phase = True, "done"
    return st


def _jobs_columns(run: Path, st: RunStatus, queued: dict[str, Queued] | None) -> None:
    record, problem = job_record(run)
    if problem:
        st.add_note(problem)
    if record["jobs"]:
        job = record["jobs"][-1]
        st.job_id, st.slurm = job["job_id"], slurm_state(job, queued)
        waiting = (queued or {}).get(job["job_id"])
        if st.slurm == "PENDING" and waiting is not None and waiting.reason != "None":
            st.reason = waiting.reason
            why = never_starts(waiting.reason)
            if why:
                st.add_note(f"job {st.job_id} can never start as submitted ({waiting.reason}): {why}; "
                            f"scancel {st.job_id} first")
        end = jobs.final_end(record, st.job_id) if st.slurm not in jobs.ACTIVE_STATES else None
        if end is not None:
            st.add_note(f"job {st.job_id} {end[0]}: {end[1]}")
        elif st.slurm in jobs.RESTARTABLE_STATES and job.get("log"):
            logs = ", ".join(map(str, failure_logs(Path(job["log"]).parent, st.job_id)))
            st.add_note(f"job {st.job_id} ended {st.slurm}: see {logs}")
    holder = _local_holder(run)
    if holder is not None:
        # the lock is the truth about a live local run: launch/train_local.py started by hand keeps
        # no job record, and a newer record may be a start that was refused or never began
        st.job_id, st.slurm, st.reason = holder, jobs.LOCAL_RUNNING, None
    # a requeue shows when it is asked for (rank 0's event, while the job waits to start again) or,
    # for one SLURM made itself (preemption, scontrol requeue), when the job starts again
    asked = sum(1 for e in record["events"] if e.get("event") == "requeued")
    started_again = sum(1 for e in record["events"] if e.get("event") == "started" and e.get("restarts", 0) > 0)
    st.requeues = max(asked, started_again)
    st.restarts = sum(1 for e in record["events"] if e.get("event") == "restarted")


def _may_be_live(run: Path, st: RunStatus) -> bool:
    """False when ``run`` is known to be stopped: its last job ended (SLURM's state or a local
    run's exit), or nothing holds its lock on this host, where its last holder ran."""
    if st.slurm == jobs.LOCAL_RUNNING or st.slurm.startswith(jobs.UNKNOWN) or st.slurm in jobs.ACTIVE_STATES:
        return True  # (UNKNOWN: SLURM does not answer here, or no longer knows the job)
    if st.slurm != NO_JOB:
        return False
    return holder_record(RunDir(run).lock).get("host") not in (None, socket.gethostname())


def _local_holder(run: Path) -> str | None:
    """The pid of the local run that holds ``run``'s run.lock on this host (its launcher's when
    it has one; "?" when its record is not written yet), or None: no live holder here, or the
    holder is a rank of a SLURM job (that job's row shows SLURM's state)."""
    path = RunDir(run).lock
    pids = local_holders(path)
    if not pids:
        return None
    record = holder_record(path)
    if record.get("pid") not in pids:
        return "?"  # a start still before its checks: the record names the previous holder
    if record.get("slurm_job"):
        return None
    return str(record.get("launcher_pid") or record["pid"])


def _local_failure(record: dict, st: RunStatus) -> None:
    """A note for a local run that ended unfinished, from the exit status submit.py recorded."""
    if st.slurm != jobs.LOCAL_ENDED:
        return
    code = jobs.local_exit(record, st.job_id)
    host = next((j.get("host") for j in reversed(record["jobs"]) if j["job_id"] == st.job_id), None)
    if code is None and host != socket.gethostname():  # its process can be looked for only there
        st.add_note(f"local run {st.job_id} was started on host {host}: only there can status tell whether it still "
                    "runs")
        return
    if code is None:  # submit.py itself was killed (kill -9, a closed session): no exit status recorded
        st.add_note(f"local run {st.job_id} ended without recording how (the command that started it was killed); "
                    "run that command again to resume from the newest complete checkpoint")
        return
    if code in (0, EXIT_INTERRUPTED):  # done, or stopped (a second Ctrl-C too)
        return
    if code == jobs.EXIT_REFUSED:
        st.add_note(f"local run {st.job_id} was refused (exit {code}: a config, resume or run-directory error at its "
                    "start, or a full or read-only disk later, printed by the command that started it); fix it and "
                    "run that command again")
    elif code == jobs.EXIT_DIVERGED:
        st.add_note(f"local run {st.job_id} diverged (exit {code}; its error, in the output of the command that "
                    "started it, says what to change): resumed, it would diverge again, so train in a new run_dir")
    else:
        st.add_note(f"local run {st.job_id} {jobs.exit_text(code)}: its error is in the output of the command that "
                    "started it; run that command again to resume from the newest complete checkpoint")


def _checkpoint_columns(run: Path, st: RunStatus, cfg, now: float | None) -> None:
    from masan.train.checkpoint import MARKER, CheckpointManager

    ckpt = CheckpointManager(run, keep=1)
    for tag in ckpt.tags():
        marker = ckpt.dir / tag / MARKER
        if marker.exists():
            with open(marker, "rb"):  # an unreadable marker would count as "incomplete": say so instead
                pass
        if ckpt.problem(tag) is None:
            state = ckpt.manifest(tag)["state"]
            st.checkpoint, st.step = tag, state["step"]
            st.phase, st.epochs_done = state["phase"], state["epochs_done"] + _epoch_fraction(run, state, cfg)
            st.checkpoint_age_s = (time.time() if now is None else now) - marker.stat().st_mtime
            break


def _epoch_fraction(run: Path, state: dict, cfg) -> float:
    """The part of its current epoch a checkpoint saved mid-epoch had done (its ``consumed``
    samples of the training part in split.json, :func:`masan.train.eta.epoch_fraction` with the
    samples per step of ``cfg`` and the checkpoint's ranks; 0 when unknown): a stopped run's epoch
    column then stays where the live run's was."""
    consumed = state.get("consumed") or 0
    if not consumed:
        return 0.0
    try:
        train = json.loads(RunDir(run).split.read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    per_step = (cfg.optim.micro_batch * cfg.optim.grad_accum * int(state.get("dp_world_size") or 1)
                if cfg is not None else 1)
    return epoch_fraction(consumed, len(train), per_step)


def _tb_columns(run: Path, st: RunStatus, cfg, now: float | None) -> None:
    events = _logged(run)
    if events.get(LOSS_TAG):
        st.loss = events[LOSS_TAG][-1].value
    if events.get(EPOCH_TAG):
        latest = events[EPOCH_TAG][-1]
        st.logged_age_s = (time.time() if now is None else now) - latest.wall_time
        saved = -1 if st.checkpoint is None else st.step
        # the live position with the fraction of the epoch done; at the checkpoint's own step
        # an epoch-end checkpoint (whole epochs) is ahead of the last logged fraction
        if latest.step > saved or (latest.step == saved and latest.value > st.epochs_done):
            st.step, st.epochs_done = latest.step, latest.value
        if cfg is not None:
            st.eta_s = eta_from_epochs(events[EPOCH_TAG], st.epochs_target, cfg.train.max_steps)
            _stall_note(run, st, cfg, events[EPOCH_TAG])
    if cfg is not None and st.epochs_done is not None:  # the live phase (a checkpoint's may be older)
        st.phase = "pretrain" if st.epochs_done < cfg.epochs["pretrain"] else "joint"


def _stall_note(run: Path, st: RunStatus, cfg, epoch_events: list) -> None:
    """A note for a running job that stopped logging: silent for :data:`STALL_INTERVALS` of its
    recent logging intervals and longer than its collective timeout (plus the writer's flush
    delay). Only once it has logged since its start (the run.lock's record, rewritten by each
    start): before that it may still be loading its data or compiling."""
    if st.slurm not in ("RUNNING", jobs.LOCAL_RUNNING) or len(epoch_events) < 2 or st.logged_age_s is None:
        return
    lock = RunDir(run).lock
    if lock.exists() and epoch_events[-1].wall_time < lock.stat().st_mtime:
        return
    recent = epoch_events[-(ETA_INTERVALS + 1):]
    interval = statistics.median(b.wall_time - a.wall_time for a, b in zip(recent, recent[1:]))
    allowed = max(STALL_INTERVALS * interval, 60 * cfg.train.dist_timeout_minutes) + cfg.log.flush_secs
    if st.logged_age_s <= allowed:
        return
    stop = f"scancel {st.job_id}" if st.slurm == "RUNNING" else f"stop it (kill {st.job_id})"
    st.add_note(f"no step logged for {duration_text(st.logged_age_s)} (it logged every {duration_text(interval)} "
                f"before; newest checkpoint {duration_text(st.checkpoint_age_s)} old): a rank may be stuck outside a "
                f"collective (a hung file system or data read). If its log shows no progress either, {stop} and "
                "submit the same run directory again to resume from its newest complete checkpoint")


def _row_for_error(root: Path, run: Path, err: Exception) -> RunStatus:
    """The row of a run (or unreadable folder) status could not read at all."""
    st = RunStatus(run=_rel(root, run), path=str(run))
    if isinstance(err, PermissionError):
        st.add_note(_denied(run, [Path(err.filename or run)], ", so it may hold runs not listed here"))
    else:
        st.add_note(f"could not be read ({type(err).__name__}: {err}); the other runs are unaffected")
    return st


def collect(paths: list[str | os.PathLike]) -> list[RunStatus]:
    """Status of every run under ``paths`` (one squeue call for all of them, none when no run has
    a SLURM job: a squeue without a controller takes seconds to give up)."""
    found = find_runs(paths)

    def slurm_job(run: Path) -> bool:
        try:
            return any(j["kind"] == "slurm" for j in job_record(run)[0]["jobs"])
        except OSError:
            return False

    queued = squeue_states() if any(slurm_job(run) for _, run, err in found if err is None) else None
    rows = []
    for root, run, err in found:
        if err is None:
            try:
                rows.append(run_status(root, run, queued))
                continue
            except Exception as e:  # noqa: BLE001 - one run's unforeseen damage must not hide the others
                err = e
        rows.append(_row_for_error(root, run, err))
    return rows
