"""Finding and checking the subjects of a cohort, before any voxel is read.

- :func:`discover_bids` / :func:`read_manifest` list :class:`SubjectSource` rows (a BIDS
  folder with participants.tsv, or a CSV manifest).
- :func:`parse_label_map` maps raw diagnosis spellings to the class names.
- :func:`check_sources` turns rows into :class:`Job` s (class label + absolute paths) and
  every bad row into a :class:`Failure` naming the row, the file and the fix: duplicate or
  unsafe ids, unknown/missing labels, missing modalities, one file listed for two subjects.

Writing the store from the jobs is :mod:`masan.convert.cohort`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from masan.store.cohort import MODALITIES

PLANTED_EFFECT_FILE = "planted_effect.json"
"""A synthetic cohort's truth record beside participants.tsv (written by masan.synth.phantom and
masan.synth.anatomy, copied into the store's root attributes by to_zarr)."""

DEFAULT_CLASSES = ("NC", "EMCI", "LMCI", "AD")
ADNI_ALIASES = {"CN": "NC"}
"""Diagnosis spellings of ADNI tables mapped to the class names by default."""
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ConvertError(ValueError):
    """The conversion as a whole cannot start (bad inputs or options); exit code 2."""


@dataclass
class SubjectSource:
    """One subject as found in the input: id, raw label, files, where it came from."""

    subject: str
    label: str | None
    t1: Path | None
    fmri: Path | None
    origin: str
    """E.g. ``manifest.csv row 4`` (for error messages)."""
    notes: list[str] = field(default_factory=list)
    fmri_sidecar: Path | None = None
    """The BOLD run's JSON sidecar (its ``RepetitionTime``), if there is one."""
    table: Path | None = None
    """The table its label was read from (participants.tsv, the manifest): the store holds the
    labels, so the table counts among the sources for the store's permissions."""


@dataclass
class Failure:
    subject: str
    file: str | None
    error: str
    """What was wrong and what to do."""


@dataclass
class Job:
    """A checked subject, ready to convert: its class ``label``, its ``sources`` (modality ->
    absolute path, only the modalities present) and ``notes`` on what was accepted as is."""

    subject: str
    label: str | None
    """None: a subject without a diagnosis (``allow_unlabeled``), to be predicted."""
    sources: dict[str, str]
    """Modality (and :data:`FMRI_SIDECAR`) -> absolute path."""
    notes: list[str] = field(default_factory=list)



def read_manifest(path: str | Path) -> list[SubjectSource]:
    """CSV with columns subject, t1, fmri, label (paths relative to the CSV's folder; t1 or
    fmri may be empty)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"manifest {path} not found; pass a CSV with columns subject,t1,fmri,label")
    cols, rows = _read_table(path, ",")
    missing = {"subject", "t1", "fmri", "label"} - set(cols)
    if missing:
        raise ConvertError(f"manifest {path} lacks column(s) {sorted(missing)} "
                           f"(has {cols}); it needs subject,t1,fmri,label")
    out = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        def p(key: str, r: dict = r) -> Path | None:
            v = (r.get(key) or "").strip()
            return None if not v else (Path(v) if Path(v).is_absolute() else path.parent / v)
        fmri = p("fmri")
        out.append(SubjectSource((r.get("subject") or "").strip(), (r.get("label") or "").strip() or None,
                                 p("t1"), fmri, f"{path.name} row {i}",
                                 fmri_sidecar=bold_sidecar(fmri) if fmri is not None else None, table=path))
    return out


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[dict]]:
    """Header and rows of a UTF-8 CSV/TSV. A byte-order mark (Excel's "UTF-8 CSV") is dropped,
    otherwise it would glue itself to the first column's name; another encoding is refused
    with the fix, not guessed (a Latin-1 'é' read wrongly would change a subject id)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed` "
                           "and use the fixed file") from None


def _pick(files: list[Path], kind: str, prefer: str | None = None) -> tuple[Path | None, list[str]]:
    """The file to use among ``files`` (those naming ``prefer`` first, then by name), and a
    note when there was a choice."""
    preferred = sorted(f for f in files if prefer and prefer in f.name) or sorted(files)
    notes = [f"{len(files)} {kind} files; used {preferred[0].name}"] if len(files) > 1 else []
    return (preferred[0] if preferred else None), notes


FMRI_SIDECAR = "fmri_json"
"""Key of a BOLD run's JSON sidecar in :attr:`Job.sources` (its TR; recorded like the images,
so an edited sidecar reconverts the subject)."""


def bold_sidecar(bold: Path, root: Path | None = None) -> Path | None:
    """The JSON sidecar of a BOLD file: ``<name>.json`` beside it, else (BIDS inheritance, the
    common case) ``<root>/task-<label>_bold.json`` at the top of the BIDS folder ``root``."""
    name = bold.name.removesuffix(".gz").removesuffix(".nii")
    own = bold.with_name(name + ".json")
    if own.is_file():
        return own
    task = re.search(r"(?:^|_)(task-[A-Za-z0-9]+)", name)
    if root is not None and task:
        top = root / f"{task.group(1)}_bold.json"
        if top.is_file():
            return top
    return None


def _bids_files(folder: Path) -> tuple[Path | None, Path | None, list[str]]:
    t1, n1 = _pick(list(folder.glob("anat/*_T1w.nii*")), "T1w")
    bold, n2 = _pick(list(folder.glob("func/*_bold.nii*")), "BOLD", prefer="task-rest")
    return t1, bold, n1 + n2


def discover_bids(bids: str | Path, label_column: str = "diagnosis", session: str | None = None
                  ) -> list[SubjectSource]:
    """Subjects of a BIDS folder: participants.tsv (participant_id + ``label_column``) and
    ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, ``func/*_bold.nii[.gz]``.

    With sessions, ``session`` (e.g. ``bl`` or ``ses-bl``) picks one; otherwise the first
    session (sorted) holding both modalities is used, else the first session. With several
    runs, a ``task-rest`` BOLD is preferred, then the first by name; the choice is noted.
    """
    bids = Path(bids)
    table = bids / "participants.tsv"
    if not table.is_file():
        raise ConvertError(f"{table} not found; a BIDS folder needs participants.tsv with "
                           f"participant_id and a {label_column!r} column")
    cols, rows = _read_table(table, "\t")
    if "participant_id" not in cols or label_column not in cols:
        raise ConvertError(f"{table} has columns {cols}; it needs participant_id and {label_column!r} "
                           "(pick the label column with --label-column)")
    _check_participant_ids(bids, table, rows)
    want = None if not session else session if session.startswith("ses-") else f"ses-{session}"
    sources = []
    listed = set()
    found_sessions: set[str] = set()
    for i, r in enumerate(rows, start=2):
        sid = (r["participant_id"] or "").strip()
        listed.add(sid)
        folder = bids / sid
        notes: list[str] = []
        sessions = sorted(p for p in folder.glob("ses-*") if p.is_dir()) if sid else []
        found_sessions.update(p.name for p in sessions)
        if sessions and want:
            if not (folder / want).is_dir():  # fails in check_sources as a subject without images
                notes.append(f"no {want} folder; its sessions: {', '.join(p.name for p in sessions)}")
            folder = folder / want
        elif sessions:
            found = [(p, _bids_files(p)) for p in sessions]
            full = [p for p, (a, b, _) in found if a and b]
            folder = (full or sessions)[0]
            if len(sessions) > 1:
                notes.append(f"{len(sessions)} sessions; used {folder.name} (choose with --session)")
        elif want and sid and folder.is_dir():
            notes.append(f"no session folders; used its files outside sessions (--session {session} not applied)")
        t1, bold, more = _bids_files(folder) if sid else (None, None, [])
        label = (r.get(label_column) or "").strip()
        sources.append(SubjectSource(sid, None if label.lower() in ("", "n/a", "na", "nan") else label,
                                     t1, bold, f"participants.tsv row {i}", notes + more,
                                     bold_sidecar(bold, bids) if bold else None, table=table))
    for folder in sorted(bids.glob("sub-*")):
        if folder.is_dir() and folder.name not in listed:
            found_sessions.update(p.name for p in folder.glob("ses-*") if p.is_dir())
            t1, bold, _ = _bids_files(folder)
            sources.append(SubjectSource(folder.name, None, t1, bold, f"folder {folder} (not in participants.tsv)"))
    if want and want not in found_sessions:
        fix = (f"its sessions are {', '.join(sorted(found_sessions))}: pass one of those" if found_sessions else
               "the cohort has no session folders (sub-*/ses-*): leave --session out")
        raise ConvertError(f"--session {session}: no subject in {bids} has a {want} folder; {fix}")
    return sources


def _check_participant_ids(bids: Path, table: Path, rows: list[dict]) -> None:
    """ConvertError when participant_id values lack BIDS's ``sub-`` prefix although the
    ``sub-<id>`` folders exist: otherwise every such subject would fail twice (no images for
    the row, no label for the folder) with advice that fixes neither."""
    bare = [(i, sid) for i, sid in ((i, (r["participant_id"] or "").strip()) for i, r in enumerate(rows, start=2))
            if sid and not (bids / sid).is_dir() and (bids / f"sub-{sid}").is_dir()]
    if bare:
        shown = ", ".join(f"row {i} {sid!r} (folder sub-{sid})" for i, sid in bare[:3])
        more = f" and {len(bare) - 3} more" if len(bare) > 3 else ""
        raise ConvertError(f"{table}: {len(bare)} participant_id value(s) lack the 'sub-' prefix ({shown}{more}); "
                           "BIDS participant_id values are sub-<label>, the subject's folder name: write e.g. "
                           f"sub-{bare[0][1]} in the participant_id column and rerun")


def planted_effect(bids: str | Path) -> dict | None:
    """The synthetic cohort's planted-effect record (``planted_effect.json``), if any."""
    p = Path(bids) / PLANTED_EFFECT_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def parse_label_map(text: str | None, classes: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``"CN=NC,Dementia=AD"`` -> mapping (upper-cased keys); classes and ADNI aliases included."""
    mapping = {c.upper(): c for c in classes}
    mapping.update({k: v for k, v in ADNI_ALIASES.items() if v in classes})
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ConvertError(f"label map entry {item!r} must look like RAW=CLASS (e.g. CN=NC)")
        raw, cls = (s.strip() for s in item.split("=", 1))
        if cls not in classes:
            raise ConvertError(f"label map {item!r}: {cls!r} is not one of the classes {list(classes)}")
        mapping[raw.upper()] = cls
    return mapping


def check_sources(sources: list[SubjectSource], label_map: dict[str, str], require: tuple[str, ...],
                  allow_unlabeled: bool = False) -> tuple[list[Job], list[Failure]]:
    """Per-subject checks before any voxel is read; every bad subject becomes a Failure.
    ``allow_unlabeled``: a subject without a diagnosis (empty, ``n/a``) becomes a Job with label
    None (a new patient to predict) instead of a Failure; an unknown label still fails."""
    jobs, failures = [], []
    counts = Counter(s.subject for s in sources)
    shared = _shared_files(sources)
    for s in sources:
        def fail(msg: str, file: Path | None = None, s: SubjectSource = s) -> None:
            failures.append(Failure(s.subject or f"<{s.origin}>", str(file) if file else None, f"{s.origin}: {msg}"))
        if counts[s.subject] > 1:
            where = [o.origin for o in sources if o.subject == s.subject]
            fail(f"subject id {s.subject!r} appears {counts[s.subject]} times ({', '.join(where)}); "
                 "give each subject exactly one row")
            continue
        if not SAFE_ID.match(s.subject):
            fail(f"subject id {s.subject!r} is not a safe name; use 1-64 letters, digits, '-' or '_' "
                 "(starting with a letter or digit)")
            continue
        if s.label is None and not allow_unlabeled:
            fail("has no label; fill in its diagnosis (a row in participants.tsv / the manifest), or convert "
                 "with --allow-unlabeled to store it for prediction only")
            continue
        cls = None if s.label is None else label_map.get(s.label.upper())
        if cls is None and s.label is not None:
            fail(f"label {s.label!r} is not a known class; known labels {sorted(label_map)}; "
                 "map it with --label-map RAW=CLASS or fix the table")
            continue
        files = {"t1": s.t1, "fmri": s.fmri}
        missing = [m for m in require if files[m] is None]
        absent = [(m, f) for m, f in files.items() if f is not None and not f.is_file()]
        if not any(files.values()):  # no --require value accepts it: say what can work
            why = f" ({'; '.join(s.notes)})" if s.notes else ""
            where = f"its row from {s.table.name}" if s.table is not None else "it from the input"
            fail(f"has no t1 and no fmri file{why}; a subject needs at least one image: add its images, "
                 f"or remove {where}")
            continue
        if missing:
            fail(f"has no {' and no '.join(missing)} file; add it, or convert with --require "
                 f"{' '.join(m for m in MODALITIES if m not in missing)} to allow this")
            continue
        if absent:
            m, f = absent[0]
            fail(f"{m} file {f} does not exist; fix the path", f)
            continue
        clash = [(f, shared[_file_id(f)]) for f in files.values() if f is not None and len(shared[_file_id(f)]) > 1]
        if clash:
            f, owners = clash[0]
            fail(f"{f} is listed for subjects {', '.join(sorted(owners))}; one scan in two subjects would "
                 "leak between train and test splits: give each subject its own file", f)
            continue
        # The path as listed (BIDS path), not a symlink's target: provenance names the subject's file.
        paths = {m: os.path.abspath(f) for m, f in files.items() if f is not None}
        if s.fmri_sidecar is not None and "fmri" in paths:
            paths[FMRI_SIDECAR] = os.path.abspath(s.fmri_sidecar)
        jobs.append(Job(s.subject, cls, paths, s.notes))
    return jobs, failures


def _file_id(path: Path) -> tuple[int, int]:
    """Identity of the file behind a path (symlinks and hard links included)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _shared_files(sources: list[SubjectSource]) -> dict[tuple[int, int], set[str]]:
    """File identity -> subjects listing it (existing files only)."""
    owners: dict[tuple[int, int], set[str]] = {}
    for s in sources:
        for f in (s.t1, s.fmri):
            if f is not None and f.is_file():
                owners.setdefault(_file_id(f), set()).add(s.subject)
    return owners
