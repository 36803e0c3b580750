"""Checked cohort -> Zarr v3 cohort store (the library behind ``data_tools/to_zarr.py``).

Steps, each a function:

1. :mod:`masan.convert.sources` lists the subjects (:func:`discover_bids` / :func:`read_manifest`)
   and checks them (:func:`check_sources`: labels, ids, files), per subject.
2. :func:`masan.convert.subject.convert_subject` writes, verifies and publishes one subject
   (options: :class:`masan.convert.options.ConvertOptions`).
3. :func:`convert_cohort` runs 2 over worker processes with a progress bar, skips subjects
   whose sources and options are unchanged, redoes half-written or changed ones, points the
   cohort table (root attributes) at each new version before the old one is removed, and
   always writes ``conversion_report.json``. Subjects leave the store only with ``prune``.
   Inside :func:`stop_signals` (to_zarr.py), SIGINT and SIGTERM stop it as
   :class:`Interrupted`, carrying the report of what was done.

Store safety (locking, versions, permissions) and layout: docs/data-format.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import zarr
from tqdm.auto import tqdm
from zarr.storage import LocalStore

from masan import access
from masan.convert import nifti, registration, resample
from masan.convert.options import ConvertOptions
from masan.convert.sources import (  # noqa: F401  (re-exported: the converter's public API)
    DEFAULT_CLASSES,
    FMRI_SIDECAR,
    ConvertError,
    Failure,
    Job,
    SubjectSource,
    check_sources,
    discover_bids,
    parse_label_map,
    planted_effect,
    read_manifest,
)
from masan.convert.subject import convert_subject, open_strict, source_record, verify_group
from masan.files import atomic_write_json
from masan.host import FLOCK_UNSUPPORTED, usable_cores
from masan.store import nifti_zarr, permissions, places, publish
from masan.store.cohort import (
    CURRENT,
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    LAST_CONVERSION,
    MODALITIES,
    REPORT,
    ROOT_META,
    STAGING,
    SUBJECTS,
    TRASH,
    damaged_root,
    table_rows,
)
from masan.store.permissions import StoreAccess
from masan.store.publish import Interrupted, stop_signals  # noqa: F401  (re-exported for to_zarr.py)

TABLE_EVERY_S = 30.0
TABLE_EVERY_FRACTION = 0.1
"""Converted subjects join the cohort table in batches: when they are this share of its rows or
:data:`TABLE_EVERY_S` after the last write (and at the end). The table is one JSON of every row,
so writing it after each subject wrote O(n^2) bytes: half of a 2000-subject conversion's time.
A subject published but not yet in the table is invisible to readers, and redone if the run is
killed before its batch is written."""


@dataclass
class Report:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Subjects taken out of the store (only with ``prune``)."""
    kept: list[str] = field(default_factory=list)
    """Subjects still in the store from an earlier run although this run did not (re)convert
    them (unlisted, source missing, or failing now); ``prune`` would remove them."""
    failed: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    to_convert: int = 0
    """Subjects this run set out to (re)convert: the listed ones neither skipped nor failing their checks."""
    access: str = ""
    """Permissions the store was given (e.g. ``files 600, folders 700``)."""
    aborted: str | None = None
    """Set when the run stopped early (the error); the report is written anyway."""
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["converted"] = sorted(self.converted)  # not the order the workers finished in
        d["failed"] = [asdict(f) for f in self.failed]
        return d


def _published(root: Any, subject: str, row: dict | None, report: Report) -> tuple[str, dict] | None:
    """(group key, attributes) of the version the table row points at, if complete and readable
    (a version whose metadata is damaged is reconverted, and the report says so)."""
    if row is None:
        return None
    key = row.get("group") or f"{SUBJECTS}/{subject}"
    try:
        attrs = dict(root[key].attrs)
    except (KeyError, FileNotFoundError):
        return None
    except Exception as e:  # noqa: BLE001 - whatever zarr makes of damaged metadata
        bad = _unreadable(Path(root.store.root), key, f"{key} cannot be read ({type(e).__name__}: {e})")
        report.warnings.append(f"{subject}: {'; '.join(bad)}; reconverted")
        return None
    return (key, attrs) if attrs.get("complete") else None


def _unchanged(job: Job, attrs: dict, opts: ConvertOptions) -> bool:
    """True when the published subject was made from these very files with these options."""
    if attrs.get("options") != opts.fingerprint():
        return False
    recorded = attrs.get("sources", {})
    if set(recorded) != set(job.sources):
        return False
    for modality, path in job.sources.items():
        rec = recorded[modality]
        st = os.stat(path)
        if (rec["path"], rec["size"], rec["mtime_ns"]) != (path, st.st_size, st.st_mtime_ns):
            if rec["size"] != st.st_size or source_record(path)["sha256"] != rec["sha256"]:
                return False
    return True


def _chosen_spacing(opts: ConvertOptions, jobs: list[Job]) -> tuple[ConvertOptions, list[str]]:
    """``opts`` with a spacing of 0 (a modality's "the cohort's most common") replaced by that
    voxel size, read from the files' headers; and a note saying what was chosen."""
    if opts.spacing is None or min(opts.spacing) > 0:
        return opts, []
    spacing, notes = list(opts.spacing), []
    for i, modality in enumerate(("t1", "fmri")):
        if spacing[i] > 0:
            continue
        sizes = []
        for job in jobs:
            if modality in job.sources:
                try:
                    sizes.append(resample.voxel_size(nifti.open_image(job.sources[modality]).affine))
                except (OSError, ValueError):  # the subject fails with its own message when converted
                    continue
        spacing[i] = resample.common_spacing(sizes) if sizes else 1.0
        notes.append(f"--spacing: {modality} resampled to {spacing[i]:g} mm isotropic voxels, "
                     + _spacing_source(spacing[i], sizes))
    return replace(opts, spacing=(spacing[0], spacing[1])), notes


def _spacing_source(spacing: float, sizes: list[tuple[float, float, float]]) -> str:
    """Where ``spacing`` (:func:`resample.common_spacing` of ``sizes``) comes from, for the note:
    the grid is isotropic, so an anisotropic voxel size gives its finest axis, said as such."""
    if not sizes:
        return "as no file's header gave a voxel size"
    counts = Counter(sizes).most_common()
    size = next(s for s, n in counts if n == counts[0][1] and min(s) == spacing)
    held = (f"all {len(sizes)} files have it" if len(counts) == 1 else
            f"{counts[0][1]} of {len(sizes)} files have it, {len(counts)} different sizes")
    if len(set(size)) == 1:
        return f"the cohort's most common voxel size ({held})"
    return f"the finest axis of the cohort's most common voxel size {'x'.join(f'{z:g}' for z in size)} mm ({held})"


def _check_store_or_empty(path: Path) -> None:
    """ConvertError unless ``path`` is absent, empty (but for lock files) or a Zarr group."""
    if path.exists() and not path.is_dir():
        raise ConvertError(f"--out {path} is a file, not a folder; give --out a new folder (or an existing "
                           "cohort store) to write the store in")
    if (path.is_dir() and not (path / "zarr.json").is_file()
            and any(p.name not in publish.LOCK_FILES for p in path.iterdir())):
        raise ConvertError(f"{path} exists and is not a cohort store; choose another --out or empty it")


def _out_error(out: Path, why: str) -> ConvertError:
    """The error for an --out the store cannot be written to, with the fix."""
    return ConvertError(f"--out {out}: {why}; choose an --out on a disk you may write to (e.g. "
                        "/scratch/$USER/NAME.zarr)")


def _check_writable(out: Path) -> None:
    """ConvertError unless the store can be written at ``out``: the store's folder, or for a
    new store the nearest existing folder above it, is a folder the user may write on a
    writable file system. Checked before anything is created; ``os.access`` reports a
    read-only mount (EROFS) even to root."""
    where = access.nearest_existing(out)
    if not where.is_dir():
        raise ConvertError(f"--out {out}: {where} is a file, not a folder; give --out a path inside a folder")
    why = access.write_refusal(where)
    if why:
        raise _out_error(out, why)


def _open_root(path: Path) -> tuple[Any, list[str]]:
    """The store's root group, and notes for the report; a new one is created without deleting
    anything (zarr's ``mode="w"`` would delete the lock file just taken). Unreadable root
    metadata is a ConvertError (:func:`masan.store.cohort.damaged_root`); the group of the
    subjects holds no attributes, so unreadable metadata of its own is rewritten."""
    _check_store_or_empty(path)
    if (path / ROOT_META).is_file():
        try:
            root = zarr.open_group(LocalStore(path), mode="r+")
            attrs = dict(root.attrs)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever zarr makes of damaged metadata
            raise ConvertError(damaged_root(path, e)) from None
        if attrs.get("masan_store", {}).get("format") != FORMAT:
            raise ConvertError(f"{path} is a Zarr group but not a MASAN cohort store; choose another --out")
    else:
        root = zarr.create_group(LocalStore(path), overwrite=False,
                                 attributes={"masan_store": {"format": FORMAT, "version": FORMAT_VERSION}})
    meta = path / SUBJECTS / publish.GROUP_FILE
    if meta.is_file() and not _reads_as_json(meta):
        atomic_write_json(meta, {"zarr_format": 3, "node_type": "group", "attributes": {}})
        return root, [f"{meta} (the group of the subjects, no data) could not be read; rewritten"]
    if SUBJECTS not in root:
        root.create_group(SUBJECTS)
    return root, []


def _reads_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        return False


def _unreadable(store: Path, key: str, otherwise: str) -> list[str]:
    """The metadata files under ``key`` that are not JSON, named; else ``[otherwise]``."""
    broken = [meta for meta in sorted((store / key).rglob(publish.GROUP_FILE)) if not _reads_as_json(meta)]
    return [f"{meta.relative_to(store)} is damaged (not JSON)" for meta in broken] or [otherwise]


def verify_published(store: Path, key: str, slab_frames: int = ConvertOptions.fmri_shard_frames) -> list[str]:
    """What is damaged in the published subject version at ``key`` (``CohortStore.group_path``),
    one line each; [] when it reads back as recorded. Values that differ from their checksums
    (a missing chunk file included) and metadata that cannot be read are both damage: either
    way the version cannot be trusted, and a conversion with ``verify`` redoes the subject.
    So is its subject's group file (``subjects/<id>/zarr.json``), which any conversion rewrites."""
    folder = store / key
    group_file = folder.parent / publish.GROUP_FILE
    bad = ([f"{group_file.relative_to(store)} is damaged (not JSON)"]
           if publish.VERSION.match(folder.name) and group_file.is_file() and not _reads_as_json(group_file) else [])
    try:
        group = open_strict(folder)
        mismatched = verify_group(group, slab_frames)
        stats = {m: nifti_zarr.open_image(group[m])[1].get("stats", {}) for m in MODALITIES if m in group}
    except Exception as e:  # noqa: BLE001 - whatever keeps the version from being read is damage
        return bad + _unreadable(store, key, f"{key} cannot be read ({type(e).__name__}: {e})")
    for name in mismatched:  # an image's own metadata that does not read fails its check too: name it
        bad += _unreadable(store, f"{key}/{name}", f"{name} does not match its recorded checksum (or a chunk file "
                                                   "is missing)")
    for m, st in stats.items():  # stored by a version that let values past float32's range through
        if st and not all(isinstance(st.get(k), int | float) and math.isfinite(st[k]) for k in ("mean", "std")):
            bad.append(f"{key}/{m}'s normalisation statistics are not finite (mean {st.get('mean')}, std "
                       f"{st.get('std')}): its values reach past float32's range")
    current = folder.parent / CURRENT
    if publish.VERSION.match(folder.name) and current.is_symlink() and os.path.realpath(current) != \
            os.path.realpath(folder):  # readers follow the table; the link is for people (a stop left it behind)
        bad.append(f"{current.relative_to(store)} does not point at {folder.name}, the version the table names")
    return bad


def _check_places(out: Path) -> None:
    """Refuse a store inside a training run directory or holding one: the conversion prunes
    what it does not know, and training writes checkpoints where it runs."""
    run = places.enclosing(out, places.is_run_dir)
    if run is not None:
        raise ConvertError(f"--out {out} is inside the training run directory {run} (it has a MASAN "
                           "config.yaml); put the store outside run directories")
    if out.is_dir():
        inside = places.nested_inside(out, places.is_run_dir)
        if inside:
            raise ConvertError(f"{inside[0]} is a training run directory (config.yaml, checkpoints/) inside the "
                               f"store {out}; move it out of the store (a conversion may remove it) and rerun")


def convert_cohort(sources: list[SubjectSource], out: str | Path, options: ConvertOptions | None = None,
                   classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES, label_map: str | None = None,
                   workers: int = 1, verify: bool = False, extra_attrs: dict | None = None,
                   progress: bool = True, prune: bool = False, share: StoreAccess | None = None,
                   review: Callable[[Path], list[str]] | None = None, new_input: bool = False) -> Report:
    """Convert a cohort into the store at ``out`` (created or updated in place).

    Subjects already published from unchanged sources with the same options are skipped
    (``verify`` re-reads them and redoes any whose checksum differs). Every failure is per
    subject. Subjects the input no longer lists, whose source is missing or that fail now keep
    their earlier conversion (reported as ``kept``) unless ``prune``. The store gets the most
    restrictive permissions among its sources (images, sidecars, and the label tables:
    :attr:`SubjectSource.table`, and the sessions tables labels were read from) unless ``share``
    says otherwise. The report is returned, always stored in ``STORE/conversion_report.json``
    and summarised in the root attrs. A store converted from other label tables (:data:`INPUTS`)
    is refused unless ``new_input`` (the same cohort, moved or listed anew): its subjects and
    this input's would mix, those with the same id replaced. ``review(out)``, when given, looks
    at the store as published (still under the lock) and its warnings join the report's
    (to_zarr.py: what training would refuse). Raises ConvertError (nothing changed) for unusable
    inputs, a locked store, an input listing no subject, an ``out`` that is a file or cannot be
    written, or a store/run-directory nesting.
    """
    opts = options or ConvertOptions()
    classes = tuple(classes)
    mapping = parse_label_map(label_map, classes)
    out = Path(out)
    if not sources:
        raise ConvertError(f"the input lists no subject; {out} was left as it is (check the manifest rows or "
                           "participants.tsv; to empty a store, delete it)")
    _check_places(out)
    _check_store_or_empty(out)  # before the lock files are created in someone else's folder
    _check_writable(out)
    start = time.monotonic()
    jobs, failed = check_sources(sources, mapping, opts.require, opts.allow_unlabeled)
    opts, chosen = _chosen_spacing(opts, jobs)
    # The store holds every subject's label: the tables they were read from count as sources.
    tables = sorted({Path(os.path.abspath(t)) for s in sources
                     for t in (s.table, s.visit.table if s.visit and s.labels_from_visits else None) if t is not None})
    images = [Path(p) for j in jobs for p in j.sources.values()]
    mode, gid, chosen_by = permissions.target_access(out, images, share or StoreAccess(), tables)
    narrow = access.narrowed_by(images + tables) if chosen_by == "sources" else []
    if narrow:  # say why a store of readable files is closed, and that it stays so until asked
        chosen = [*chosen, f"{out}: access {access.describe_mode(mode, gid)}, closer than the source files themselves, "
                           f"because of the folders on the way to them: {', '.join(narrow[:3])}; a later conversion "
                           "keeps it so; pass --mode/--group to share on purpose"]
    with access.creation_umask(mode), contextlib.ExitStack() as held:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(publish.StoreLock(out))
        except publish.LockError as e:
            raise ConvertError(str(e)) from None
        except OSError as e:  # passed _check_writable, yet the file system refused (e.g. a lock file not ours)
            if e.errno in FLOCK_UNSUPPORTED:  # not a disk to write elsewhere: a file system without locks
                raise ConvertError(
                    f"the file system of {out} cannot lock files (flock: {e.strerror}), and a store is written "
                    "under a lock that keeps a second conversion and a killed run's workers out; convert to a "
                    "local disk (or a file system mounted with flock, e.g. Lustre -o flock), then move the store "
                    "there: reading a store needs no lock") from None
            raise _out_error(out, f"cannot create the store or its lock file ({e.strerror})") from None
        root, notes = _open_root(out)
        inputs = [{"path": str(t), "sha256": source_record(str(t))["sha256"]} for t in tables]
        if not new_input:
            _check_same_input(out, root, inputs, [j.subject for j in jobs])
        extra_attrs = {**(extra_attrs or {}), INPUTS: inputs}
        report = Report(failed=failed, warnings=chosen + notes)
        try:
            _convert_locked(root, out, jobs, opts, classes, workers, verify, progress, prune, report,
                            (mode, gid, chosen_by), extra_attrs)
            if review is not None:
                report.warnings.extend(review(out))
        except BaseException as e:
            report.aborted = f"{type(e).__name__}: {e}"
            if isinstance(e, Interrupted):
                report.aborted, e.report = str(e), report
            publish.settle_io()
            with contextlib.suppress(Exception):  # the store's own record of it; the error itself goes on
                root.update_attributes({LAST_CONVERSION: _last_conversion(report, finished=False)})
            raise
        finally:  # the report is written whatever happened (a crash says where it stopped)
            report.seconds = time.monotonic() - start
            atomic_write_json(out / REPORT, report.to_json())
    return report


def _check_same_input(out: Path, root: Any, inputs: list[dict], subjects: list[str]) -> None:
    """ConvertError when the store holds subjects converted from other label tables: none of
    this run's is one of those the store recorded, by path (edited labels are picked up) or by
    content (the same table moved). A store from before the tables were recorded: when none of
    this run's ``subjects`` is among its own."""
    attrs = dict(root.attrs)
    before = [b for b in attrs.get(INPUTS) or [] if isinstance(b, dict)]
    stored = {r.get("subject") for r in attrs.get("cohort") or [] if isinstance(r, dict)}
    if INPUTS not in attrs and stored and subjects and not stored & set(subjects):
        raise ConvertError(f"{out} holds {len(stored)} subjects and this run converts {len(subjects)} others, none of "
                           "them in the store: converting into it would mix two cohorts. Choose a new --out; or, if "
                           "the store is to hold both, pass --new-input; nothing was changed")
    same = any(b.get("path") == t["path"] or b.get("sha256") == t["sha256"] for b in before for t in inputs)
    if before and attrs.get("cohort") and not same:
        raise ConvertError(f"{out} was converted from {', '.join(b.get('path', '?') for b in before)}, and this run "
                           f"reads {', '.join(t['path'] for t in inputs) or 'no label table'} (other content): "
                           "converting into it would mix two cohorts (a subject id in both would be replaced, the "
                           "others kept). Choose a new --out; or, if this is the same cohort moved or listed anew, "
                           "pass --new-input; nothing was changed")


def _convert_locked(root: Any, out: Path, jobs: list[Job], opts: ConvertOptions, classes: tuple[str, ...],
                    workers: int, verify: bool, progress: bool, prune: bool, report: Report,
                    perms: tuple[int, int | None, str], extra_attrs: dict | None) -> None:
    """The conversion proper, under the store lock (see :func:`convert_cohort`)."""
    mode, gid, chosen_by = perms
    asked = access.describe_mode(mode, gid)
    mode, gid, loose = access.tighten(out, mode, gid)
    if loose:
        report.warnings.append(
            f"{out}: {len(loose)} path(s) were more open than the sources allow ({asked}), "
            f"e.g. {', '.join(map(str, loose[:3]))}; tightened (pass --mode/--group to share on purpose)")
    report.access = access.describe_mode(mode, gid)
    extra = {**(extra_attrs or {}), "access": {"file_mode": f"{mode:03o}", "gid": gid, "chosen_by": chosen_by}}
    for leftover in (STAGING, TRASH):  # half-written subjects of an interrupted run
        shutil.rmtree(out / leftover, ignore_errors=True)
    # The table keeps every published subject until a new version replaces it: readers never
    # see a subject vanish while it is reconverted.
    try:
        rows = table_rows(out, dict(root.attrs))
    except ValueError as e:
        raise ConvertError(str(e)) from None
    publish.drop_unreferenced(out, rows)
    todo = []
    for job in jobs:
        found = _published(root, job.subject, rows.get(job.subject), report)
        redo = not found or not _unchanged(job, found[1], opts)
        if not redo and verify:
            redo = _verify_published(root, found[0], job.subject, opts, report)
        if not redo:
            row = dict(found[1]["row"], label=job.label)
            if rows[job.subject].get("group"):
                row["group"] = found[0]
            for modality in MODALITIES:  # the same files may have moved
                if modality in job.sources:
                    row[modality] = dict(row[modality], source=job.sources[modality])
            rows[job.subject] = row
            report.skipped.append(job.subject)
            if found[1]["row"].get("label") != job.label:  # the table was corrected: say what training will see
                report.warnings.append(f"{job.subject}: relabelled {found[1]['row'].get('label')} -> {job.label} "
                                       "(its label table changed; its images are unchanged)")
            # its conversion's warnings still hold (the report is rewritten by every run)
            report.warnings.extend(f"{job.subject}: {w}" for w in [*found[1].get("warnings", []), *job.notes])
        else:
            if found:  # another file chosen for a modality (a choice rule or the folder changed): say which
                before = found[1].get("row", {})
                report.warnings.extend(
                    f"{job.subject}: its {m} is now {job.sources[m]} (was {before[m]['source']}); reconverted"
                    for m in MODALITIES if m in job.sources and isinstance(before.get(m), dict)
                    and before[m].get("source") is not None  # a moved folder keeps its files' names
                    and Path(before[m]["source"]).name != Path(job.sources[m]).name)
            todo.append(job)

    pending: list[tuple[str, str]] = []
    """(subject, its new version) published since the table was last written."""
    written = time.monotonic()

    def flush() -> None:
        nonlocal written
        if pending:
            _write_table(root, rows, classes, opts, extra, report)
            for subject, group in pending:
                publish.drop_versions(out, subject, keep=group)  # only now unreferenced
            pending.clear()
        written = time.monotonic()

    def record(result: dict) -> None:
        if result["ok"]:
            subject = result["subject"]
            rows[subject] = result["row"]
            report.converted.append(subject)
            report.warnings.extend(f"{subject}: {w}" for w in result["warnings"])
            pending.append((subject, result["row"]["group"]))
            if (len(pending) >= TABLE_EVERY_FRACTION * len(rows)
                    or time.monotonic() - written >= TABLE_EVERY_S):
                flush()
        else:
            report.failed.append(Failure(**result["failure"]))
            if result.get("disk"):  # every later subject would fail alike, and --prune must not follow
                raise ConvertError(
                    f"{result['disk']}: the conversion stopped at subject {result['subject']}; the store keeps the "
                    f"subjects converted before and its earlier conversions (nothing was pruned). Free space (or "
                    f"raise the quota, or make it writable) where {out} lies, then run the same command again")

    def died(job: Job, why: str) -> None:
        report.failed.append(Failure(job.subject, None, f"{why}; rerun to retry it"))

    report.to_convert = len(todo)
    _write_table(root, rows, classes, opts, extra, report)
    if opts.register != "none" and opts.threads is None:  # N workers x M ITK threads within the cores we may use
        opts = replace(opts, threads=max(1, usable_cores() // max(1, min(workers, len(todo)))))
    # closed however it ends, so that an interruption's message starts on a line of its own
    with tqdm(total=len(todo), desc=f"to_zarr {out.name}", unit="subject", disable=not progress) as bar:
        try:
            if workers <= 1 or len(todo) <= 1:
                for job in todo:
                    record(convert_subject(job, str(out), opts))
                    bar.update()
            else:
                publish.run_pool(todo, convert_subject, (str(out), opts), min(workers, len(todo)), out, record,
                                 died, bar.update)
        finally:  # an interrupted run keeps what it converted
            flush()
    _settle_stale(out, root, rows, report, prune, classes, opts, extra)
    publish.drop_unreferenced(out, rows)
    for leftover in (STAGING, TRASH):
        shutil.rmtree(out / leftover, ignore_errors=True)
    _write_table(root, rows, classes, opts, extra, report, finished=True)
    # what this run wrote; an unchanged or kept subject's folder was tightened above, left alone since
    access.apply_access(out, mode, gid, settled=[out / SUBJECTS / s for s in (*report.skipped, *report.kept)])


def _settle_stale(out: Path, root: Any, rows: dict[str, dict], report: Report, prune: bool,
                  classes: tuple[str, ...], opts: ConvertOptions, extra: dict) -> None:
    """Subjects in the store that this run neither converted nor found unchanged: removed with
    ``prune`` (table first, then folders), else kept and reported."""
    stale = sorted(set(rows) - set(report.converted) - set(report.skipped))
    failing = {f.subject for f in report.failed}
    if prune:
        for subject in stale:
            rows.pop(subject)
        _write_table(root, rows, classes, opts, extra, report)
        for subject in stale:
            publish.drop_versions(out, subject, keep=None)
        report.removed = stale
        return
    report.kept = stale
    for subject in stale:
        why = "it failed now (see failed)" if subject in failing else "the input does not list it"
        report.warnings.append(f"{subject}: kept its earlier conversion because {why}; --prune removes it")


def _verify_published(root: Any, key: str, subject: str, opts: ConvertOptions, report: Report) -> bool:
    """--verify: True (redo) when a published subject is damaged (:func:`verify_published`)."""
    bad = verify_published(Path(root.store.root), key, opts.fmri_shard_frames)
    if bad:
        report.warnings.append(f"{subject}: {'; '.join(bad)}; reconverted")
    return bool(bad)


def _last_conversion(report: Report, finished: bool) -> dict:
    """The root attribute :data:`LAST_CONVERSION` (``CohortStore.unfinished_conversion`` reads it)."""
    return {"converted": len(report.converted), "to_convert": report.to_convert, "skipped": len(report.skipped),
            "failed": [asdict(f) for f in report.failed], "finished": finished, "aborted": report.aborted,
            "report": REPORT}


def _write_table(root: Any, rows: dict[str, dict], classes: tuple[str, ...], opts: ConvertOptions,
                 extra: dict | None, report: Report, finished: bool = False) -> None:
    """Point the cohort table at ``rows``, with the conversion's progress: ``finished`` only
    once it is done, so a run that stops before leaves the store saying so."""
    attrs: dict[str, Any] = {
        "masan_store": {"format": FORMAT, "version": FORMAT_VERSION},
        "classes": list(classes),
        "cohort": [rows[s] for s in sorted(rows)],
        "options": opts.fingerprint(),
        **(extra or {}),
        LAST_CONVERSION: _last_conversion(report, finished),
    }
    settings = opts.registration_settings()
    if settings is not None:
        attrs[registration.GROUP] = {**settings, "antspyx": registration.tool_version()}
    elif registration.GROUP in root.attrs:  # an earlier run registered, this one does not: one atomic rewrite
        root.attrs.put({**{k: v for k, v in root.attrs.asdict().items() if k != registration.GROUP}, **attrs})
        return
    root.update_attributes(attrs)
