#!/usr/bin/env python
"""Print what a MASAN cohort store holds: classes, subjects per class, shapes, codecs, size,
the last conversion's failures (and whether it finished); optionally one subject's arrays in
detail or a check of every subject (checksums, readable metadata).

Examples:
  python data_tools/inspect_store.py runs/cohort.zarr
  python data_tools/inspect_store.py runs/cohort.zarr --subject sub-001
  python data_tools/inspect_store.py runs/cohort.zarr --verify      # re-read everything, compare checksums
Exit status: 0 fine, 1 --verify found damaged subjects, 2 not a readable store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from masan.access import describe_mode, reports_denied, restrictive_mode
from masan.argtypes import path
from masan.convert.cohort import verify_published
from masan.store.cohort import LAST_CONVERSION, CohortStore, StoreError


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summary(store: CohortStore) -> list[str]:
    rows = store.table
    lines = [f"store {store.path}  ({_size(store.path) / 1e6:.1f} MB on disk)",
             f"classes {store.classes}; {len(rows)} subjects: "
             + ", ".join(f"{c} {n}" for c, n in Counter(r["label"] or "no diagnosis" for r in rows).most_common())]
    for m in ("t1", "fmri"):
        shapes = Counter(tuple(r[m]["shape"]) for r in rows if r.get(m))
        lacking = sum(1 for r in rows if not r.get(m))
        lines.append(f"{m}: " + ", ".join(f"{list(s)} x{n}" for s, n in shapes.most_common())
                     + (f"; {lacking} subjects without" if lacking else ""))
        geometry = [("voxel mm", lambda e: "x".join(f"{z:g}" for z in e["voxel_mm"]) if "voxel_mm" in e else None),
                    ("axes", lambda e: e.get("axcodes"))]
        if m == "fmri":
            geometry.append(("TR s", lambda e: f"{e['tr_seconds']:g}" if e.get("tr_seconds") else "none"))
        for name, of in geometry:
            seen = Counter(of(r[m]) for r in rows if r.get(m))
            seen.pop(None, None)  # stores converted before the table recorded it
            if seen:
                mixed = "  <- differ: training refuses this store" if len(seen) > 1 else ""
                lines.append(f"  {name}: " + ", ".join(f"{v} x{n}" for v, n in seen.most_common()) + mixed)
    lines.append(f"options {json.dumps(store.attrs.get('options', {}))}")
    if "planted_effect" in store.attrs:
        pe = store.attrs["planted_effect"]
        if "structures" in pe:  # an MNI152 validation cohort (docs/validation-cohort.md)
            fmri = ", ".join(pe["fmri_effect"]) or "none"
            lines.append(f"planted effect: {', '.join(pe['structures'])} (fMRI: {fmri}; "
                         f"partner {', '.join(pe['partner'])})")
        else:  # a phantom cohort: one ball
            lines.append(f"planted effect: centre {pe['center']} radius {pe['radius']} cells {pe['cells']}")
    if "registration" in store.attrs:
        reg = store.attrs["registration"]
        lines.append(f"registered: {reg.get('type')} to {reg.get('template')}")
    lines.append(access_line(store))
    failed = store.attrs.get(LAST_CONVERSION, {}).get("failed", [])
    lines.append(f"last conversion: {len(failed)} failed"
                 + "".join(f"\n  {f['subject']}: {f['error']}" for f in failed))
    unfinished = store.unfinished_conversion()
    if unfinished:
        lines.append(f"  NOT FINISHED: {unfinished}")
    return lines


def access_line(store: CohortStore) -> str:
    """Who may read the store now (its root's mode and group, as :mod:`masan.access` reads it for
    the predictions and reports made from it), and the access the conversion recorded when a
    chmod or chgrp has changed it since."""
    mode, gid = restrictive_mode([store.path])
    now = f"access: {describe_mode(mode, gid)}"
    acc = store.attrs.get("access")
    if not acc:
        return now
    recorded = int(acc["file_mode"], 8)
    if recorded == mode and acc.get("gid") in (None, gid):
        return f"{now} (as recorded at conversion, chosen by {acc['chosen_by']})"
    return (f"{now} now; the conversion recorded {describe_mode(recorded, acc.get('gid'))} (chosen by "
            f"{acc['chosen_by']}): changed since by chmod or chgrp")


def _tr(meta: dict) -> str:
    """The TR the store uses for a run and where it came from (the file's header TR may differ:
    a sidecar wins, a unit error is dropped)."""
    tr = meta.get("tr_seconds")
    if tr is None:
        return " TR none (see the conversion's warnings)"
    source = meta.get("tr_source")
    return f" TR {tr:g} s" + (f" (from the {source})" if source else "")


def subject_detail(store: CohortStore, subject: str) -> list[str]:
    lines = [f"{subject}: label {store.label(subject) or 'none (no diagnosis: predicted, not trained on)'}"]
    for m in ("t1", "fmri"):
        if not store.has(subject, m):
            lines.append(f"  {m}: absent")
            continue
        meta = store.meta(subject, m)
        nii = meta["nifti"]
        lines.append(f"  {m}: shape {list(store.shape(subject, m))} from {nii['shape']} {nii['dtype']} "
                     f"axcodes {nii['axcodes']} zooms {nii['zooms']}{_tr(meta) if m == 'fmri' else ''} "
                     f"scaling {nii['scl_slope']:g}x+{nii['scl_inter']:g}")
        lines.append(f"     transform {meta['transform']}  stats mean {meta['stats']['mean']:.4g} "
                     f"std {meta['stats']['std']:.4g}")
        lines.append(f"     source {store.row(subject)[m]['source']}")
        legacy = "format-1 array (rerun to_zarr.py to rewrite it as NIfTI-Zarr)"
        layout = f"NIfTI-Zarr image, {meta['levels']} level(s)" if "levels" in meta else legacy
        lines.append(f"     layout {layout}")
    return lines


@reports_denied("inspect_store")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=path)
    p.add_argument("--subject", help="show this subject's arrays")
    p.add_argument("--verify", action="store_true", help="re-read every array and compare its checksum")
    args = p.parse_args(argv)
    try:
        code = _inspect(args)
        sys.stdout.flush()  # a closed pipe raises here rather than in the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader stopped early (`| head`): stop too, without a traceback, and point stdout at
        # /dev/null so that the interpreter's last flush does not fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _inspect(args: argparse.Namespace) -> int:
    try:
        store = CohortStore(args.store)
        lines = summary(store)
        if args.subject:
            if args.subject not in store.subjects:
                shown = ", ".join(store.subjects[:10]) + (" ..." if len(store.subjects) > 10 else "")
                print(f"inspect_store: --subject {args.subject} is not in {store.path} ({len(store.subjects)} "
                      f"subjects: {shown})", file=sys.stderr)
                return 2
            lines += subject_detail(store, args.subject)
    except (StoreError, KeyError) as e:  # a KeyError's str() is its message quoted: print the message
        print(f"inspect_store: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.verify:
        damaged = {s: bad for s in store.subjects if (bad := verify_published(args.store, store.group_path(s)))}
        for s, bad in damaged.items():
            print(f"DAMAGED {s}: {'; '.join(bad)}; rerun data_tools/to_zarr.py with the same inputs and --verify "
                  "to reconvert it", file=sys.stderr)
        print(f"verified {len(store.subjects)} subjects: {len(damaged)} damaged")
        return 1 if damaged else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
