"""Does the model learn a realistic cohort? MASAN, its ablations, the H-FCN baseline and the
paper's exact MASAN against an oracle and a linear baseline, on the MNI152 validation cohort
with planted effects, side by side in one run.

1. Makes the cohort once in WORK (reused while the cohort arguments stay the same; a stamp file
   WORK/cohort.json records them): ``data_tools/synth_cohort.py --anatomy mni152 --preset P``
   then ``data_tools/to_zarr.py --register R --template mni152``. ``--preset easy`` (default,
   WORK runs/science): 4 classes x ``--per-class``, no registration; ``--preset adni-like``
   (WORK runs/science-adni-like): ``--subjects`` in ADNI-like proportions, registered to the
   template with ``--register`` (default syn), one ITK thread per worker, so the same arguments
   make the same store byte for byte.
2. Trains every variant on every repeat's split with ``launch/train_local.py --config
   hpc/configs/science.yaml`` (run dirs WORK/runs/<variant>/r<repeat>, log in train.log there;
   a run finished with the same arguments, resolved config and cohort is not trained again, an
   interrupted one resumes, one where any of them changed starts afresh; one experiment at a time
   per WORK: WORK/science.lock). Variants::

       masan        our MASAN (T1 + fMRI, T1-guided attention fusion; science.yaml)
       masan_add    fusion by element-wise addition (model.fusion=add)
       no_conn      MASAN without the connectivity pairs (model.connectivity_cells=0; the same as
                    masan where the preset does not turn them on: experiments/training.py PRESET_MODEL)
       t1_only      MASAN on T1 alone;  fmri_only: on fMRI alone
       hfcn         the T1-only H-FCN baseline (model.arch=hfcn: sPM's patch features, MASAN's
                    region options, a patch -> region -> subject head)
       paper_exact  MASAN as the paper states it (hpc/configs/paper-exact.yaml), at the bench's
                    sizes and budget (:data:`BENCH_SCALE` taken from the bench's config)

   ``--ablation-repeats K`` (default 1) trains the variants other than masan on the first K repeats only.
3. Scores each run's test predictions: 4-class accuracy; AD vs rest accuracy, precision, recall
   (AD positive: called AD by the run's ``data.decision``, arg-max unless the preset or an override
   says ``expected_stage``) and AUC of prob_AD; and where the model looks: the rank of
   the best-ranked planted region in its region ranking (mean region weight over the test
   subjects, 1 = top) and whether a planted region is in its top 3.
4. Rows that train no network (experiments/baselines.py), on the split the repeat's runs used, every
   repeat: the oracle, a logistic regression on the planted features (what finding the planted
   effect is worth); ``linear``, ``linear_both`` and ``linear_ordinal``, which know nothing of it:
   ANOVA screening and a logistic regression on the stored T1 voxels (and fMRI features; or with
   MASAN's ordinal head), k and C chosen by cross-validation on the training part.

Prints a line per finished run, one markdown table (mean +- std over repeats) and one of MASAN's
differences from every row split by split (mean +- std, splits higher / same / lower), written to
--out (default WORK/science.md), raw numbers to WORK/science.json.

  python -m experiments.science                             # 3 repeats x every variant (min/run: see the table)
  python -m experiments.science --repeats 1 --variants masan t1_only linear train.joint_epochs=40
  python -m experiments.science --repeats 5 --ablation-repeats 2  # MASAN on 5 splits, the others on the first 2
  python -m experiments.science --preset adni-like --register affine   # 96 subjects, ADNI-like, registered
  python -m experiments.science --full --jobs 1             # GPU-sized: T1 96x112x96, fMRI 24x28x24 x 64, 4 x 24
  python -m experiments.science --structures hippocampus entorhinal --strength 0.4 --work runs/science_weak
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from experiments import REPO
from experiments.baselines import LinearBaseline, Oracle
from experiments.cohort import DEFAULT_REGISTER, FULL, REGISTRATIONS, TEMPLATE, balanced, cohort_args, make_cohort
from experiments.scoring import paired, planted_regions, region_result, run_line, score_run, table
from experiments.training import (
    CACHE_DIR,
    CHOSEN_ON,
    MAIN,
    PAPER_EXACT,
    PRESET_MODEL,
    VARIANTS,
    code_fingerprint,
    command_config,
    train,
    train_command,
)
from masan.access import not_a_folder
from masan.argtypes import number, path
from masan.config import ConfigError, RunConfig, config_hash, load_config
from masan.host import usable_cores
from masan.predictions import DECISIONS
from masan.rundir import RunDir
from masan.synth.options import add_effect_arguments, add_shape_arguments
from masan.synth.presets import PAPER_CLASS_COUNTS, PRESETS

CONFIG = REPO / "hpc/configs/science.yaml"
LINEAR = {"linear": {"fmri": False}, "linear_both": {"fmri": True}, "linear_ordinal": {"fmri": False, "ordinal": True}}
"""Rows fitted without training (experiments/baselines.py): name -> its LinearBaseline options
(with the fMRI features; with the ordinal head)."""
MINUTES = {"easy": {"t1_only": 8.2, "hfcn": 8.2, "masan": 7.6, "paper_exact": 7.6, "masan_add": 5.4, "no_conn": 7.6,
                    "fmri_only": 0.7},
           "adni-like": {"masan": 5.9, "masan_add": 5.7, "no_conn": 5.6, "t1_only": 4.1, "hfcn": 4.0,
                         "fmri_only": 2.1, "paper_exact": 2.0}}
"""Minutes per run of each preset at the default size on 2 CPU cores (one thread each; measured:
docs/validation-cohort.md): runs are started longest first, so the short ones fill the end and
neither core idles at the tail."""
ABLATION_REPEATS = 1
"""Repeats of the variants other than :data:`MAIN` by default: every variant on every split
outgrew the default command's time budget on 2 CPU cores (docs/validation-cohort.md); MASAN keeps
every repeat."""
ORACLE = "oracle"
LOCK_FILE = "science.lock"


# --------------------------------------------------------------------------- command line


OVERRIDE_WORD = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")
"""A config override on the command line (``section.key=value``, or ``key=value`` for a key at the
top, e.g. ``deterministic=true``); a path with '=' in it (``reports/lr=3e-4.md``) is none."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.science", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Trailing KEY=VALUE overrides go to every training run "
                                        "(e.g. train.joint_epochs=40 optim.lr=3e-4).")
    ap.add_argument("--work", type=path, default=None,
                    help="work dir (default runs/science; runs/science-adni-like for --preset adni-like)")
    ap.add_argument("--out", type=path, default=None,
                    help="the markdown table's file (default WORK/science.md; checked before any work starts)")
    ap.add_argument("--config", type=path, default=CONFIG, help="run config (default hpc/configs/science.yaml)")
    ap.add_argument("--repeats", type=number(int, 1), default=3, help="splits (split.repeat = seed = 0..N-1)")
    ap.add_argument("--ablation-repeats", type=number(int, 1), default=ABLATION_REPEATS, metavar="K",
                    help=f"train the variants other than {MAIN} on the first K repeats only (default "
                         f"{ABLATION_REPEATS}, so the default command stays within its time budget on 2 CPU cores; "
                         "--ablation-repeats N with N = --repeats trains every variant on every split)")
    rows = [*VARIANTS, *LINEAR]
    ap.add_argument("--variants", nargs="+", default=rows, choices=rows, metavar="NAME",
                    help="rows beside the oracle (default all): trained " + ", ".join(VARIANTS)
                         + "; fitted without training " + ", ".join(LINEAR))
    ap.add_argument("--preset", choices=list(PRESETS), default="easy",
                    help="how hard the cohort is, synth_cohort.py --preset (default easy: 4 balanced classes, a "
                         "strong effect; adni-like: the paper's class proportions, ADNI-like effects, warps)")
    ap.add_argument("--register", choices=REGISTRATIONS, default=None,
                    help=f"to_zarr.py --register, to the {TEMPLATE} template (default: "
                         + ", ".join(f"{r} for {p}" for p, r in DEFAULT_REGISTER.items()) + ")")
    ap.add_argument("--per-class", type=number(int, 1), default=None,
                    help=f"--preset easy: subjects per class (default {PRESETS['easy'].per_class}; "
                         f"--full {FULL['per_class']})")
    ap.add_argument("--subjects", type=number(int, len(PAPER_CLASS_COUNTS)), default=None,
                    help=f"--preset adni-like: subjects in all, at least one per class ({len(PAPER_CLASS_COUNTS)}; "
                         f"default {PRESETS['adni-like'].subjects})")
    add_effect_arguments(ap)  # the cohort's planted effect, as data_tools/synth_cohort.py takes it
    ap.add_argument("--seed", type=number(int, 0), default=0, help="cohort seed")
    add_shape_arguments(ap, {**{k: f"the config's model.{v}, for the cohort and the model" for k, v in
                                (("t1-shape", "t1_shape"), ("fmri-shape", "fmri_shape"))},
                             "frames": "the preset's (easy 16, adni-like 48), for the cohort and the model"})
    ap.add_argument("--full", action="store_true",
                    help=f"GPU-sized cohort: T1 {FULL['t1_shape']}, fMRI {FULL['fmri_shape']} x {FULL['frames']}, "
                         f"{FULL['per_class']} per class; runs with train.device=auto")
    ap.add_argument("--fitted-rule", choices=["nested", *DECISIONS], default="nested",
                    help="how the rows fitted without training (oracle, " + ", ".join(LINEAR) + ") call a "
                         "class: nested (default) takes the rule that is more accurate in cross-validation inside "
                         "each training part; argmax or expected_stage calls every split by that rule")
    ap.add_argument("--jobs", type=number(int, 1), default=2,
                    help="runs trained in parallel, each on usable cores / jobs threads (default 2: on 2 CPU cores two "
                         "one-thread runs finish sooner than one run on both; 1 for one GPU); also the processes that "
                         "fit the linear rows' cross-validation grids")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides section.key=value for every run (keys: masan/config/schema.py)")
    ap.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="the same overrides, spelled as the bench tools "
                    "take them")
    argv = sys.argv[1:] if argv is None else list(argv)
    # KEY=VALUE may follow --variants/--structures (nargs="+"): take them out before parsing; an
    # option's value with '=' in it (--out reports/lr=3e-4.md) names no key and stays
    rest, overrides = [], []
    for a in argv:
        if a != "--set":  # --set KEY=VALUE ... takes what every bare KEY=VALUE word is anyway
            (overrides if OVERRIDE_WORD.match(a) else rest).append(a)
    args = ap.parse_args(rest)
    if args.overrides:  # a word that is no override: a value split from its key by a space, a typo
        ap.error(f"override {args.overrides[0]!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    args.overrides = overrides
    args.ablation_repeats = min(args.ablation_repeats, args.repeats)
    size, other = ("--per-class", "--subjects") if balanced(args.preset) else ("--subjects", "--per-class")
    if getattr(args, other[2:].replace("-", "_")) is not None:
        ap.error(f"{other} does not apply to --preset {args.preset}: {size} sizes that cohort")
    args.register = args.register or DEFAULT_REGISTER[args.preset]
    if args.subjects is None:
        args.subjects = PRESETS[args.preset].subjects
    if args.work is None:
        args.work = REPO / ("runs/science" if args.preset == "easy" else f"runs/science-{args.preset}")
    check_paths(ap, args)
    args.variants = list(dict.fromkeys(args.variants))
    return args


def check_paths(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 (``ap.error``) now, not after the experiment, for a --work that cannot be a folder or
    an --out (default WORK/science.md) that cannot be a file."""
    why = not_a_folder(args.work)
    if why:
        ap.error(f"--work {args.work} {why}; give a folder for the cohort and the runs")
    out = args.out or args.work / "science.md"
    why = not_a_folder(out.parent)
    if why:
        ap.error(f"--out {out}: its folder {out.parent} {why}; give another --out")
    if out.is_dir():
        ap.error(f"--out {out} is a folder; --out is the markdown table's file, e.g. --out {out / 'science.md'}")


def lock_work(work: Path):
    """Hold WORK/science.lock for this process's life, or None when another experiment holds it
    (two experiments in one work dir would restart each other's runs)."""
    work.mkdir(parents=True, exist_ok=True)
    f = (work / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        print(f"error: another experiments.science (pid {holder}) is using {work}; wait for it or pass --work DIR",
              file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


# --------------------------------------------------------------------------- runs and fitted rows


def train_runs(args: argparse.Namespace, jobs: list[tuple[int, str]], run_dirs: dict, commands: dict,
               cohort: dict, planted: dict) -> dict[tuple[int, str], dict] | None:
    """Train (or reuse) and score every (repeat, variant) of ``jobs``, ``args.jobs`` at a time,
    longest first; None when a run's config does not load."""
    try:
        hashes = {job: config_hash(command_config(cmd)) for job, cmd in commands.items()}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // args.jobs))
    code = code_fingerprint()
    results: dict[tuple[int, str], dict] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train, commands[job], run_dirs[job], cohort, env, hashes[job], code, args.work): job
                   for job in jobs}
        for fut in as_completed(futures):
            r, v = futures[fut]
            res = fut.result()
            res["log"] = str(RunDir(run_dirs[r, v]).train_log)
            if res["status"] != "failed":
                try:
                    res.update(score_run(run_dirs[r, v], planted))
                except (ValueError, OSError) as e:
                    print(f"{v} r{r}: cannot score {run_dirs[r, v]}: {e}", flush=True)
                    res["status"] = "failed"
            results[r, v] = res
            print(run_line(v, r, res), flush=True)
    return results


def fitted_rows(args: argparse.Namespace, store, base: RunConfig, run_dirs: dict, planted: dict
                ) -> tuple[dict[str, list[dict]], list[dict]]:
    """The oracle and the ``linear`` rows of ``args.variants`` on every repeat's split (the one its
    runs used, MASAN's first): {row: results per repeat}, and the chance baselines per repeat."""
    rule = None if args.fitted_rule == "nested" else args.fitted_rule
    oracle = Oracle(store, base.data, base.split, rule)
    linear = {name: LinearBaseline(store, base.data, base.split, base.model.patch_grid, rule=rule, jobs=args.jobs,
                                   **options)
              for name, options in LINEAR.items() if name in args.variants}
    rows: dict[str, list[dict]] = {ORACLE: [], **{name: [] for name in linear}}
    baselines = []
    for r in range(args.repeats):
        mine = sorted((v for rr, v in run_dirs if rr == r), key=lambda v: v != MAIN)
        try:
            split = oracle.split(r, [run_dirs[r, v] for v in mine])
        except ValueError as e:  # no split.json and none can be made (SplitError)
            for name in rows:
                rows[name].append({"status": "failed", "error": str(e)})
                print(f"{name} r{r}: {e}", flush=True)
            continue
        for name, row in [(ORACLE, oracle), *linear.items()]:
            try:
                res = row.score(split)
                if name == ORACLE:
                    baselines.append(res.pop("baseline"))
                else:
                    res.update(region_result(res.pop("region_weights"), row.labels(split.test), planted))
            except ValueError as e:  # bad features, a class missing from the training part
                print(f"{name} r{r}: {e}", flush=True)
                res = {"status": "failed", "error": str(e)}
            rows[name].append(res)
            print(run_line(name, r, res), flush=True)
    return rows, baselines


# --------------------------------------------------------------------------- the experiment's steps


def cohort_sizes(args: argparse.Namespace, base: RunConfig) -> list[str]:
    """Fill the cohort sizes the command line left open into ``args`` (--full's, else the preset's
    and the config's); return the overrides that give the model those shapes (and
    train.device=auto for --full), each ``KEY=VALUE`` one shell word."""
    full = FULL if args.full else {}
    def given(value, default):
        return default if value is None else value

    args.per_class = given(args.per_class, full.get("per_class", PRESETS[args.preset].per_class))
    args.t1_shape = given(args.t1_shape, full.get("t1_shape", base.model.t1_shape))
    preset_fmri = PRESETS[args.preset].fmri_shape or base.model.fmri_shape
    args.fmri_shape = list(given(args.fmri_shape, full.get("fmri_shape", preset_fmri)))  # the stamp compares as JSON
    args.frames = given(args.frames, full.get("frames", PRESETS[args.preset].frames))
    shape_overrides = [f"{k}={v}" for k, v, now in (
        ("model.t1_shape", list(args.t1_shape), base.model.t1_shape),
        ("model.fmri_shape", list(args.fmri_shape), base.model.fmri_shape),
        ("model.fmri_frames", args.frames, base.model.fmri_frames),
        ("data.fmri_frames", args.frames, base.data.fmri_frames),
        ("train.device", "auto" if args.full else base.train.device, base.train.device)) if v != now]
    return [o.replace(" ", "") for o in shape_overrides]  # [48,56,48]: one shell word


def plan_runs(args: argparse.Namespace) -> tuple[list[str], dict[str, int], list[tuple[int, str]], dict]:
    """The trained variants of ``args.variants``, the repeats each trains, the (repeat, variant)
    jobs longest first, and each job's run dir WORK/runs/<variant>/r<repeat>."""
    trained = [v for v in args.variants if v in VARIANTS]
    repeats = {v: args.repeats if v == MAIN else args.ablation_repeats for v in trained}
    minutes = MINUTES[args.preset]
    jobs = sorted(((r, v) for v in trained for r in range(repeats[v])), key=lambda j: -minutes.get(j[1], 0))
    run_dirs = {(r, v): args.work / "runs" / v / f"r{r}" for r, v in jobs}
    return trained, repeats, jobs, run_dirs


def fewer_repeats(args: argparse.Namespace, repeats: dict[str, int]) -> bool:
    """Do some trained variants run fewer repeats than MASAN (--ablation-repeats)?"""
    return args.ablation_repeats < args.repeats and any(n < args.repeats for n in repeats.values())


def table_rows(args: argparse.Namespace, fitted: dict[str, list[dict]], results: dict[tuple[int, str], dict],
               repeats: dict[str, int]) -> dict[str, list[dict]]:
    """The table's rows, fitted ones first: {row: its repeats' results}; with --ablation-repeats
    also MASAN on the repeats the ablations ran."""
    rows = {**fitted, **{v: [results[r, v] for r in range(n)] for v, n in repeats.items()}}
    if fewer_repeats(args, repeats) and MAIN in repeats:
        rows[f"{MAIN} (first {args.ablation_repeats})"] = rows[MAIN][:args.ablation_repeats]
    return rows


def table_header(args: argparse.Namespace, planted: dict, repeats: dict[str, int], decision: str) -> str:
    """The line above the table: the cohort, the repeats, the config, how classes are called
    (``decision``: data.decision) and what a cell holds."""
    size = (f"{args.per_class} per class" if balanced(args.preset) else f"{args.subjects} subjects") + \
        f" ({args.preset}, registration {args.register})"
    fewer = fewer_repeats(args, repeats)
    return (f"Science experiment: MNI152 cohort, {size}, T1 {'x'.join(map(str, args.t1_shape))}, "
            f"fMRI {'x'.join(map(str, args.fmri_shape))} x {args.frames}, planted "
            f"{', '.join(planted['by_structure'])}; {args.repeats} repeat(s)"
            + (f" ({', '.join(v for v, n in repeats.items() if n < args.repeats)}: the first "
               f"{args.ablation_repeats}, --ablation-repeats)" if fewer else "")
            + f"; config {args.config.name}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
            + (f"; paper_exact: {PAPER_EXACT.name} at the bench's sizes" if "paper_exact" in repeats else "")
            + f"; classes called by {decision.replace('_', ' ')}"
            + (" (paper_exact: arg-max)" if "paper_exact" in repeats and decision != "argmax" else "")
            + ("; fitted rows: the rule more accurate inside each training part" if args.fitted_rule == "nested"
               else f"; fitted rows: {args.fitted_rule.replace('_', ' ')}")
            + ". Cells: mean ± std over repeats; planted rank: best rank of a planted region in the model's "
              "region ranking (1 = top)."
            + (f" Not a held-out result: the {args.preset} settings were chosen inside training parts of this "
               "cohort, which hold most of these splits' test subjects; cohorts of other seeds (--seed) are held "
               "out." if CHOSEN_ON.get(args.preset) == args.seed else ""))


def write_results(args: argparse.Namespace, text: str, raw: dict) -> None:
    """Print the table ``text`` and write it to --out (default WORK/science.md), ``raw`` to WORK/science.json."""
    out = args.out or args.work / "science.md"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (args.work / "science.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {args.work / 'science.json'}")


def main(argv: list[str] | None = None) -> int:
    from masan.store.cohort import CohortStore

    args = parse_args(argv)
    start = time.perf_counter()
    args.work = args.work.resolve()
    args.config = args.config.resolve()  # the runs train from the repository's folder, not this one
    lock = lock_work(args.work)  # held until the process ends
    if lock is None:
        return 2
    try:
        base = load_config(args.config, args.overrides)
        preset = load_config(args.config, [*PRESET_MODEL[args.preset], *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape_overrides = cohort_sizes(args, base)
    grid = list(base.model.patch_grid)
    stamp = cohort_args(args, grid)
    try:
        store_path = make_cohort(args.work, stamp)
    except subprocess.CalledProcessError as e:
        print(f"error: making the cohort failed (exit status {e.returncode}): {shlex.join(e.cmd)}", file=sys.stderr)
        return 1
    (args.work / CACHE_DIR).mkdir(exist_ok=True)
    store = CohortStore(store_path)
    planted = planted_regions(store, grid)
    print(f"planted regions on the {'x'.join(map(str, grid))} grid (most planted voxels first): {planted['all']}; "
          + "; ".join(f"{s}: {r}" for s, r in planted["by_structure"].items()))

    trained, repeats, jobs, run_dirs = plan_runs(args)
    print(f"training {len(jobs)} runs ({', '.join(f'{v} x {repeats[v]}' for v in trained) or 'none'}), "
          f"{args.jobs} at a time; logs in {args.work / 'runs'}/<variant>/r<repeat>/{RunDir.TRAIN_LOG_NAME}",
          flush=True)
    commands = {job: train_command(args, run_dirs[job], store_path, job[1], job[0], shape_overrides, base)
                for job in jobs}
    results = train_runs(args, jobs, run_dirs, commands, stamp, planted)
    if results is None:
        return 2
    # the fitted rows prefer the rule the trained runs call classes by (the preset's)
    fitted, baselines = fitted_rows(args, store, dataclasses.replace(base, data=preset.data), run_dirs, planted)

    minutes = (time.perf_counter() - start) / 60
    rows = table_rows(args, fitted, results, repeats)
    text = table(rows, baselines, minutes, table_header(args, planted, repeats, preset.data.decision))
    if MAIN in rows:
        text += "\n" + paired(rows, MAIN)
    write_results(args, text, {
        "cohort": stamp, "config": str(args.config), "overrides": args.overrides, "planted_regions": planted,
        "repeats": args.repeats, "ablation_repeats": args.ablation_repeats,
        "runs": {name: [{"repeat": r, **res} for r, res in enumerate(runs)] for name, runs in rows.items()},
        "baselines": baselines, "minutes": minutes})
    failed = [r for r in results.values() if r.get("status") == "failed"]
    failed += [r for name, runs in fitted.items() if name != ORACLE for r in runs if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
