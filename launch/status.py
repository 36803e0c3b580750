#!/usr/bin/env python
"""Every training run under the given directories at a glance, one line each.

    python launch/status.py runs/table2                 # a Table-2 sweep: variants x repeats
    python launch/status.py runs/a runs/b --watch 30    # refresh every 30 s (Ctrl-C ends)
    python launch/submit.py --status runs/table2        # the same

Columns: run (relative to the directory given: launch/submit.py's layout names the ablation
and repeat, e.g. model.fusion-add/repeat_3), variant (the method, from the run's config),
repeat (split.repeat), slurm (state of
the run's newest job: squeue while queued or running, then ``scontrol show job``, then the
result file submitit writes when a job ends; never sacct, which many clusters lack; local runs
show RUNNING (local) while their process lives), phase, epoch (finished / target over both
phases), step (newest logged or saved), checkpoint (newest complete one) and its age,
requeues (starts after a requeue: time limit, preemption or by hand) and restarts
(resubmissions after a crash, jobs.json), loss (last logged train/total), eta (steps left x
the median seconds per step of the last logged intervals) and done (DONE for this config's
target).

Sources, all in the run directory, read with the project's own readers: config.yaml
(masan.config), checkpoints/*/COMPLETE (masan.train.checkpoint), DONE (masan.rundir),
jobs.json (launch.slurm.jobs), tb/ (TensorBoard's event reader). Works without SLURM.

A pending job shows SLURM's reason (squeue's %r), e.g. ``PENDING (123, Priority)``; one that
can never start as submitted (``PartitionNodeLimit``, ``PartitionTimeLimit``, ...) also gets a
note with the fix. A run that cannot be read whole (a file or folder this user may not read, a
corrupt jobs.json, a truncated or invalid config.yaml) is still one row, with what could be
read and a note below the table naming the file and the problem; the other runs are unaffected.
Exit status: 0, or 2 when no run directory was found under the paths given.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import os
import pickle
import pwd
import re
import shutil
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from launch.slurm import jobs
from masan.rundir import RunDir

RUN_MARKERS = (RunDir.CONFIG_NAME, RunDir.SUBMITTED_CONFIG_NAME, RunDir.JOBS_NAME, RunDir.CHECKPOINTS_NAME)
"""Any of these marks a run directory (a SLURM run has only jobs.json until its job starts)."""
REPEAT_RE = re.compile(r"^repeat_(\d+)$")
ETA_INTERVALS = 10
"""Logged intervals whose median step time gives the ETA (recent speed, robust to a restart gap)."""
LOSS_TAG, EPOCH_TAG = "train/total", "train/epoch"
SQUEUE_TIMEOUT_S = 30
COLUMNS = ("run", "variant", "repeat", "slurm", "phase", "epoch", "step", "checkpoint", "age", "requeues",
           "restarts", "loss", "eta", "done")


@dataclass
class RunStatus:
    """One row of the table (None: not known yet). Times in seconds."""

    run: str
    path: str
    variant: str = "?"
    repeat: int | None = None
    slurm: str = "-"
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
    done: bool = False
    reason: str | None = None
    """SLURM's reason a pending job waits (squeue %r), None when not pending."""
    note: str = ""

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


# ====================================================================== finding runs


def find_runs(paths: list[str | os.PathLike]) -> list[tuple[Path, Path, OSError | None]]:
    """(root given, run directory, None) for every run directory at or below each path, sorted;
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
    return sorted(((root, run, err) for run, (root, err) in found.items()), key=lambda r: str(r[1]))


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


# ====================================================================== SLURM without sacct


class Queued(NamedTuple):
    """A job as squeue lists it: its state and SLURM's reason (``None`` when it has none)."""

    state: str
    reason: str = "None"


NEVER_STARTS = {
    "PartitionNodeLimit": "it asks for more nodes than the partition has or allows; submit again with fewer --nodes "
                          "(sinfo -o '%P %D %s' shows each partition's nodes and per-job limit)",
    "PartitionTimeLimit": "its time limit is above the partition's; submit again with a shorter --time "
                          "(sinfo -o '%P %l' shows each partition's limit)",
    "BadConstraints": "no node of the partition has what it asks for (--constraint, --gpus-per-node, --mem); "
                      "submit again with what its nodes have (sinfo -o '%P %G %m %f')",
}
"""Pending reasons that the job itself causes: it waits forever as submitted (SLURM does not
refuse such a job unless the cluster sets EnforcePartLimits)."""


def never_starts(reason: str | None) -> str | None:
    """Why a job pending for ``reason`` can never start, with the fix; None for a wait that ends
    (Priority, Resources, a node coming back ...)."""
    if reason is None:
        return None
    if reason in NEVER_STARTS:
        return NEVER_STARTS[reason]
    if "PerJob" in reason:  # QOSMaxNodePerJobLimit, AssocMaxWallDurationPerJobLimit, ...
        return ("it exceeds a per-job limit of its QOS or account; submit again within the limit "
                "(sacctmgr show qos / show assoc list them)")
    return None


def squeue_states() -> dict[str, Queued] | None:
    """Job id (array tasks as ``123_4``) -> state and reason of every job squeue lists; None when
    there is no squeue or the controller does not answer (then scontrol would not either)."""
    if shutil.which("squeue") is None:
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True,
                             timeout=SQUEUE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    out = {}
    for line in res.stdout.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if state.strip():
            out[jid.strip()] = Queued(state.strip().split()[0], reason.strip() or "None")
    return out


class _Opaque:
    """Stands in for every class in a submitit result pickle: only its tag is read, so nothing
    is imported (a success holds masan's TrainOutcome, whose module loads torch) or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _TagOnly(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: ARG002 - pickle.Unpickler.find_class signature
        return _Opaque


def submitit_result(log: str | None) -> str | None:
    """COMPLETED or FAILED from the ``<job>_0_result.pkl`` submitit writes beside the job's
    ``<job>_0_log.out`` when the job's function returned or raised; None when there is none."""
    if not log or not log.endswith("_log.out"):
        return None
    path = Path(log[: -len("_log.out")] + "_result.pkl")
    try:
        with open(path, "rb") as f:
            tag = _TagOnly(f).load()[0]
    except (OSError, pickle.UnpicklingError, EOFError, IndexError, TypeError, KeyError):
        return None
    return {"success": "COMPLETED", "error": "FAILED"}.get(tag)


def slurm_state(job: dict, queued: dict[str, Queued] | None) -> str:
    """State of one jobs.json job: squeue (``queued``, None: SLURM does not answer), then
    scontrol (finished jobs stay there MinJobAge seconds), then submitit's result file; local
    runs by their process."""
    if job["kind"] == "local":
        # the same liveness test submit.py's refusal uses (its pid on this host)
        return "RUNNING (local)" if jobs._local_alive(job) else "ended (local)"
    jid = job["job_id"]
    if queued is not None and jid in queued:
        return queued[jid].state
    state = jobs.job_field(jid, "JobState") if queued is not None else None
    return state or submitit_result(job.get("log")) or (jobs.UNKNOWN if queued is not None else "UNKNOWN (no SLURM)")


# ====================================================================== one run


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


def eta_seconds(epoch_events: list, epochs_target: int, max_steps: int | None) -> float | None:
    """Seconds left from the ``train/epoch`` scalar events (wall_time s, step, epochs as a
    fraction): steps left (epochs left / epochs per step, capped by max_steps) times the median
    seconds per step of the last :data:`ETA_INTERVALS` logged intervals."""
    recent = epoch_events[-(ETA_INTERVALS + 1):]
    if len(recent) < 2:
        return None
    per_step = [(b.wall_time - a.wall_time) / (b.step - a.step) for a, b in zip(recent, recent[1:]) if b.step > a.step]
    gain = [(b.value - a.value) / (b.step - a.step) for a, b in zip(recent, recent[1:]) if b.step > a.step]
    if not per_step or statistics.median(gain) <= 0:
        return None
    last = epoch_events[-1]
    steps_left = max(0.0, (epochs_target - last.value) / statistics.median(gain))
    if max_steps is not None:
        steps_left = min(steps_left, max(0, max_steps - last.step))
    return steps_left * statistics.median(per_step)


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

    path = RunDir(run).any_config()
    if path is None:
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
    st.add_note(f"{why}: its variant, epochs, phase, eta and DONE are not shown; fix: submit again with the "
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
    sources = (lambda: _jobs_columns(run, st, queued), lambda: _checkpoint_columns(run, st, now),
               lambda: _tb_columns(run, st, cfg), lambda: RunDir(run).finished(cfg) if cfg is not None else None)
    for source in sources:
        try:
            done = source() or done
        except PermissionError as e:
            denied.append(Path(e.filename or run))
    if denied:
        st.add_note(_denied(run, denied))
    if done is not None:
        # the DONE record's whole epochs: the last logged fraction of a run whose epochs do not
        # divide into steps (or that resumed on another rank count) stops short of the target
        st.done, st.eta_s, st.phase = True, 0.0, "done"
        st.epochs_done = done.get("epochs_done", st.epochs_done)
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
    st.requeues = sum(1 for e in record["events"] if e.get("event") == "started" and e.get("restarts", 0) > 0)
    st.restarts = sum(1 for e in record["events"] if e.get("event") == "restarted")


def _checkpoint_columns(run: Path, st: RunStatus, now: float | None) -> None:
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
            st.phase, st.epochs_done = state["phase"], state["epochs_done"]
            st.checkpoint_age_s = (time.time() if now is None else now) - marker.stat().st_mtime
            break


def _tb_columns(run: Path, st: RunStatus, cfg) -> None:
    events = _scalars(run, (LOSS_TAG, EPOCH_TAG))
    if events.get(LOSS_TAG):
        st.loss = events[LOSS_TAG][-1].value
    if events.get(EPOCH_TAG):
        latest = events[EPOCH_TAG][-1]
        saved = -1 if st.checkpoint is None else st.step
        # the live position with the fraction of the epoch done; at the checkpoint's own step
        # an epoch-end checkpoint (whole epochs) is ahead of the last logged fraction
        if latest.step > saved or (latest.step == saved and latest.value > st.epochs_done):
            st.step, st.epochs_done = latest.step, latest.value
        if cfg is not None:
            st.eta_s = eta_seconds(events[EPOCH_TAG], st.epochs_target, cfg.train.max_steps)
    if cfg is not None and st.epochs_done is not None:  # the live phase (a checkpoint's may be older)
        st.phase = "pretrain" if st.epochs_done < cfg.epochs["pretrain"] else "joint"


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


# ====================================================================== the table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def row_cells(st: RunStatus) -> list[str]:
    """The table's cells of one run, in :data:`COLUMNS` order."""
    epoch = "-" if st.epochs_done is None and st.epochs_target is None else \
        f"{'-' if st.epochs_done is None else f'{st.epochs_done:.4g}'}/{st.epochs_target or '?'}"
    slurm = st.slurm if st.job_id is None or "local" in st.slurm else \
        f"{st.slurm} ({st.job_id}{'' if st.reason is None else f', {st.reason}'})"
    return [st.run, st.variant, "-" if st.repeat is None else str(st.repeat), slurm, st.phase or "-", epoch,
            "-" if st.step is None else str(st.step), st.checkpoint or "-", _duration(st.checkpoint_age_s),
            str(st.requeues), str(st.restarts), "-" if st.loss is None else f"{st.loss:.4g}",
            _duration(st.eta_s), "DONE" if st.done else "-"]


def format_table(rows: list[RunStatus]) -> str:
    """Aligned text table with a header line; notes (what could not be read, jobs that can never
    start) below it."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines += [f"note {r.run}: {r.note}" for r in rows if r.note]
    done = sum(r.done for r in rows)
    noted = sum(bool(r.note) for r in rows)
    lines.append(f"{len(rows)} runs, {done} done" + (f", {noted} with a note" if noted else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/status.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or folders holding them")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON list of the runs instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        print(f"status: --watch {args.watch}: give the seconds between refreshes, above 0", file=sys.stderr)
        return 2
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        print(f"status: {missing} not found; give run directories (or folders holding them), e.g. the "
              "--run-dir of launch/submit.py", file=sys.stderr)
        return 2
    try:
        while True:
            rows = collect(args.run_dirs)
            if not rows:
                print(f"status: no run directory (a folder with config.yaml, jobs.json or checkpoints/) under "
                      f"{args.run_dirs}", file=sys.stderr)
                return 2
            if args.json:
                text = json.dumps([asdict(r) for r in rows], indent=1)
            else:
                text = format_table(rows)
            if args.watch is None:
                print(text)
                return 0
            clear = "\033[2J\033[H" if sys.stdout.isatty() else ""
            print(f"{clear}{datetime.datetime.now():%H:%M:%S}  (every {args.watch:g} s, Ctrl-C ends)\n{text}",
                  flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
