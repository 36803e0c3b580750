"""``python -m masan.evaluate RUN_DIR [RUN_DIR ...] --out REPORT_DIR``: the paper's Table 2
(mean ± std over repeats, per method), metrics per run, all per-subject predictions, and the
region figures (Fig. 4 style map over a T1 slice, region ranking).

Exit status: 0 report written, 1 no run to report, 2 a refused flag, run set or --out (nothing
written), 128 + the signal (130 Ctrl-C, 143 SIGTERM) stopped part way (the report is incomplete).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from masan import argtypes
from masan.access import AccessError, describe_mode, reports_denied, write_restricted
from masan.evaluate.plots import TOP_K, VIEWS
from masan.evaluate.region_ranking import RegionError, load_atlas_labels, open_atlas
from masan.evaluate.report import (
    FIGURES_DIR,
    REPORT_FILES,
    collect_runs,
    group_runs,
    markdown_table,
    table_notes,
    write_report,
)
from masan.evaluate.report_folder import INCOMPLETE_NAME, MANIFEST_NAME, ReportFolder
from masan.metrics import TABLE_METRICS, MetricsError
from masan.store.places import output_folder_problem
from masan.store.publish import Interrupted, stop_signals

EXIT_NO_RUNS = 1
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m masan.evaluate",
        description=(
            "Aggregate finished training runs. Writes into --out: table.md/.csv/.json (per method: "
            "H-FCN, MASAN, MASAN (fusion=add), ...; accuracy, precision, recall with the positive class "
            "(data.positive_class, e.g. AD) vs the rest, in %, mean ± std over repeats), runs.csv (metrics "
            "per run), predictions.csv (every test subject of every run) and figures/ (region ranking "
            "PNG+CSV and region-weight maps over a T1 slice). Unfinished runs (no DONE, or stopped early by "
            "train.max_steps) are listed and skipped. Runs of one method that differ in data.classes, the "
            "positive class or data.store are reported in separate rows; rows of different methods that differ "
            "in them are warned about. Scores are recomputed from each run's predictions.csv (a metrics.json "
            "that disagrees is warned about); an undefined score (recall without an AD test subject) is "
            "missing, not 0."
        ),
        epilog=f"While the report is written, --out holds a file {INCOMPLETE_NAME}: it remains when the tool "
               "was stopped part way (Ctrl-C, exit 130), and then the files in --out may mix this report with "
               "an earlier one; rerun the same command to complete it. Files of an earlier report into the same "
               f"--out that this one does not write again (figures of runs no longer reported) are removed; "
               f"{MANIFEST_NAME} in --out lists the report's files, and no other file is ever removed. "
               "Example: python -m masan.evaluate runs/masan runs/hfcn --out reports/table2 "
               "--store runs/cohort.zarr",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories; a folder without config.yaml is searched below "
                        "(e.g. runs/<variant>/repeat_R)")
    p.add_argument("--out", type=argtypes.str_path, required=True,
                   help="report directory (created; in an existing one, the report's files are replaced and "
                        "others left alone); no more readable than the run directories and store it reads")
    p.add_argument("--store", type=argtypes.str_path, default=None,
                   help="cohort store for the T1 under the region map (default: each run's data.store); it must "
                        "hold every run's test subjects, in the geometry the run trained on")
    p.add_argument("--atlas", default=None,
                   help="NIfTI label volume naming the regions by majority label; it must be in the same "
                        "world space as the stored T1s (e.g. both in MNI152), it is resampled onto the T1 grid "
                        "by nearest neighbour")
    p.add_argument("--atlas-labels", default=None,
                   help="TSV/CSV (or blank-separated LUT) of 'index name' rows for --atlas")
    p.add_argument("--subject", default=None,
                   help="test subject for the region map (default: the first positive-class test subject)")
    p.add_argument("--rank-method", choices=("mean", "difference"), default="mean",
                   help="region ranking: mean weight over the positive class, or positive minus rest "
                        "(default: %(default)s)")
    p.add_argument("--top-k", type=argtypes.number(int, 1), default=TOP_K,
                   help="regions in the ranking chart, at least 1 (default: %(default)s)")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS),
                   help="slice orientations of the region map (default: all three)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="also report runs that wrote metrics but did not finish (no DONE marker, or stopped by "
                        "train.max_steps before all their epochs): each is named in a warning and marked unfinished "
                        "in the tables (finished false in runs.csv and table.json)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    return p


@reports_denied("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = ReportFolder(args.out)
    try:
        with stop_signals():  # SIGTERM too (kill, a job's time limit) ends as Ctrl-C does: in one line
            return evaluate(args, folder)
    except KeyboardInterrupt as e:  # an Interrupted from stop_signals, or Ctrl-C before they were set
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}: {folder.left_behind()}", file=sys.stderr)
        return 128 + signum


def evaluate(args: argparse.Namespace, folder: ReportFolder) -> int:
    """The report of ``args`` (:func:`build_parser`) into ``folder``; returns the exit status."""
    from masan.evaluate.report_figures import draw_figures, plan_figures, store_problem  # matplotlib/zarr when needed

    # every flag is checked before the first file is written: a refusal leaves no half report
    out = folder.root
    problem = output_folder_problem(out, out.parent / f"{out.name}_report", "the report's tables and figures")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.atlas_labels is not None and args.atlas is None:
        print(f"error: --atlas-labels {args.atlas_labels} names the labels of an --atlas volume; pass --atlas too, "
              "or leave --atlas-labels out (regions are then named by grid cell)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.atlas is not None:
            open_atlas(args.atlas)
        if args.atlas_labels is not None:
            load_atlas_labels(args.atlas_labels)
    except RegionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    wrong = [(d, "is a file" if Path(d).exists() else "does not exist") for d in args.run_dirs if not Path(d).is_dir()]
    if wrong:  # a typo would drop a method's row from the table while the report looked complete
        print(f"error: {'; '.join(f'{d} {why}' for d, why in wrong)}: give run directories (or folders holding "
              "them), e.g. the --run-dir of launch/submit.py; nothing was written", file=sys.stderr)
        return EXIT_BAD_INPUT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs, skipped = collect_runs(args.run_dirs, require_done=not args.allow_unfinished)
        for d, why in skipped:
            print(f"skipped {d}: {why}", file=sys.stderr)
        if not runs:
            print(f"no finished run among {len(skipped)} director(ies); nothing to report", file=sys.stderr)
            return EXIT_NO_RUNS
        if args.store and not args.no_figures:
            # checked now, not when its map is drawn: a refusal leaves no half report
            problem = next(filter(None, (store_problem(r, args.store) for r in runs)), None)
            if problem:
                print(f"error: --store: {problem}; or leave --store out (each run's own store)", file=sys.stderr)
                return EXIT_BAD_INPUT
        tested = {s for r in runs for s in r.predictions.subjects}
        if args.subject is not None and not args.no_figures and args.subject not in tested:
            print(f"error: --subject {args.subject} is in no run's test part (its subjects: "
                  f"{', '.join(sorted(tested)[:5])}{' ...' if len(tested) > 5 else ''}); name one of them, or leave "
                  "--subject out (the first positive-class test subject)", file=sys.stderr)
            return EXIT_BAD_INPUT
        groups = group_runs(runs)
        try:  # the figures' subjects, T1s and atlas are read (and refused) before anything is written
            plans = {} if args.no_figures else {
                name: plan_figures(members, args.store, args.atlas, args.atlas_labels, args.subject,
                                   args.rank_method, name) for name, members in groups.items()}
        except (RegionError, MetricsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        # the report names subjects with their diagnoses and shows their T1 slices: it may be no
        # more readable than the run directories it reads or the stores the figures read
        stores = [] if args.no_figures else [args.store] if args.store else [r.config.data.store for r in runs]
        sources = [r.run_dir for r in runs] + [s for s in dict.fromkeys(stores) if os.path.exists(s)]
        written = ([out / name for name in REPORT_FILES.values()] + folder.own_files()
                   + ([] if args.no_figures else [out / FIGURES_DIR]))

        def write() -> tuple[dict, list[Path], list[Path]]:
            folder.begin()
            report = write_report(runs, skipped, out, folder.record, groups=groups)
            figures = []
            drawn = [p for p in plans.values() if p is not None]
            for plan in tqdm(drawn, desc="figures", unit="method", disable=not drawn):
                figures += draw_figures(plan, out / FIGURES_DIR, args.top_k, args.views, folder.record)
            return report, figures, folder.finish()

        try:
            (report, figures, removed), access = write_restricted(sources, out, written, write)
        except (RegionError, MetricsError, AccessError) as e:  # AccessError: a colleague's file too open
            print(f"error: {e}; {folder.left_behind()}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as e:  # e.g. a folder the system does not let anyone create (/proc/...)
            print(f"error: cannot write the report into {out}: {e.strerror or e}"
                  f"{f' ({e.filename})' if e.filename and str(e.filename) != str(out) else ''}; choose another --out",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    for message in dict.fromkeys(str(w.message) for w in caught):
        if not message.startswith("skipping run"):  # already listed above
            print(f"warning: {message}", file=sys.stderr)
    positive = " / ".join(sorted({p for r in report["rows"] for p in r["positive_class"]}))
    print(f"Table 2: accuracy, precision and recall of {positive} vs the rest "
          f"({', '.join(TABLE_METRICS)} recomputed from predictions.csv); values in %, mean ± std over repeats\n")
    print(markdown_table(report["rows"]) + table_notes(report["rows"], report["groups"]))
    print(f"{len(runs)} run(s) reported, {len(skipped)} skipped. Files ({describe_mode(*access)}: no more "
          f"readable than the runs and store they come from):")
    for path in list(report["files"].values()) + figures:
        print(f"  {path}")
    if removed:
        print(f"Removed {len(removed)} file(s) of the earlier report in {out} that this one does not write again "
              f"(e.g. {removed[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
