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
Exit status: 0, or 2 when no run directory was found under the paths given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    note: str = ""


# ====================================================================== finding runs


def find_runs(paths: list[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(root given, run directory) for every run directory at or below each path, sorted;
    nothing is searched inside a run directory (its checkpoints, tb, slurm folders)."""
    found: dict[Path, Path] = {}
    for root in map(Path, paths):
        for folder, dirs, _ in os.walk(root):
            here = Path(folder)
            if any((here / m).exists() for m in RUN_MARKERS):
                found.setdefault(here, root)
                dirs.clear()
            dirs.sort()
    return sorted(((root, run) for run, root in found.items()), key=lambda rr: str(rr[1]))


# ====================================================================== SLURM without sacct


def squeue_states() -> dict[str, str] | None:
    """Job id (array tasks as ``123_4``) -> state of every job squeue lists; None when there is
    no squeue or the controller does not answer (then scontrol would not either)."""
    if shutil.which("squeue") is None:
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=SQUEUE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    out = {}
    for line in res.stdout.splitlines():
        jid, _, state = line.partition("|")
        if state.strip():
            out[jid.strip()] = state.strip().split()[0]
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


def slurm_state(job: dict, queued: dict[str, str] | None) -> str:
    """State of one jobs.json job: squeue (``queued``, None: SLURM does not answer), then
    scontrol (finished jobs stay there MinJobAge seconds), then submitit's result file; local
    runs by their process."""
    if job["kind"] == "local":
        # the same liveness test submit.py's refusal uses (its pid on this host)
        return "RUNNING (local)" if jobs._local_alive(job) else "ended (local)"
    jid = job["job_id"]
    if queued is not None and jid in queued:
        return queued[jid]
    state = jobs.job_field(jid, "JobState") if queued is not None else None
    return state or submitit_result(job.get("log")) or (jobs.UNKNOWN if queued is not None else "UNKNOWN (no SLURM)")


# ====================================================================== one run


def _rel(root: Path, run: Path) -> str:
    rel = os.path.relpath(run, root)
    return str(root) if rel == "." else rel


def _scalars(run: Path, tags: tuple[str, ...]) -> dict[str, list]:
    """TensorBoard scalar events (wall_time, step, value) of ``tags`` in run/tb; {} if none."""
    tb = RunDir(run).tb
    if not tb.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def run_status(root: Path, run: Path, queued: dict[str, str] | None, now: float | None = None) -> RunStatus:
    """Everything the table shows about one run directory."""
    from masan.config import ConfigError, load_config
    from masan.evaluate.report import method_name
    from masan.train.checkpoint import MARKER, CheckpointManager

    now = time.time() if now is None else now
    st = RunStatus(run=_rel(root, run), path=str(run))
    repeat_dir = REPEAT_RE.match(run.name)
    cfg = None
    config = RunDir(run).any_config()
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as e:
            st.note = f"unreadable {config.name}: {e}"
    if cfg is not None:
        st.variant = method_name(cfg.model)
        st.repeat = cfg.split.repeat
        st.epochs_target = sum(cfg.epochs.values())
        st.done = RunDir(run).finished(cfg) is not None
    elif repeat_dir:  # submitted, not started: submit.py's layout names the repeat
        st.repeat = int(repeat_dir.group(1))

    record = jobs.read_record(run)
    if record["jobs"]:
        job = record["jobs"][-1]
        st.job_id, st.slurm = job["job_id"], slurm_state(job, queued)
    st.requeues = sum(1 for e in record["events"] if e["event"] == "started" and e.get("restarts", 0) > 0)
    st.restarts = sum(1 for e in record["events"] if e["event"] == "restarted")

    ckpt = CheckpointManager(run, keep=1)
    complete = ckpt.complete_tags()
    saved_step = -1
    if complete:
        state = ckpt.manifest(complete[0])["state"]
        st.checkpoint, st.step = complete[0], state["step"]
        st.phase, st.epochs_done = state["phase"], state["epochs_done"]
        st.checkpoint_age_s = now - (ckpt.dir / complete[0] / MARKER).stat().st_mtime
        saved_step = st.step
    events = _scalars(run, (LOSS_TAG, EPOCH_TAG))
    if events.get(LOSS_TAG):
        st.loss = events[LOSS_TAG][-1].value
    if events.get(EPOCH_TAG):
        latest = events[EPOCH_TAG][-1]
        if latest.step >= saved_step:  # the live position, with the fraction of the epoch done
            st.step, st.epochs_done = latest.step, latest.value
        if cfg is not None and not st.done:
            st.eta_s = eta_seconds(events[EPOCH_TAG], st.epochs_target, cfg.train.max_steps)
    if cfg is not None and st.epochs_done is not None:  # the live phase (a checkpoint's may be older)
        st.phase = "pretrain" if st.epochs_done < cfg.epochs["pretrain"] else "joint"
    if st.done:
        st.eta_s, st.phase = 0.0, "done"
    return st


def collect(paths: list[str | os.PathLike]) -> list[RunStatus]:
    """Status of every run under ``paths`` (one squeue call for all of them, none when no run has
    a SLURM job: a squeue without a controller takes seconds to give up)."""
    found = find_runs(paths)
    slurm = any(j["kind"] == "slurm" for _, run in found for j in jobs.read_record(run)["jobs"])
    queued = squeue_states() if slurm else None
    return [run_status(root, run, queued) for root, run in found]


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
    slurm = st.slurm if st.job_id is None or "local" in st.slurm else f"{st.slurm} ({st.job_id})"
    return [st.run, st.variant, "-" if st.repeat is None else str(st.repeat), slurm, st.phase or "-", epoch,
            "-" if st.step is None else str(st.step), st.checkpoint or "-", _duration(st.checkpoint_age_s),
            str(st.requeues), str(st.restarts), "-" if st.loss is None else f"{st.loss:.4g}",
            _duration(st.eta_s), "DONE" if st.done else "-"]


def format_table(rows: list[RunStatus]) -> str:
    """Aligned text table with a header line; notes (unreadable configs) below it."""
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines += [f"note {r.run}: {r.note}" for r in rows if r.note]
    done = sum(r.done for r in rows)
    lines.append(f"{len(rows)} runs, {done} done")
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
