#!/usr/bin/env python
"""Write a static HTML quality-check report of a cohort store: DIR/index.html plus PNGs.

Per subject: header facts (shapes, voxel size, TR, orientation codes), the T1 in three
orthogonal views in world space (sagittal, coronal, axial, with L/R, A/P, S/I at the edges)
with the fMRI mean outline and field of view drawn over it through the stored affines, an fMRI
carpet and temporal-std view, and flags for what looks wrong (orientation disagreement, fields
of view that do not overlap, constant or clipped volumes, too few frames, outlier intensities
against the cohort, a voxel size, TR or voxel-axis handedness other than the cohort's most
common). A subject that cannot be read (permission denied, a missing or corrupt chunk) is
flagged unreadable with its cause, and the others are still checked; a corrupt chunk that still
decodes is caught by comparing every value of the full-resolution T1 and fMRI with the checksum
recorded at conversion (inspect_store.py --verify also checks the lower-resolution levels, the
stored headers and the registration transforms). A store whose last conversion did not finish
(stopped, killed, or still running) may hold only part of the cohort: the page says so at the
top, and so does the summary line. For a store converted with
--register: the T1 in template space with the template's brain outline and grey/white edge over
it, the similarity to the template before and after registration, and a flag when it looks
failed (--min-template-corr, --min-brain-dice). A cohort section lists the label counts and the
last conversion's failures. Open DIR/index.html in any browser; no server is needed. The report
is given the store's permissions (it shows subjects' images and labels). Ctrl-C or SIGTERM
stops it in one line saying what was left; rerunning with the same --out replaces a partial
report.

Examples:
  python data_tools/qc_report.py runs/cohort.zarr --out runs/cohort_qc
  python data_tools/qc_report.py runs/cohort.zarr --out /tmp/qc --subjects sub-001 sub-007
Exit status: 0 report written (flagged subjects included), 1 report written but some subjects
could not be read (listed as UNREADABLE, with the cause) or the store is partial (its last
conversion did not finish: NOT FINISHED), 2 unusable store, subject or --out, 128 + the signal
(130 Ctrl-C, 143 SIGTERM) stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys

from masan.access import AccessError, reports_denied
from masan.argtypes import path
from masan.files import disk_refusal
from masan.qc.options import QCError, QCOptions, add_option_arguments
from masan.qc.report import left_behind, write_report
from masan.store.publish import Interrupted, stop_signals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_tools/qc_report.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=path, help="cohort store written by data_tools/to_zarr.py")
    p.add_argument("--out", type=path, required=True,
                   help="report folder (new, empty, or an earlier report, finished or interrupted, which is "
                        "replaced), outside every store and run directory")
    add_option_arguments(p)  # --subjects, --min-frames, the thresholds (masan.qc.report.QCOptions)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@reports_denied("qc_report")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = QCOptions.from_args(args, progress=not args.no_progress)
    try:
        with stop_signals():  # SIGTERM too (kill, SLURM's time limit) ends as Ctrl-C does: in one line
            res = write_report(args.store, args.out, opts)
    except (QCError, AccessError) as e:
        print(f"qc_report: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # an Interrupted from stop_signals, or Ctrl-C before they were set
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"qc_report: interrupted by {signal.Signals(signum).name}: {left_behind(args.out)}", file=sys.stderr)
        return 128 + signum
    except OSError as e:
        if disk_refusal(e) is None:
            raise
        print(f"qc_report: {disk_refusal(e)}: {left_behind(args.out)} once there is space (free it, or pass "
              "another --out)", file=sys.stderr)
        return 2
    partial = f"; NOT FINISHED: {res['unfinished']}" if res["unfinished"] else ""
    print(f"wrote {res['index']} ({res['subjects']} subjects, {len(res['flagged'])} flagged; {res['access']})"
          + partial)
    for subject, flags in res["flags"].items():  # each flag in words, not only its code: a terminal is all some have
        for code, message in flags:
            if code != "unreadable":  # said below, on stderr
                print(f"  FLAGGED {subject}: {code}: {message}")
    for cause in res["unreadable"].values():  # each names its subject
        print(f"  UNREADABLE {cause}", file=sys.stderr)
    return 1 if res["unreadable"] or res["unfinished"] else 0


if __name__ == "__main__":
    sys.exit(main())
