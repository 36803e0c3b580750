"""Visual quality check of a cohort store: the checks, then a static HTML report of them.

``data_tools/qc_report.py STORE --out DIR`` calls :func:`write_report`, which writes
``DIR/index.html`` and two or three PNGs per subject (no server, no JavaScript):

- a cohort section: label counts, stored shapes, the cohort's geometry (most common voxel size,
  TR, voxel axes), the last conversion's failures and warnings (``conversion_report.json``),
  and the flagged subjects with links;
- per subject: the header facts of each modality (stored and source shape, dtype, voxel size
  in mm, TR in s, orientation codes of the stored array and of the source file), the flags,
  the T1 in three orthogonal views in world space (sagittal, coronal, axial; L/R, P/A, I/S at
  the edges) with the outline of the fMRI mean and the edge of the fMRI field of view drawn
  over it through the two stored affines, and an fMRI panel (global signal and per-frame
  spread, a carpet of voxel time series, the temporal std in three views);
- per subject of a registered store (``to_zarr.py --register``): the T1 in template space with
  the template's brain outline and tissue edge drawn over it, and its similarity to the template
  before and after registration (:mod:`masan.convert.registration`).

The work is split by idea: :mod:`~masan.qc.checks` (per-subject checks),
:mod:`~masan.qc.geometry` (the subject against the cohort's geometry),
:mod:`~masan.qc.damage` (why a read failed), :mod:`~masan.qc.figures`,
:mod:`~masan.qc.page`.

Flags (:class:`~masan.qc.checks.Flag`, ``code``) say what looks wrong:

==============  ==========================================================================
``orientation`` the T1 and fMRI voxel axes point different ways (``aff2axcodes`` differ):
                harmless for tools that use the affines, wrong for ones that don't
``fov``         under ``fov_overlap`` of the fMRI foreground lies inside the T1 volume
``constant``    a volume with one value only, fMRI frames with one value (e.g. all zero),
                or an fMRI run without any temporal variation
``clipped``     over ``clip_fraction`` of the nonzero voxels sit at the maximum value
``frames``      fewer frames than ``min_frames`` (default: the cohort's most common length)
``outlier``     mean or std of a modality more than ``z_threshold`` robust z from the
                cohort (median / 1.4826 MAD over every subject of the store, the MAD taken
                as at least 5% of the median)
``missing``     a modality is absent from the store (converted with ``--require t1``)
``registration`` the registered T1's correlation with the template under
                ``min_template_corr``, the fMRI mean's brain overlap (Dice) with the template's
                under ``min_brain_dice``, or either lower after registration than the header
                had placed it (by more than ``registration.WORSE_BY``): a failed registration
``voxel_size``  the stored voxel size differs from the cohort's most common one (over 1%)
``tr``          the fMRI TR differs from the cohort's most common one (over 1%), or is unknown
``mirrored``    the stored voxel axes are mirrored against the cohort majority's (LAS among RAS)
``axes``        the stored axis codes differ from the cohort's most common ones (not mirrored)
``unreadable``  the subject's arrays could not be read: permission denied (the folder or file
                named, its mode and owner), a missing chunk, or a corrupt one (one that does
                not decode, or decodes to values whose CRC-32 differs from the one recorded at
                conversion: :mod:`~masan.qc.damage`); it gets no figures, and the other
                subjects are still checked
==============  ==========================================================================

Every stored value of each full-resolution T1 and fMRI is read and compared with its
checksum; the lower-resolution levels, the stored NIfTI headers and a registered store's
transforms are not read, so not checked: ``inspect_store.py --verify`` checks all of them.

A store whose last conversion did not finish (stopped, killed, or running now:
:meth:`~masan.store.cohort.CohortStore.unfinished_conversion`) may hold only part of the
cohort, and the subjects it lacks are not failures: the page says so above everything else,
and :func:`write_report` returns it (``unfinished``).

The report folder is marked as this tool's (:data:`MARKER`) before anything else is written
in it, so a report interrupted half-way (PNGs without ``index.html``) is replaced by the next
run like a finished one; :func:`left_behind` says what an interrupted run left.

The geometry flags (:mod:`~masan.qc.geometry`) and the cohort statistics for ``outlier``
come from the headers and the statistics the conversion stored with each array (``stats``:
mean/std over the nonzero voxels), read for every subject of the store, so ``--subjects``
compares the chosen subjects with the whole cohort without reading its voxels. Values are the
data values (NIfTI scaling applied, not z-scored).
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from masan.access import apply_access, creation_umask, describe_mode, restrictive_mode
from masan.files import atomic_write_text, atomic_writer, remove_stale_temporaries
from masan.qc import figures
from masan.qc.checks import (
    Flag,
    SubjectQC,
    check_subject,
    cohort_numbers,
    default_min_frames,
    read_headers,
    robust_z,
)
from masan.qc.damage import Unreadable
from masan.qc.geometry import cohort_geometry, geometry_flags
from masan.qc.options import QCError, QCOptions
from masan.qc.page import GENERATOR, page_html
from masan.store.cohort import CohortStore, StoreError
from masan.store.places import output_folder_problem

INDEX = "index.html"
MARKER = ".qc_report"
"""Written first into the report folder: an existing --out is replaced only if it holds it (or,
written before the marker existed, an ``index.html`` of ours)."""
MARKER_TEXT = ("This folder is a QC report of data_tools/qc_report.py (masan.qc.report); rerunning it with this "
               "--out replaces its index.html and PNGs.\n")
FIGURES = ("views", "registration", "fmri")
"""The PNGs of a subject: ``<subject>_<kind>.png``."""


def _is_report(out: Path) -> bool:
    """``out`` holds a report of ours, finished or not (its :data:`MARKER`, or an ``index.html``
    written before the marker existed)."""
    index = out / INDEX
    return (out / MARKER).is_file() or (
        index.is_file() and f"content='{GENERATOR}'" in index.read_text(errors="replace")[:2000])


def _check_out(out: Path, store: CohortStore) -> None:
    """Refuse an --out that predict and evaluate would refuse too (a file, a folder in a store
    or a run directory, one this user may not write:
    :func:`masan.store.places.output_folder_problem`) or a folder other than an earlier QC
    report (its files get the store's permissions)."""
    problem = output_folder_problem(out, store.path.parent / (store.path.name + "_qc"),
                                    f"{INDEX} and the subjects' PNGs")
    if problem:
        raise QCError(problem)
    if out.exists() and any(out.iterdir()) and not _is_report(out):
        raise QCError(f"--out {out} exists and is not an earlier QC report (its files would be given the "
                      "store's permissions); choose a new or empty folder")


def _start_out(out: Path, mode: int, gid: int | None) -> None:
    """Create ``out`` (inside :func:`~masan.access.creation_umask`) with the store's mode and
    group before anything is written in it, so that even an interrupted report is no more
    readable than the store; mark it (:data:`MARKER`), then clear an earlier report's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QCError(f"cannot create --out {out} ({e.strerror}: {e.filename}); choose a folder you may "
                      "write") from None
    apply_access(out, mode, gid)  # set-gid folder: the files made in it take the store's group
    atomic_write_text(out / MARKER, MARKER_TEXT)
    remove_stale_temporaries(out)  # of a report killed mid-write
    for p in out.iterdir():
        if p.name == INDEX or p.suffix == ".png":
            p.unlink()


def left_behind(out: str | os.PathLike) -> str:
    """What a :func:`write_report` stopped part-way (Ctrl-C, SIGTERM) left in ``out`` and what
    to do, for the one line the tool prints."""
    out = Path(out)
    if not (out / MARKER).is_file():
        return f"nothing was written to {out}; rerun the same command"
    if (out / INDEX).is_file():
        return f"{out} still holds a complete report ({INDEX} and its PNGs); rerunning the same command replaces it"
    return (f"{out} holds a partial report ({len(list(out.glob('*.png')))} PNGs, no {INDEX}); rerunning the "
            "same command (the same --out) replaces it")


def _save(fig: Figure, path: Path, dpi: int) -> str:
    """PNG of ``fig`` at ``path``, atomically (a report stopped while drawing leaves no empty PNG
    under the final name); returns its file name. (Not masan.evaluate.plots.save_figure:
    importing masan.evaluate loads torch, seconds for a tool that needs none of it.)"""
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path.name



def _figures(qc: SubjectQC, t1, summary, out: Path, opts: QCOptions) -> None:
    """Draw the subject's PNGs (``<subject>_<FIGURES>.png``) into ``out`` and list them in ``qc.images``."""
    subject = qc.subject
    if t1 is not None:
        fig = figures.t1_views_figure(t1, qc.facts["t1"]["affine"], None if summary is None else summary.mean,
                                         qc.facts.get("fmri", {}).get("affine"))
        qc.images["T1 in three views (world space) with the fMRI outline"] = _save(fig, out / f"{subject}_views.png",
                                                                                  opts.dpi)
    registered = qc.facts["t1"]["registration"] if t1 is not None else None
    if registered:
        fig = figures.registration_figure(t1, qc.facts["t1"]["affine"], registered["template"])
        qc.images[f"T1 registered to {registered['template']} ({registered['type']}) with the template's "
                  "edges"] = _save(fig, out / f"{subject}_registration.png", opts.dpi)
    if summary is not None:
        fig = figures.fmri_figure(summary, qc.facts["fmri"]["affine"], opts.carpet_voxels)
        qc.images["fMRI signal, carpet and temporal std"] = _save(fig, out / f"{subject}_fmri.png", opts.dpi)


def _subject(store: CohortStore, subject: str, facts: dict, broken: Flag | None, out: Path, opts: QCOptions,
             min_frames: int, zscores: dict, geometry: dict[str, list[Flag]]) -> SubjectQC:
    """One subject's checks and figures; a subject whose data cannot be read is one ``unreadable``
    flag (its true cause) and no figures (none half-written)."""
    if broken is None:
        try:
            qc, t1, summary = check_subject(store, subject, facts, opts, min_frames, zscores)
        except Unreadable as e:
            broken = Flag("unreadable", e.modality, str(e))
    if broken is not None:
        return SubjectQC(subject, store.label(subject), facts, [broken])
    qc.flags += geometry.get(subject, [])
    try:
        _figures(qc, t1, summary, out, opts)
    except BaseException:
        for kind in FIGURES:  # no figure, whole or half-written, of a subject whose report failed
            (out / f"{subject}_{kind}.png").unlink(missing_ok=True)
        raise
    return qc


def write_report(store_path: str | os.PathLike, out: str | os.PathLike, opts: QCOptions | None = None) -> dict:
    """Check the subjects of a store and write ``out/index.html`` plus PNGs.

    A subject whose arrays cannot be read (permissions, missing or corrupt chunks) is reported
    as flagged ``unreadable`` with the cause, and the others are still checked. The report is
    never more readable than the store (it shows subjects' images and labels): files are created
    under a umask from the store's mode, then the folder gets the store's mode and group
    (:mod:`masan.access`). Returns ``{"index", "subjects", "flagged" (subject -> flag codes),
    "flags" (subject -> its (code, message) pairs, as the page lists them), "unreadable"
    (subject -> the cause), "unfinished" (why the store may be partial, and what to do; None
    when its last conversion finished), "access"}``. Raises :class:`QCError` naming the fix for
    a bad store, subject or output folder.
    """
    opts = opts or QCOptions()
    out = Path(out)
    try:
        store = CohortStore(store_path)
        everyone = store.subjects
    except StoreError as e:
        raise QCError(str(e)) from None
    chosen = list(dict.fromkeys(opts.subjects)) if opts.subjects else everyone
    unknown = [s for s in chosen if s not in set(everyone)]
    if unknown:
        raise QCError(f"--subjects {unknown} not in the store {store.path} ({len(everyone)} subjects: "
                      f"{everyone[:5]}{'...' if len(everyone) > 5 else ''}); list them with "
                      f"python data_tools/inspect_store.py {store.path}")
    if not chosen:
        raise QCError(f"the store {store.path} has no subjects; convert some with data_tools/to_zarr.py")
    _check_out(out, store)
    unfinished = store.unfinished_conversion()
    if unfinished:
        unfinished += " (it resumes where it stopped), then this report"
    min_frames = opts.min_frames if opts.min_frames is not None else default_min_frames(store)
    facts, broken = read_headers(store, everyone)
    zscores = {k: robust_z(v) for k, v in cohort_numbers(facts).items()}
    geometry = geometry_flags(facts)
    mode, gid = restrictive_mode([store.path])
    results = []
    with creation_umask(mode):
        _start_out(out, mode, gid)
        for subject in tqdm(chosen, desc="qc", unit="subject", disable=not opts.progress):
            results.append(_subject(store, subject, facts[subject], broken.get(subject), out, opts, min_frames,
                                    zscores, geometry))
        atomic_write_text(out / INDEX, page_html(store, results, opts, min_frames, cohort_geometry(facts),
                                                 unfinished))
    applied = apply_access(out, mode, gid)
    return {"index": out / INDEX, "subjects": len(results),
            "flagged": {r.subject: sorted({f.code for f in r.flags}) for r in results if r.flags},
            "flags": {r.subject: [(f.code, f.message) for f in r.flags] for r in results if r.flags},
            "unreadable": {r.subject: f.message for r in results for f in r.flags if f.code == "unreadable"},
            "unfinished": unfinished, "access": describe_mode(*applied)}
