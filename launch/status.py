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
show RUNNING (local) while a process holds their run.lock, whatever jobs.json says), phase,
epoch (done / target over both phases, one decimal, rounded down), step (newest logged or
saved), checkpoint (newest complete one) and its age, requeues (starts after a requeue: time
limit, preemption or by hand) and restarts (resubmissions after a crash, or local runs that
launch/submit.py started again, jobs.json), loss (last logged train/total), eta (steps left x
the median seconds per step of the last logged intervals; ``+wait`` while the job is pending:
its time in the queue comes on top) and done (DONE for this config's target). A running job
that has logged no step for many of its logging intervals, and for longer than its collective
timeout, gets a note: a rank may be stuck.

Sources, all in the run directory, read with the project's own readers: config.yaml
(masan.config), checkpoints/*/COMPLETE (masan.train.checkpoint), DONE (masan.rundir),
jobs.json (launch.slurm.jobs), tb/ (TensorBoard's event reader). Works without SLURM.

A pending job shows SLURM's reason (squeue's %r), e.g. ``PENDING (123, Priority)``; one that
can never start as submitted (``PartitionNodeLimit``, ``PartitionTimeLimit``, ...) also gets a
note with the fix. A job that ended FAILED (or NODE_FAIL, TIMEOUT, ...) gets a note naming the
task logs that hold a traceback (with a frozen node: the ranks that waited for it); a local run
of launch/submit.py that crashed or was refused gets one with its exit status. A run
that cannot be read whole (a file or folder this user may not read, a corrupt jobs.json, a
truncated or invalid config.yaml) is still one row, with what could be read and a note below
the table naming the file and the problem; the other runs are unaffected.
Exit status: 0, or 2 when no run directory was found under the paths given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from launch.run_status import RunStatus, collect
from masan.access import reports_denied
from masan.train.eta import duration_text

COLUMNS = ("run", "variant", "repeat", "slurm", "phase", "epoch", "step", "checkpoint", "age", "requeues",
           "restarts", "loss", "eta", "done")


def epochs_text(epochs: float) -> str:
    """Epochs done with one decimal, rounded down: a run stopped 31.57 epochs in shows 31.5, and
    no unfinished run shows its target (2.96 of 3 would round to 3.0)."""
    return f"{math.floor(epochs * 10 + 1e-9) / 10:.1f}"  # the epsilon: 0.3 stored as 0.29999...


def row_cells(st: RunStatus) -> list[str]:
    """The table's cells of one run, in :data:`COLUMNS` order."""
    epoch = "-" if st.epochs_done is None and st.epochs_target is None else \
        f"{'-' if st.epochs_done is None else epochs_text(st.epochs_done)}/{st.epochs_target or '?'}"
    slurm = st.slurm if st.job_id is None or "local" in st.slurm else \
        f"{st.slurm} ({st.job_id}{'' if st.reason is None else f', {st.reason}'})"
    return [st.run, st.variant, "-" if st.repeat is None else str(st.repeat), slurm, st.phase or "-", epoch,
            "-" if st.step is None else str(st.step), st.checkpoint or "-", duration_text(st.checkpoint_age_s),
            str(st.requeues), str(st.restarts), "-" if st.loss is None else f"{st.loss:.4g}",
            eta_text(st), "DONE" if st.done else "-"]


def eta_text(st: RunStatus) -> str:
    """The eta cell: a pending job's time in the queue is not known, so its eta is the training
    left once it starts (``2h05m+wait``)."""
    text = duration_text(st.eta_s)
    return f"{text}+wait" if st.eta_s and st.slurm == "PENDING" else text


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


@reports_denied("status")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        print(f"status: --watch {args.watch}: give the seconds between refreshes, above 0", file=sys.stderr)
        return 2
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        what = "; ".join(f"{d} {'is a file' if Path(d).exists() else 'not found'}" for d in missing)
        print(f"status: {what}; give run directories (or folders holding them), e.g. the "
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
