"""The QC report's HTML: one static page (no JavaScript) of a cohort section and one section per subject.

A store whose last conversion did not finish gets a ``p.unfinished`` banner above everything
else: the counts below it are of part of the cohort.

Flagged subjects' sections carry ``class="subject flagged"`` and ``data-flags`` (their codes),
each flag a ``li[data-flag]``, so a browser test (or a reader's search) finds them.
"""

from __future__ import annotations

import datetime
import html
from collections import Counter
from typing import TYPE_CHECKING

from masan.convert import registration
from masan.convert.nifti import SAME_VALUE_RTOL
from masan.qc.checks import SubjectQC
from masan.store.cohort import CohortStore

if TYPE_CHECKING:
    from masan.qc.options import QCOptions

GENERATOR = "masan.qc.report"
"""``<meta name="generator">`` of our reports: an --out folder holding one (a report written before
:data:`masan.qc.report.MARKER` existed) is reused."""

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}
section.subject{border-left:6px solid #3a3;padding:.2em 1em;margin:1.5em 0}
section.subject.flagged{border-left-color:#c22;background:#fff6f6}
.badge{font-size:12px;padding:2px 6px;border-radius:4px;color:#fff;background:#3a3}
.flagged .badge{background:#c22}
ul.flags li{color:#a11}img{max-width:100%;display:block;margin:.4em 0}
code{font-size:12px}
p.unfinished{border:3px solid #c22;background:#fff0f0;padding:.6em 1em;font-size:16px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cohort_html(store: CohortStore, results: list[SubjectQC], opts: QCOptions, min_frames: int,
                geometry: list[list[str]]) -> str:
    """The cohort section: labels, shapes, geometry (``geometry``: rows of
    :func:`masan.qc.geometry.cohort_geometry`), conversion failures and warnings, flagged subjects."""
    rows = store.table
    labels = Counter(r["label"] or "no diagnosis" for r in rows)
    parts = ["<section id='cohort'><h2>Cohort</h2>",
             f"<p>{len(rows)} subjects in the store; {len(results)} shown here; runs shorter than "
             f"{min_frames} frames and |robust z| above {opts.z_threshold:g} are flagged.</p>",
             "<h3>Labels</h3>",
             _table(["label", "subjects"], [[c, labels.get(c, 0)] for c in store.classes]
                    + [[c, n] for c, n in labels.items() if c not in store.classes])]
    settings = store.attrs.get(registration.GROUP)
    parts.append(f"<p>registration: {_e(settings['type'])} to {_e(settings['template'])} (ANTs; T1 grid "
                 f"{settings['t1_grid']['shape']}, fMRI grid {settings['fmri_grid']['shape']}, MNI mm); flagged under "
                 f"correlation {opts.min_template_corr:g} (T1) or brain Dice {opts.min_brain_dice:g} (fMRI)</p>"
                 if settings else "<p>registration: none (the files' voxels, placed by their headers)</p>")
    for m in ("t1", "fmri"):
        shapes = Counter(tuple(r[m]["shape"]) for r in rows if r.get(m))
        parts.append(f"<p>{m} stored shapes: " + ", ".join(f"<code>{list(s)}</code> x{n}" for s, n in
                                                             shapes.most_common()) + "</p>")
    parts.append("<h3 id='geometry'>Geometry</h3><p>the most common voxel size, TR and voxel axes per modality; "
                 f"a subject off by more than {100 * SAME_VALUE_RTOL:g}% or stored mirrored is flagged</p>"
                 + _table(["modality", "property", "most common", "others"], geometry))
    report = store.report()
    failed = report.get("failed", [])
    parts.append(f"<h3 id='failures'>Conversion failures ({len(failed)})</h3>")
    if report:
        parts.append(_table(["subject", "file", "error"], [[f.get("subject"), f.get("file") or "", f.get("error")]
                                                            for f in failed]) if failed else "<p>none</p>")
        if report.get("aborted"):
            parts.append(f"<p class='aborted'>the last conversion was aborted: {_e(report['aborted'])}</p>")
        warnings = report.get("warnings", [])
        if warnings:
            parts.append(f"<details><summary>{len(warnings)} conversion warnings</summary><ul>"
                         + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></details>")
    else:
        parts.append(f"<p>no conversion_report.json in {_e(store.path)}</p>")
    flagged = [r for r in results if r.flags]
    parts.append(f"<h3 id='flagged'>Flagged subjects ({len(flagged)} of {len(results)})</h3>")
    parts.append("<table><tr><th>subject</th><th>label</th><th>flags</th></tr>" + "".join(
        f"<tr><td><a href='#{_e(r.subject)}'>{_e(r.subject)}</a></td><td>{_e(r.label or 'no diagnosis')}</td>"
        f"<td>{_e(', '.join(sorted({f.code for f in r.flags})))}</td></tr>" for r in flagged) + "</table>")
    return "".join(parts) + "</section>"


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def subject_html(qc: SubjectQC) -> str:
    """One subject's section; ``class="subject flagged"`` and ``data-flags`` when flagged."""
    codes = " ".join(sorted({f.code for f in qc.flags}))
    state = "flagged" if qc.flags else "ok"
    rows = [[m, f["shape"], f["source_shape"], f["dtype"], f["zooms_mm"],
             "" if f["tr_seconds"] is None else f"{f['tr_seconds']:g}", f["axcodes"], f["source_axcodes"]]
            for m, f in qc.facts.items()]
    parts = [f"<section class='subject {state}' id='{_e(qc.subject)}' data-flags='{_e(codes)}'>",
             f"<h2>{_e(qc.subject)} <small>({_e(qc.label or 'no diagnosis')})</small> "
             f"<span class='badge'>{'FLAGGED: ' + _e(codes) if qc.flags else 'OK'}</span></h2>",
             _table(["modality", "stored shape", "source shape", "dtype", "voxel mm", "TR s", "axes (stored)",
                     "axes (source)"], rows)]
    if qc.numbers:
        parts.append("<p>" + ", ".join(f"{_e(k)}: {100 * v:.0f}%" for k, v in qc.numbers.items()) + "</p>")
    if qc.similarity:
        parts.append("<p class='similarity'>registration: " + "; ".join(
            f"{_e(m)} {_e(v['measure'])} {_number(v['before'])} (header placement) -> {_number(v['after'])}"
            for m, v in qc.similarity.items()) + "</p>")
    if qc.flags:
        parts.append("<ul class='flags'>" + "".join(
            f"<li class='flag' data-flag='{_e(f.code)}'><b>{_e(f.code)}</b> ({_e(f.modality)}): {_e(f.message)}</li>"
            for f in qc.flags) + "</ul>")
    for caption, name in qc.images.items():
        parts.append(f"<figure><img src='{_e(name)}' alt='{_e(qc.subject)} {_e(caption)}'>"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "".join(parts) + "</section>"


def page_html(store: CohortStore, results: list[SubjectQC], opts: QCOptions, min_frames: int,
              geometry: list[list[str]], unfinished: str | None = None) -> str:
    """The whole page (see :func:`cohort_html`, :func:`subject_html`), under a banner saying
    ``unfinished`` (why the store may hold only part of the cohort, and the fix) when given."""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    flagged = sum(1 for r in results if r.flags)
    unreadable = sum(1 for r in results if any(f.code == "unreadable" for f in r.flags))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR}'><title>QC {_e(store.path.name)}</title>"
            f"<style>{CSS}</style></head><body><h1>QC report of <code>{_e(store.path)}</code></h1>"
            + (f"<p class='unfinished' role='alert'><b>PARTIAL STORE:</b> {_e(unfinished)}</p>" if unfinished else "")
            + f"<p>written {when}; {len(results)} subjects, <b>{flagged} flagged</b>"
            f"{f', <b>{unreadable} unreadable</b>' if unreadable else ''} (<a href='#flagged'>list</a>)</p>"
            + cohort_html(store, results, opts, min_frames, geometry) + "".join(subject_html(r) for r in results)
            + "</body></html>\n")
