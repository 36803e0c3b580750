#!/usr/bin/env python
"""Submit MASAN training to SLURM (submitit + DeepSpeed), or run it here without SLURM.

    python launch/submit.py --nodes 4 --gpus-per-node 8 --time 24:00:00 \\
        --config hpc/configs/paper.yaml --run-dir runs/masan optim.lr=3e-4

One rank per GPU of each node (one per node on CPU nodes). Each rank resumes from the newest
complete checkpoint of its run directory, so submitting the same --run-dir again continues a
run instead of starting over (a second submission while a job of that run directory is still
pending or running is refused; see run_dir/jobs.json).

Time limits and preemption: SLURM sends USR2 --signal-delay seconds before the limit; every
rank stops at the next step, a complete checkpoint is saved, and the job requeues itself (at
most --max-requeues times). With --wait, this command follows the job(s) to the end and
resubmits a job that crashed (FAILED, NODE_FAIL, OUT_OF_MEMORY, TIMEOUT...) up to
--max-restarts times. A run refused at its start (a config value its cohort cannot serve, a
checkpoint written with another config, a run directory it cannot write) is never
resubmitted: the job's rank 0 records the reason in run_dir/jobs.json (event "refused"),
--wait prints it and exits 2, as it does for bad arguments (--nodes 0, ...). Nor is a run whose
training diverged (a non-finite loss or gradient norm; event "diverged"): resumed, it would
diverge again.

Where sbatch exists but the SLURM controller does not answer, nothing is started (exit 1; pass
--local to train here). What the job would refuse at its start (the store, its classes, the
split, the batch, the checkpoint against the config) is refused here before submitting, and a
job sbatch refuses is reported in one line (exit 2).

The run directory is --run-dir, else a run_dir=... override, else the --config file's run_dir
(as launch/train_local.py takes it), else runs/masan.

Before submitting, the request is checked against the partition (sinfo: its nodes, GPUs per
node, time limit and job size limit): a job that could never start (SLURM would accept it and
keep it PENDING forever, reason PartitionNodeLimit or PartitionTimeLimit) is refused with exit
2 and the fix; one that must wait for down or drained nodes to come back is submitted with a
warning. launch/status.py shows a pending job's reason.

--repeats N and --ablation key=value submit one job array with one run directory per
(variant, repeat): run_dir/repeat_R or run_dir/<variant>/repeat_R (variant "baseline" plus
one per --ablation, which may hold several overrides: "model.arch=hfcn data.use_fmri=false");
repeat R uses split.repeat=R.

Without SLURM (no sbatch on PATH) or with --local, the
same runs train on this machine, one after the other, with nodes x gpus-per-node gloo ranks
each (at least one), and die with this command. SIGTERM or SIGHUP (a closed terminal) stops
the run in progress as Ctrl-C does (a checkpoint, then exit 128 + the signal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from launch.local_runs import run_locally
from launch.slurm import jobs
from launch.slurm.partition import check_partition
from launch.slurm.plan import DEFAULT_RUN_DIR, Resources, RunSpec, base_run_dir, plan_runs, slurm_time, time_text
from launch.slurm.submission import SubmitError, failure_logs, log_path, submit_slurm
from masan.access import creation_umask, reports_denied, restrictive_mode
from masan.argtypes import number, str_path
from masan.config import ConfigError, add_override_arguments
from masan.rundir import RunDir

EXIT_REFUSED, EXIT_FAILED = jobs.EXIT_REFUSED, jobs.EXIT_FAILED
UNKNOWN_GRACE_POLLS = 3  # polls a job may be unknown to squeue/scontrol/sacct before it counts as gone


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--config", type=str_path, help="YAML run config (see hpc/configs/); default: the run directory's "
                   "config.yaml when resuming, else the built-in defaults")
    g.add_argument("--run-dir", type=str_path,
                   help="run directory (default: a run_dir=... override, else the --config file's "
                        f"run_dir, else {DEFAULT_RUN_DIR})")
    add_override_arguments(g, "config overrides, e.g. optim.lr=3e-4 model.fusion=add")
    g.add_argument("--repeats", type=number(int, 1), default=1,
                   help="repeats (different splits) per variant (default: %(default)s)")
    g.add_argument("--ablation", action="append", default=[], metavar="KEY=VALUE",
                   help="one ablation variant (repeatable): one override, or several in one quoted argument "
                        "(\"model.arch=hfcn data.use_fmri=false\"); submitted with the baseline as one array")
    g.add_argument("--no-baseline", action="store_true", help="with --ablation: leave out the baseline")
    base = Resources()  # the SLURM defaults live in one place: the dataclass
    r = p.add_argument_group("SLURM resources")
    r.add_argument("--nodes", type=number(int, 1), default=base.nodes, help="nodes per job (default: %(default)s)")
    r.add_argument("--gpus-per-node", type=number(int, 0), default=None,
                   help="GPUs (= ranks) per node; default: the GPUs the partition's nodes have (sinfo), "
                   "0 on CPU nodes (then one rank per node)")
    r.add_argument("--cpus-per-task", type=number(int, 1), default=None, help="CPU cores per rank (data workers + 1)")
    r.add_argument("--mem", default=None, help="memory per node, SLURM syntax (e.g. 64G)")
    r.add_argument("--time", dest="time_min", type=slurm_time, default=base.time_min, metavar="TIME",
                   help=f"time limit per job, SLURM syntax (default: {time_text(base.time_min)})")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--qos")
    r.add_argument("--constraint")
    r.add_argument("--exclude", help="nodes to avoid, e.g. node[3-4]")
    r.add_argument("--job-name", default=base.job_name, help="SLURM job name (default: %(default)s)")
    f = p.add_argument_group("time limits, preemption, crashes")
    f.add_argument("--signal-delay", dest="signal_delay_s", type=number(int, 0), default=base.signal_delay_s,
                   help="seconds before the time limit at which SLURM sends USR2 (default: %(default)s); "
                   "must cover one training step plus a checkpoint save")
    f.add_argument("--max-requeues", type=number(int, 0), default=10,
                   help="requeues per job after USR2 (time limit or preemption) (default: %(default)s)")
    f.add_argument("--max-restarts", type=number(int, 0), default=1,
                   help="resubmissions of a crashed job per run, with --wait or --local (default: %(default)s)")
    m = p.add_argument_group("mode")
    m.add_argument("--local", action="store_true", help="train on this machine even if SLURM is available")
    m.add_argument("--dry-run", action="store_true",
                   help="run every check a submission makes (the runs' starts, the partition) and print what would "
                        "be trained where, then stop: nothing is written or submitted")
    m.add_argument("--wait", action="store_true", help="follow the job(s) until they end; exit 0 if all runs finished")
    m.add_argument("--poll", type=number(float, above=0), default=10.0,
                   help="seconds between state checks with --wait (default: %(default)s)")
    m.add_argument("--status", nargs="+", metavar="RUN_DIR",
                   help="only print the table of every run under these directories (launch/status.py) and exit")
    return p


# --------------------------------------------------------------------------- SLURM


def watch(pending: dict[str, RunSpec], res: Resources, folder: Path, args) -> int:
    """Follow jobs to their end, resubmitting crashed ones; 0 when every run is DONE."""
    restarts = {str(s.run_dir): 0 for s in pending.values()}
    last: dict[str, str] = {}
    unknown: dict[str, int] = {}
    failed: list[str] = []
    refused: list[str] = []
    while pending:
        time.sleep(args.poll)
        for jid, spec in list(pending.items()):
            state = jobs.job_state(jid)
            if state != last.get(jid):
                print(f"  job {jid}: {state}  ({spec.run_dir})", flush=True)
                last[jid] = state
            if state in jobs.ACTIVE_STATES:
                continue
            if state == jobs.UNKNOWN and unknown.setdefault(jid, 0) < UNKNOWN_GRACE_POLLS:
                unknown[jid] += 1  # a slow or restarting controller: ask again before concluding
                continue
            del pending[jid]
            if spec.done() is not None:
                print(f"  run finished: {spec.run_dir}", flush=True)
                continue
            key = str(spec.run_dir)
            end = jobs.final_end(jobs.read_record(spec.run_dir), jid)
            if end is not None:  # a config or resume error, or a divergence: the same job would meet it again
                event, why = end
                print(f"  run {event.upper()}: {spec.run_dir} (job {jid}, not resubmitted): {why}", flush=True)
                (refused if event == jobs.REFUSED else failed).append(key)
                continue
            logs = ", ".join(map(str, failure_logs(folder, jid)))
            if state in jobs.RESTARTABLE_STATES and restarts[key] < args.max_restarts:
                restarts[key] += 1
                try:
                    (new_id,) = submit_slurm([spec], res, folder, args.max_requeues)
                except SubmitError as e:
                    print(f"  run NOT finished: {spec.run_dir} (job {jid} ended {state}, see {logs}; sbatch refused "
                          f"its resubmission: {e}; submit again to resume)", flush=True)
                    failed.append(key)
                    continue
                jobs.record_restart(spec.run_dir, new_id, after=jid, restart=restarts[key], state=state)
                print(f"  job {jid} ended {state} (see {logs}): resubmitted as job {new_id} "
                      f"(restart {restarts[key]}/{args.max_restarts}); log {log_path(folder, new_id)}", flush=True)
                pending[new_id] = spec
                continue
            print(f"  run NOT finished: {spec.run_dir} (job {jid} ended {state}; "
                  f"see {logs}; submit again to resume)", flush=True)
            failed.append(key)
    return EXIT_REFUSED if refused and not failed else EXIT_FAILED if failed else 0


# --------------------------------------------------------------------------- main


def _resources(args, local: bool) -> Resources:
    """The job's resources; ``--gpus-per-node`` omitted: the partition's GPUs (none locally)."""
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = jobs.detect_gpus_per_node(args.partition) if not local else 0
    return Resources.from_args(args, gpus_per_node=gpus)


def _refused_before_submitting(todo: list[RunSpec], res: Resources, local: bool) -> int | None:
    """EXIT_REFUSED (with the reasons) when a run's start would refuse it, or the job could
    never start on the partition; None when it may go (a wait for down nodes is warned about)."""
    for spec in todo:  # what the job would refuse at its start, refused before it waits in the queue
        why = _start_refusal(spec, res, local)
        if why:
            print(f"refused: {spec.run_dir}: {why}; nothing was submitted", file=sys.stderr)
            return EXIT_REFUSED
    if local:
        return None
    never, waits = check_partition(res)
    if never:
        print("refused: the job could never start on this cluster; nothing was submitted:", file=sys.stderr)
        for why in never:
            print(f"  {why}", file=sys.stderr)
        return EXIT_REFUSED
    for why in waits:
        print(f"warning: {why}", file=sys.stderr, flush=True)
    return None


def _print_plan(todo: list[RunSpec], res: Resources, local: bool) -> None:
    """--dry-run: what would be trained where, after every check a submission makes."""
    where = (f"train here, one run after the other, {res.world_size} rank(s) each (launch/train_local.py)" if local
             else f"submit {'one job' if len(todo) == 1 else f'one array of {len(todo)} jobs'} to SLURM: "
                  + ", ".join(f"{k}={v}" for k, v in res.executor_parameters().items()))
    print(f"dry run: the checks passed; nothing was written or submitted. It would {where}:")
    for spec in todo:
        cfg = spec.cfg
        print(f"  {spec.run_dir}: {spec.variant}, split.repeat={cfg.split.repeat}, "
              f"{sum(cfg.epochs.values())} epochs, data.store={cfg.data.store}")


def _start_refusal(spec: RunSpec, res: Resources, local: bool) -> str | None:
    """Why the job of ``spec`` would refuse to start (:func:`masan.train.run.check_start`), or
    None. Its device: the config's, else a SLURM job's GPUs or none (a local run's device is
    this machine's, which its own start checks)."""
    from masan.train.run import USER_ERRORS, check_start

    device = spec.cfg.train.device
    if device == "auto":
        device = None if local else "cuda" if res.gpus_per_node else "cpu"
    try:
        check_start(spec.cfg, res.world_size, device)
    except USER_ERRORS as e:
        return str(e)
    return None


def _busy(specs: list[RunSpec]) -> bool:
    """True (with a line each) when a run directory of ``specs`` still has a live job."""
    busy = [(s, jobs.active_jobs(s.run_dir)) for s in specs]
    busy = [(s, a) for s, a in busy if a]
    for s, active in busy:
        listing = ", ".join(f"{jid} {state}" for jid, state in active)
        print(f"refused: {s.run_dir} already has a live job ({listing}); wait for it to end, "
              f"or cancel it (scancel JOBID) and submit again to resume", file=sys.stderr)
    return bool(busy)


def _select(specs: list[RunSpec]) -> list[RunSpec] | None:
    """Drop finished runs; None (refuse) if a run directory still has a live job."""
    if _busy(specs):
        return None
    todo = []
    for s in specs:
        done = s.done()
        if done is not None:
            print(f"already finished (DONE at step {done['step']}): {s.run_dir}; nothing to do for it")
        else:
            todo.append(s)
    return todo


@reports_denied("submit")
def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except jobs.RecordError as e:  # a damaged jobs.json of a run to submit or resume
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before, between or after the options
    if args.status:
        from launch.status import main as show_status

        return show_status(args.status)
    try:
        args.run_dir = base_run_dir(args.run_dir, args.config, args.overrides)
        specs = plan_runs(args.run_dir, args.config, args.overrides, args.repeats, args.ablation,
                          baseline=not args.no_baseline)
        for s in specs:
            RunDir(s.run_dir).require_folder()
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    # before the job states are asked for: with the controller down each query waits for its timeout
    local = args.local
    if not local:
        ok, why = jobs.slurm_available()
        if not ok and shutil.which("sbatch") is not None:
            # a cluster whose controller is down or unreachable: training on this (login) node instead
            # would take its cores and the run's GPU budget; the user decides
            print(f"error: {why}; nothing was submitted. Submit again when `sinfo` answers, or pass --local to "
                  "train on this machine", file=sys.stderr)
            return EXIT_FAILED
        local = not ok
    try:
        res = _resources(args, local)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if local and not args.local:
        print(f"note: {why}: running locally instead ({res.world_size} rank(s) per run, CPU/gloo unless "
              f"a GPU is visible). Use a login node with SLURM to submit.", flush=True)
    todo = _select(specs)
    if todo is None:
        return EXIT_REFUSED
    base = Path(args.run_dir).resolve()
    if not todo:
        print(f"all runs finished; TensorBoard: tensorboard --logdir {base}")
        return 0
    # every run checked before the first one trains (or waits in the queue): a sweep's bad run is
    # refused now, not hours later, and nothing (not even the TensorBoard line) is printed first
    refused = _refused_before_submitting(todo, res, local)
    if refused is not None:
        return refused
    if args.dry_run:
        _print_plan(todo, res, local)
        return 0
    # what this command and its jobs write (jobs.json, submitit's pickles, SLURM's logs: sbatch
    # passes the umask on) is never more open than the stores the runs read
    stores = sorted({s.cfg.data.store for s in todo if Path(s.cfg.data.store).exists()})
    with creation_umask(restrictive_mode(stores)[0]):
        return _launch(todo, res, local, base, args)


def _launch(todo: list[RunSpec], res: Resources, local: bool, base: Path, args: argparse.Namespace) -> int:
    """Run ``todo`` here (``local``) or submit it to SLURM, then report (and with --wait, follow)."""
    if local:
        print(f"TensorBoard: tensorboard --logdir {base}", flush=True)
        return run_locally(todo, res, args.max_restarts)
    folder = RunDir(base).slurm
    try:
        with jobs.submitting([s.run_dir for s in todo]):
            if _busy(todo):  # another submission got there since the check above
                return EXIT_REFUSED
            ids = submit_slurm(todo, res, folder, args.max_requeues)
    except SubmitError as e:
        print(f"refused by sbatch: {e}; nothing was submitted (check --partition, --account, --qos, --constraint, "
              "--exclude and --mem against the cluster: sinfo, sacctmgr show assoc user=$USER)", file=sys.stderr)
        return EXIT_REFUSED
    print(f"submitted {len(ids)} run(s), {res.nodes} node(s) x {res.tasks_per_node} rank(s) each:")
    for spec, jid in zip(todo, ids):
        print(f"  job {jid}: {spec.run_dir}\n    log: {log_path(folder, jid)}")
    print(f"TensorBoard: tensorboard --logdir {base}")
    print(f"state: squeue -j {ids[0].split('_')[0]}   cancel: scancel {ids[0].split('_')[0]}", flush=True)
    if not args.wait:
        return 0
    try:
        return watch(dict(zip(ids, todo)), res, folder, args)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job(s) keep running (squeue -j {ids[0].split('_')[0]})")
        return EXIT_FAILED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
