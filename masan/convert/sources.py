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
import functools
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from masan.order import natural
from masan.store.cohort import MODALITIES, SAFE_ID

PLANTED_EFFECT_FILE = "planted_effect.json"
"""A synthetic cohort's truth record beside participants.tsv (written by masan.synth.phantom and
masan.synth.anatomy, copied into the store's root attributes by to_zarr)."""
SYNTH_STAGING = ".synth-partial"
"""The folder inside a synthetic cohort's folder that data_tools/synth_cohort.py writes it to before
it moves in: where it is, a run of that tool stopped part way."""

DEFAULT_CLASSES = ("NC", "EMCI", "LMCI", "AD")
ADNI_ALIASES = {"CN": "NC"}
"""Diagnosis spellings of ADNI tables mapped to the class names by default."""
MISSING_LABEL = frozenset({"", "n/a", "na", "nan"})
"""Label cells that mean "no diagnosis" (lower-cased, stripped), in participants.tsv and a
manifest alike: BIDS writes ``n/a``, R ``NA``, pandas ``nan``."""
IMAGE_ENDINGS = (".nii", ".nii.gz")
"""How a BIDS image's name ends, right after its suffix (``sub-01_T1w.nii.gz``): backups and
checksums beside it (``sub-01_T1w.nii.gz.bak``, ``.md5``, ``sub-01_T1w.nii.bak.nii.gz``) are not
images of the subject."""
REST_TASK = "rest"
"""A BOLD run is resting-state when its BIDS task label contains this, in any case (``task-rest``,
``task-resting``, ``task-RestingState``), or is one of :data:`REST_ABBREVIATIONS`: MASAN models
resting-state fMRI, so other tasks' runs are used only when named (``--bold-task``)."""
REST_ABBREVIATIONS = ("rs", "rsfmri", "rsbold", "rsfc")
"""Resting-state task labels without "rest" in them that cohorts use (lower case)."""


MANIFEST_COLUMNS = ("subject", "t1", "fmri", "label")
"""A manifest's columns (matched ignoring case and surrounding spaces)."""


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
    """The JSON sidecar the BOLD run's frame timing (``RepetitionTime``, or ``VolumeTiming``: none) comes from
    (:func:`bold_sidecar`), if any."""
    table: Path | None = None
    """The table its label was read from (participants.tsv, the manifest): the store holds the
    labels, so the table counts among the sources for the store's permissions."""
    session: str | None = None
    """The BIDS session folder its files were taken from (``ses-01``), None without sessions."""
    fmri_refused: str | None = None
    """Why its BOLD runs were not taken (none is of the task wanted: :func:`bold_refusal`); the
    subject fails with it when fMRI is required or it has no T1, else it is stored without fMRI."""
    other_sessions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """When the session used lacks a modality: the subject's other session folders holding any
    image, and the modalities each holds, so that the failure can say where the missing one is."""
    misplaced: tuple[Path, str] | None = None
    """A chosen image named for another subject or session than its folder's, and why the
    subject fails for it (:func:`_named_elsewhere`)."""
    visit: Visit | None = None
    """The diagnosis of the visit converted, as its BIDS sessions table states it: the label itself
    when labels come from the sessions tables (``label_source="sessions"``), else compared with
    ``label`` (a subject whose diagnosis changed since participants.tsv's is noted)."""
    labels_from_visits: bool = False
    """``label`` is ``visit``'s: a label message names the sessions table's row, not ``origin``."""


class Visit(NamedTuple):
    """A subject's row of its BIDS sessions table (``sub-01/sub-01_sessions.tsv``) for the session
    converted: its raw label, where it was read, or why it could not be."""

    label: str | None
    where: str
    """E.g. ``sub-01/sub-01_sessions.tsv row 3`` (for messages)."""
    table: Path | None
    """The sessions table, when it exists: a label source, so it counts among the store's sources."""
    problem: str | None = None
    """Why the visit's label cannot be read (no table, no row for the session, a row twice...)."""


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



def read_manifest(path: str | Path, bold_task: str | None = None) -> list[SubjectSource]:
    """CSV with columns subject, t1, fmri, label (paths relative to the CSV's folder; t1 or
    fmri may be empty). An fMRI file with a BIDS name of another task than ``bold_task`` (None:
    a resting-state task, :data:`REST_TASK`) is not taken (:attr:`SubjectSource.fmri_refused`);
    a file whose name states no task is taken as listed."""
    path = Path(path)
    if path.is_dir():
        bids = (" (it holds participants.tsv: for a BIDS folder use --bids)"
                if (path / "participants.tsv").is_file() else "")
        raise ConvertError(f"manifest {path} is a folder{bids}; --manifest takes a CSV file with columns "
                           "subject,t1,fmri,label")
    if not path.is_file():
        raise ConvertError(f"manifest {path} not found; pass a CSV with columns subject,t1,fmri,label")
    cols, rows = _read_table(path, ",")
    # Spreadsheets capitalise headers (Subject, T1, fMRI): a column is its name in any case and spacing.
    names = Counter(c.strip().lower() for c in cols)
    twice = [n for n in MANIFEST_COLUMNS if names[n] > 1]
    if twice:
        raise ConvertError(f"manifest {path} has the column {twice[0]!r} more than once (as "
                           f"{[c for c in cols if c.strip().lower() == twice[0]]}; names match in any case); keep one")
    missing = set(MANIFEST_COLUMNS) - set(names)
    if missing and path.name == "participants.tsv":
        raise ConvertError(f"manifest {path} is a BIDS participants table, not a manifest: pass its folder with "
                           f"--bids {path.parent}")
    if missing:
        raise ConvertError(f"manifest {path} lacks column(s) {sorted(missing)} "
                           f"(has {cols}{_delimiter_hint(cols, ',')}); it needs {','.join(MANIFEST_COLUMNS)}")
    rows = [(i, {k if k is None else k.strip().lower(): v for k, v in r.items()}) for i, r in rows]
    out = []
    for i, r in rows:
        def p(key: str, r: dict = r) -> Path | None:
            v = (r.get(key) or "").strip()
            return None if not v else (Path(v) if Path(v).is_absolute() else path.parent / v)
        fmri = p("fmri")
        refused = None if fmri is None or _task(fmri) is None else bold_refusal([fmri], bold_task)
        fmri = None if refused else fmri
        sidecar, notes = bold_sidecar(fmri) if fmri is not None else (None, [])
        out.append(SubjectSource((r.get("subject") or "").strip(), _label(r.get("label")), p("t1"), fmri,
                                 f"{path.name} row {i}", notes, sidecar, table=path, fmri_refused=refused))
    return out


_DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon"}
"""Column separators a table is saved with by mistake (spreadsheets' CSV/TSV exports), by name."""


def _delimiter_hint(cols: list[str], delimiter: str) -> str:
    """A hint when a table's header is one column holding another delimiter (a comma-separated
    participants.tsv, a tab- or semicolon-separated manifest): the columns are there, the
    separator is wrong. Empty otherwise."""
    if len(cols) != 1:
        return ""
    other = next((d for d in _DELIMITERS if d != delimiter and d in cols[0]), None)
    if other is None:
        return ""
    return (f": it looks {_DELIMITERS[other]}-separated, but this file must be {_DELIMITERS[delimiter]}-separated; "
            f"save it with {_DELIMITERS[delimiter]}s between the columns")


def _label(cell: str | None) -> str | None:
    """A table's label cell, None when it says "no diagnosis" (:data:`MISSING_LABEL`)."""
    label = (cell or "").strip()
    return None if label.lower() in MISSING_LABEL else label


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (row number, row) pairs of a UTF-8 CSV/TSV. A byte-order mark (Excel's "UTF-8
    CSV") is dropped, otherwise it would glue itself to the first column's name; another
    encoding is refused with the fix, not guessed (a Latin-1 'é' read wrongly would change a
    subject id). Rows with every field empty (spreadsheets export trailing ``,,,`` rows) are
    left out, not failed as subjects; row numbers are the file's lines, so messages still
    point at the right row after such rows."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            cols = list(reader.fieldnames or [])
            rows = []
            for r in reader:
                broken = next((v for v in _values(r) if "\n" in v or "\r" in v), None)
                if broken is not None:  # a lone '"' opened a quoted field: the rows after it went into one cell
                    raise ConvertError(
                        f"{path}: a field of the row ending at line {reader.line_num} runs over several lines "
                        f"({broken[:60]!r}...): a double quote that is never closed swallows the rows after it; "
                        "remove that quote, or close it")
                if not _blank(r):
                    rows.append((reader.line_num, r))
            return cols, rows
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed` "
                           "and use the fixed file") from None


def _values(row: dict) -> list[str]:
    """Every field of a csv.DictReader row (extra fields sit in a list under None)."""
    return [v or "" for k, v in row.items() if k is not None] + [v or "" for v in row.get(None) or []]


def _blank(row: dict) -> bool:
    """Every field of a csv.DictReader row is empty."""
    return not any(v.strip() for v in _values(row))


def _pick(files: list[Path], kind: str, usable: list[Path] | None = None) -> tuple[Path | None, list[str]]:
    """The file to use: the first in natural order (:func:`natural`) among ``usable`` (default:
    all ``files``), and a note when ``files`` held a choice."""
    usable = sorted(files if usable is None else usable, key=natural)
    notes = [f"{len(files)} {kind} files; used {usable[0].name}"] if len(files) > 1 and usable else []
    return (usable[0] if usable else None), notes


FMRI_SIDECAR = "fmri_json"
"""Key of a BOLD run's JSON sidecar in :attr:`Job.sources` (the one its TR comes from;
recorded like the images, so an edited sidecar reconverts the subject)."""

BIDS_LABEL = "[A-Za-z0-9]+"
"""A BIDS entity's label (the ``rest`` of ``task-rest``): letters and digits only."""
_ENTITY = re.compile(f"^({BIDS_LABEL})-({BIDS_LABEL})$")


def _bids_name(name: str) -> tuple[dict[str, str], str] | None:
    """(entities, suffix) of a BIDS file name (``sub-01_task-rest_bold.nii.gz`` ->
    ``({"sub": "01", "task": "rest"}, "bold")``), None for a name that is not one (``run1.nii``:
    a manifest's file, whose ``run1.json`` beside it is its only sidecar)."""
    *pairs, suffix = name.split(".", 1)[0].split("_")
    found = [_ENTITY.match(pair) for pair in pairs]
    if not pairs or not suffix.isalnum() or not all(found):
        return None
    entities = dict(m.groups() for m in found if m)
    return (entities, suffix) if len(entities) == len(pairs) else None


def _dataset_root(path: Path) -> Path:
    """The BIDS dataset holding ``path`` (the nearest folder above it with
    dataset_description.json), else the folder ``path`` is in."""
    return next((d for d in path.parents if (d / "dataset_description.json").is_file()), path.parent)


def _sets_timing(sidecar: Path) -> bool:
    """Whether a sidecar decides the TR: it sets ``RepetitionTime``, or ``VolumeTiming`` (BIDS:
    the two exclusive ways to time frames; the latter, frames at uneven times, means no TR), or
    it cannot be read (then the subject fails naming it, rather than silently taking a farther
    file's TR)."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return True
    return not isinstance(meta, dict) or any(meta.get(key) is not None for key in ("RepetitionTime", "VolumeTiming"))


def bold_sidecar(bold: Path, root: Path | None = None, listings: dict | None = None) -> tuple[Path | None, list[str]]:
    """The JSON sidecar a BOLD run's frame timing (``RepetitionTime`` or ``VolumeTiming``) comes
    from, and notes on a choice BIDS leaves open.

    BIDS inheritance: a ``*_bold.json`` applies when its entities are a subset of the run's,
    and it lies in the run's folder or any folder above it up to the dataset ``root`` (None: the
    folder above the file holding dataset_description.json, else the file's own folder); a
    nearer file's keys override a farther one's, key by key. So the TR is the nearest
    ``RepetitionTime`` (none when a nearer file gives ``VolumeTiming``: a sparse run): e.g.
    ``sub-01/ses-1/func/sub-01_ses-1_task-rest_bold.json``, else
    ``sub-01/ses-1/sub-01_ses-1_task-rest_bold.json``, ``sub-01/sub-01_task-rest_bold.json``,
    ``task-rest_bold.json``. BIDS allows one applicable file per folder; datasets that keep a
    general and a specific one side by side mean the specific one, so within a folder the file
    naming more entities (``task-rest_acq-fast_bold.json``) is taken as the nearer. A run whose
    name is not a BIDS name has only its own ``<name>.json``.

    ``listings`` (a dict kept over one cohort's subjects) holds each folder's sidecars once
    listed: the dataset root is every subject's ancestor, and holds every subject's folder.
    """
    bold = Path(os.path.abspath(bold))
    name = _bids_name(bold.name)
    if name is None:
        own = bold.with_name(bold.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        return (own if own.is_file() else None), []
    entities, suffix = name
    top = Path(os.path.abspath(root)) if root is not None else _dataset_root(bold)
    inside = bold.parent.relative_to(top).parts if bold.parent.is_relative_to(top) else None
    folders = [bold.parent] if inside is None else [top.joinpath(*inside[:i]) for i in range(len(inside) + 1)]
    for folder in reversed(folders):  # nearest first
        applies = []
        key = (folder, suffix)
        found = listings.get(key) if listings is not None else None
        if found is None:
            found = sorted(folder.glob(f"*_{suffix}.json"))
            if listings is not None:
                listings[key] = found
        for f in found:
            meta_name = _bids_name(f.name)
            if meta_name is not None and meta_name[1] == suffix and meta_name[0].items() <= entities.items():
                applies.append((len(meta_name[0]), f.name, f))
        deciding = sorted(a for a in applies if _sets_timing(a[2]))
        if deciding:
            n, _, used = deciding[-1]
            rivals = [f.name for m, _, f in deciding[:-1] if m == n]
            notes = [f"{', '.join(rivals)} and {used.name} in {folder} apply to {bold.name}; used "
                     f"{used.name}'s RepetitionTime (BIDS allows one per folder: merge them)"] if rivals else []
            return used, notes
    return None, []


def _bids_images(folder: Path, suffix: str) -> tuple[list[Path], list[str]]:
    """The BIDS images ``folder/*_<suffix>.nii[.gz]``, and the names of the files that only look
    like one (:data:`IMAGE_ENDINGS`; also macOS's ``._`` resource copies): never taken, since a
    backup picked as the scan would convert the wrong data or fail with wrong advice."""
    endings = tuple(f"_{suffix}{end}" for end in IMAGE_ENDINGS)
    images, others = [], []
    for f in sorted(folder.glob(f"*_{suffix}.nii*")):
        if f.name.endswith(endings) and not f.name.startswith("."):
            images.append(f)
        else:
            others.append(f.name)
    return images, others


def _entities(path: Path) -> dict[str, str]:
    """The BIDS entities of a file's name (``sub-01_task-rest_bold.nii.gz`` -> ``{"sub": "01",
    "task": "rest"}``); empty for a name that is not a BIDS name."""
    name = _bids_name(path.name)
    return {} if name is None else name[0]


def _task(run: Path) -> str | None:
    """The BIDS task label of a BOLD run's file name (``sub-01_task-rest_bold.nii.gz`` -> ``rest``),
    None when the name states none."""
    return _entities(run).get("task")


def _wanted(task: str | None, bold_task: str | None) -> bool:
    """Whether runs of ``task`` are the ones to use: ``bold_task`` (any case) when given, else a
    resting-state task (:data:`REST_TASK`)."""
    if task is None:
        return False
    if bold_task:
        return task.lower() == bold_task.lower()
    return REST_TASK in task.lower() or task.lower() in REST_ABBREVIATIONS


SHOWN_NAMES = 3
"""File names listed in one message before "and N more"."""


def _names(files: list[Path] | list[str]) -> str:
    """File names for a message: the first :data:`SHOWN_NAMES`, then how many more."""
    names = [f if isinstance(f, str) else f.name for f in files]
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


def bold_refusal(runs: list[Path], bold_task: str | None) -> str | None:
    """Why none of a subject's BOLD ``runs`` is taken (what was found and how to take one), None
    when one is of the task wanted (:func:`_wanted`) or ``runs`` is empty."""
    if not runs or any(_wanted(_task(r), bold_task) for r in runs):
        return None
    tasks = sorted({t for t in map(_task, runs) if t is not None})
    found = f"{_names(runs)} ({'task ' + ', '.join(tasks) if tasks else 'no task label'})"
    if bold_task:
        return (f"no BOLD run of task {bold_task!r} (--bold-task); its runs: {found}; pass the task label of the "
                "runs to use, or leave --bold-task out to use resting-state runs")
    take = f"convert with --bold-task {tasks[0]} to use that task's runs, or " if tasks else ""
    return (f"its BOLD runs are not resting-state: {found}; MASAN models resting-state fMRI, a run whose task "
            f"label contains {REST_TASK!r} (task-rest, task-resting): if one of them is a resting-state run, "
            f"{take}rename it (and its JSON sidecar) to task-rest")


class _Found(NamedTuple):
    """A (session) folder's images as :func:`_bids_files` chose them."""

    t1: Path | None
    bold: Path | None
    notes: list[str]
    bold_refused: str | None
    """:func:`bold_refusal` of its BOLD runs."""


def _bids_files(folder: Path, bold_task: str | None = None) -> _Found:
    """The T1w image and the BOLD run of ``bold_task`` (None: resting-state; a run whose name
    states no task only when no run does) in ``folder/anat`` and ``folder/func``, the first in
    natural order when several; notes on each choice and on look-alike files left out."""
    t1s, odd = _bids_images(folder / "anat", "T1w")
    runs, odd_runs = _bids_images(folder / "func", "bold")
    t1, notes = _pick(t1s, "T1w")
    usable = [r for r in runs if _wanted(_task(r), bold_task)]
    if not usable and not bold_task:  # not a BIDS name (BIDS requires the task): cannot tell, take it
        usable = [r for r in runs if _task(r) is None]
        notes += [f"{_names(usable)}: no task label read from the name (BIDS names are entity-label pairs of "
                  "letters and digits joined by '_'); used as resting-state"] if usable else []
    bold, more = _pick(runs, "BOLD", usable)
    left = sorted({t for r in runs if r not in usable and (t := _task(r)) is not None})
    if bold is not None and left:
        more = [f"{note} (task {', '.join(left)} left out: not {'the --bold-task' if bold_task else 'resting-state'})"
                for note in more]
    if odd or odd_runs:
        n = len(odd + odd_runs)
        notes.append(f"ignored {n} file{'s' if n > 1 else ''} in {folder.name} that only look like images "
                     f"({_names(odd + odd_runs)}): BIDS images are named *_T1w.nii[.gz], *_bold.nii[.gz]")
    return _Found(t1, bold, notes + more + _space_note(t1, bold), None if bold else bold_refusal(runs, bold_task))


def _space_note(t1: Path | None, bold: Path | None) -> list[str]:
    """A note when the T1 and the BOLD run chosen name different ``space-`` entities (an
    fMRIPrep derivatives folder passed as --bids: native T1 beside a template-space BOLD)."""
    spaces = [_entities(f).get("space") for f in (t1, bold) if f is not None]
    if len(spaces) < 2 or spaces[0] == spaces[1]:
        return []
    return [f"{t1.name} and {bold.name} lie in different spaces ({spaces[0] or 'native'} vs {spaces[1] or 'native'}): "
            "--bids takes raw BIDS data; for preprocessed derivatives list the files in a manifest (--manifest)"]


def _named_elsewhere(found: _Found, sid: str, folder: Path) -> tuple[Path, str] | None:
    """(file, why) when the images chosen in ``folder`` (``sid``'s, or one of its session folders) cannot be
    taken as this subject's visit: a file whose ``sub-``/``ses-`` entity names another subject or
    session (copied into the wrong folder, it would convert another scan under this diagnosis)."""
    session = folder.name if folder.name.startswith("ses-") else None
    for f in (found.t1, found.bold):
        entities = _entities(f) if f is not None else {}
        wrong = [f"{k}-{entities[k]}" for k, own in (("sub", sid), ("ses", session))
                 if k in entities and own is not None and f"{k}-{entities[k]}" != own]
        if wrong:
            return f, (f"{f} is named for {' '.join(wrong)} but lies in {folder}: a file copied into the wrong "
                       "folder would convert another subject's or visit's scan under this one's diagnosis; move it "
                       "to its own folder, or rename it if it is this one's")
    return None


def discover_bids(bids: str | Path, label_column: str = "diagnosis", session: str | None = None,
                  bold_task: str | None = None, label_source: str | None = None) -> list[SubjectSource]:
    """Subjects of a BIDS folder: participants.tsv (participant_id + ``label_column``) and
    ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, ``func/*_bold.nii[.gz]`` (other files, such as
    ``*_T1w.nii.gz.bak``, are left out with a note).

    With sessions, ``session`` (e.g. ``bl`` or ``ses-bl``) picks one; otherwise the first
    session (:func:`natural` order) holding both modalities is used, else the first session. BOLD runs are
    the resting-state ones (:data:`REST_TASK`), or those of ``bold_task`` when given; a subject
    with BOLD runs but none of those gets :attr:`SubjectSource.fmri_refused`. With several
    runs, the first in natural order; the choice is noted. Refused (ConvertError): a table with
    ``participant_id`` or ``label_column`` twice, or a field over several lines.

    The diagnosis is read from participants.tsv's ``label_column``, or, with ``label_source``
    ``"sessions"``, from each subject's sessions table (``sub-01/sub-01_sessions.tsv``: the row of
    the session converted), as ADNI's BIDS converters write the diagnosis of each visit there.
    ``label_source`` None: participants.tsv when it has the column, else the sessions tables when
    one has it. Reading participants.tsv, a visit whose sessions-table diagnosis is another is noted.
    """
    bids = Path(bids)
    if not bids.is_dir():
        raise ConvertError(_not_bids_folder(bids))
    table = bids / "participants.tsv"
    if not table.is_file():
        if (bids / SYNTH_STAGING).is_dir():
            raise ConvertError(f"{table} not found, and {bids / SYNTH_STAGING} is there: data_tools/synth_cohort.py "
                               "was stopped while writing this cohort; run it again (the same command)")
        raise ConvertError(f"{table} {_absence(table) if table.is_symlink() else 'not found'}; a BIDS folder needs "
                           f"participants.tsv with participant_id and a {label_column!r} column"
                           + (" (participants.csv is there: BIDS wants the table tab-separated, as participants.tsv)"
                              if (bids / "participants.csv").is_file() else ""))
    sep = "\t"
    cols, rows = _read_table(table, sep)
    twice = [c for c in ("participant_id", label_column) if cols.count(c) > 1]
    if twice:
        raise ConvertError(f"{table} has the column {twice[0]!r} {cols.count(twice[0])} times (columns {cols}): only "
                           "the last would be read, and a table pasted from two may pair its ids with another "
                           "table's rows; keep one column of each name")
    visits = label_source == "sessions" or (label_source is None and label_column not in cols
                                             and _sessions_have(bids, label_column))
    if "participant_id" not in cols or (label_column not in cols and not visits):
        near = [c for c in cols if c.strip().lower() in ("participant_id", label_column.lower())
                and c not in ("participant_id", label_column)]
        hint = (f" ({', '.join(map(repr, near))} differs only in case or spaces: BIDS column names are exact)"
                if near else "")
        needs = "participant_id" if visits else f"participant_id and {label_column!r}"
        raise ConvertError(f"{table} has columns {cols}{_delimiter_hint(cols, sep)}{hint}; it needs {needs} "
                           f"(pick the label column with --label-column{_sessions_hint(bids, label_column)})")
    _check_participant_ids(bids, table, rows)
    want = None if not session else session if session.startswith("ses-") else f"ses-{session}"
    sources = []
    found_sessions: set[str] = set()
    listings: dict = {}  # the sidecars' folders, each listed once: the root holds every subject's folder
    for i, r in rows:
        sid = (r["participant_id"] or "").strip()
        sources.append(_bids_subject(bids, sid, want, session, found_sessions, _label(r.get(label_column)),
                                     f"participants.tsv row {i}", table, bold_task, listings))
    listed = {s.subject for s in sources}
    for folder in sorted(bids.glob("sub-*")):
        if folder.is_dir() and folder.name not in listed:
            sources.append(_bids_subject(bids, folder.name, want, session, found_sessions, None,
                                         f"folder {folder} (not in participants.tsv)", None, bold_task, listings))
    for s in sources:
        if SAFE_ID.fullmatch(s.subject):  # an unsafe id names no folder of the cohort (it fails its check)
            s.visit = _visit(bids, s.subject, s.session, label_column)
            s.labels_from_visits = visits
            if visits:
                s.label = s.visit.label
    if want and want not in found_sessions:
        fix = (f"its sessions are {', '.join(sorted(found_sessions))}: pass one of those" if found_sessions else
               "the cohort has no session folders (sub-*/ses-*): leave --session out")
        raise ConvertError(f"--session {session}: no subject in {bids} has a {want} folder; {fix}")
    return sources


SESSIONS_TABLE = "{subject}_sessions.tsv"
"""A subject's BIDS sessions table, in its folder: ``session_id`` and per-visit columns."""


def _sessions_tables(bids: Path) -> list[Path]:
    return sorted(p for p in bids.glob("sub-*/sub-*_sessions.tsv") if p.name == SESSIONS_TABLE.format(
        subject=p.parent.name))


def _header(table: Path) -> list[str]:
    """The column names of a tab-separated table ([] when it cannot be read as UTF-8 text)."""
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter="\t"), [])
    except (OSError, UnicodeDecodeError):
        return []


def _sessions_have(bids: Path, column: str) -> bool:
    """Whether a subject's sessions table of ``bids`` has the column ``column``."""
    return any(column in _header(t) for t in _sessions_tables(bids))


def _sessions_hint(bids: Path, column: str) -> str:
    """What the sessions tables say of ``column``, for a participants.tsv without it."""
    found = _sessions_tables(bids)
    if not found:
        return ""
    if any(column in _header(t) for t in found):
        return f"; the subjects' sessions tables have {column!r}: pass --label-source sessions to read each visit's"
    return f"; nor do the subjects' sessions tables have it, e.g. {found[0]} has {_header(found[0])}"


def _visit(bids: Path, sid: str, session: str | None, column: str) -> Visit:
    """The row of ``sid``'s sessions table for ``session`` (the session folder converted)."""
    table = bids / sid / SESSIONS_TABLE.format(subject=sid)
    where = f"{sid}/{table.name}"
    if session is None:
        return Visit(None, where, None, "its images are in no session folder, so no row of a sessions table is their "
                     "visit's: move them into their visit's ses-<label> folder")
    if not table.is_file():
        return Visit(None, where, None, f"{where} {_absence(table) if table.is_symlink() else 'not found'}: its "
                     f"diagnosis is read from its sessions table (session_id and {column!r} columns); write it")
    sep = "\t"
    try:
        cols, rows = _read_table(table, sep)
    except ConvertError as e:
        return Visit(None, where, table, str(e))
    except OSError as e:  # e.g. a table only its owner may read: a problem of this subject, not of the run
        return Visit(None, where, table, f"{where} cannot be read ({e.strerror}); make it readable")
    if "session_id" not in cols or column not in cols:
        return Visit(None, where, table, f"{where} has columns {cols}{_delimiter_hint(cols, sep)}; it needs "
                     f"session_id and {column!r}")
    rows = [(i, r) for i, r in rows if (r["session_id"] or "").strip() in (session, session.removeprefix("ses-"))]
    if len(rows) != 1:
        shown = f"rows {', '.join(str(i) for i, _ in rows)}" if rows else "no row"
        fix = "keep one" if rows else "add the visit's diagnosis"
        return Visit(None, where, table, f"{where} has {shown} for {session}, the session converted; {fix}")
    i, r = rows[0]
    return Visit(_label(r.get(column)), f"{where} row {i}", table)


def _not_bids_folder(bids: Path) -> str:
    """Why --bids ``bids`` (not a folder) is refused, and what to pass instead: checked before
    participants.tsv, whose "not found" would hide a typo or a file given for its folder."""
    if not bids.exists():
        return f"--bids {bids} does not exist; pass the BIDS folder (the one holding participants.tsv)"
    if bids.name == "participants.tsv":
        fix = f"pass its folder: --bids {bids.parent}"
    elif bids.suffix.lower() == ".csv":
        fix = "for a CSV manifest use --manifest"
    else:
        fix = "pass the folder holding participants.tsv"
    return f"--bids {bids} is a file, not the BIDS folder; {fix}"


def _bids_subject(bids: Path, sid: str, want: str | None, session: str | None, found_sessions: set[str],
                  label: str | None, origin: str, table: Path | None, bold_task: str | None,
                  listings: dict | None = None) -> SubjectSource:
    """One subject's files in the BIDS folder (the session ``want``, else the first holding both
    modalities); the sessions it has join ``found_sessions``."""
    if not sid:  # an empty participant_id: fails in check_sources as an unsafe id, naming the row
        return SubjectSource(sid, label, None, None, origin, table=table)
    folder = bids / sid
    notes: list[str] = []
    files = functools.cache(lambda f: _bids_files(f, bold_task))  # a folder's choice, looked at once
    sessions = sorted((p for p in folder.glob("ses-*") if p.is_dir()), key=natural)
    found_sessions.update(p.name for p in sessions)
    if sessions:
        outside = [f for f in files(folder)[:2] if f is not None]
        if outside:
            notes.append(f"{_names(outside)} outside its session folders left out: a subject's images are taken "
                         "from one session folder (move them into the session of their visit)")
    if sessions and want:
        if not (folder / want).is_dir():  # fails in check_sources as a subject without images
            notes.append(f"no {want} folder; its sessions: {', '.join(p.name for p in sessions)}")
        folder = folder / want
    elif sessions:
        full = [p for p in sessions if files(p).t1 and files(p).bold]
        folder = (full or sessions)[0]
        if len(sessions) > 1:
            notes.append(f"{len(sessions)} sessions; used {folder.name} (choose with --session)")
    elif want and folder.is_dir():
        notes.append(f"no session folders; used its files outside sessions (--session {session} not applied)")
    found = files(folder)
    sidecar, tr_notes = bold_sidecar(found.bold, bids, listings) if found.bold else (None, [])
    other = _sessions_holding(sessions, folder, files) if not (found.t1 and found.bold) else {}
    return SubjectSource(sid, label, found.t1, found.bold, origin, notes + found.notes + tr_notes, sidecar, table,
                         folder.name if sessions else None, found.bold_refused, other,
                         _named_elsewhere(found, sid, folder))


def _sessions_holding(sessions: list[Path], used: Path, files: Callable[[Path], _Found]
                      ) -> dict[str, tuple[str, ...]]:
    """Session folder name -> the modalities it holds (``files``: a folder's :func:`_bids_files`),
    for a subject's sessions other than ``used`` that hold any image."""
    held = {}
    for p in sessions:
        if p == used:
            continue
        found = files(p)
        has = tuple(m for m, f in (("t1", found.t1), ("fmri", found.bold)) if f)
        if has:
            held[p.name] = has
    return held


def _elsewhere(s: SubjectSource, missing: list[str]) -> str:
    """Where a subject's ``missing`` modalities are instead (its other sessions), and what to do:
    --session picks one session for every subject, so it helps only where a session holds both."""
    where = [f"its {m} is in {', '.join(ses for ses, has in s.other_sessions.items() if m in has)}"
             for m in missing if any(m in has for has in s.other_sessions.values())]
    if not where:
        return ""
    both = [ses for ses, has in s.other_sessions.items() if set(has) >= set(MODALITIES)]
    if both:
        return f" ({'; '.join(where)}; {both[0]} holds both: pick it with --session {both[0].removeprefix('ses-')})"
    return (f" ({'; '.join(where)}, and no session holds both: a subject's images are taken from one session, "
            "so if they are of the same visit move them into one session folder)")


def _check_participant_ids(bids: Path, table: Path, rows: list[tuple[int, dict]]) -> None:
    """ConvertError when participant_id values lack BIDS's ``sub-`` prefix, or differ from their
    folder's name only in case (``SUB-01``, folder ``sub-01``): otherwise every such subject
    would fail twice (no images for the row, no label for the folder) with advice that fixes
    neither."""
    folders = {p.name.casefold(): p.name for p in bids.glob("*") if p.is_dir()}
    bare, cased = [], []
    for i, r in rows:
        sid = (r["participant_id"] or "").strip()
        if not sid or (bids / sid).is_dir():
            continue
        if (bids / f"sub-{sid}").is_dir():
            bare.append((i, sid, f"sub-{sid}"))
        elif sid.casefold() in folders:
            cased.append((i, sid, folders[sid.casefold()]))
    for found, what, fix in (
            (bare, "lack the 'sub-' prefix", "BIDS participant_id values are sub-<label>, the subject's folder name"),
            (cased, "differ from their folder's name in upper/lower case",
             "BIDS names are case-sensitive: participant_id must be the subject's folder name exactly")):
        if found:
            shown = ", ".join(f"row {i} {sid!r} (folder {name})" for i, sid, name in found[:SHOWN_NAMES])
            more = f" and {len(found) - SHOWN_NAMES} more" if len(found) > SHOWN_NAMES else ""
            raise ConvertError(f"{table}: {len(found)} participant_id value(s) {what} ({shown}{more}); {fix}: "
                               f"write e.g. {found[0][2]} in the participant_id column and rerun")


def planted_effect(bids: str | Path) -> dict | None:
    """The synthetic cohort's planted-effect record (``planted_effect.json``), if any."""
    p = Path(bids) / PLANTED_EFFECT_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def parse_label_map(text: str | None, classes: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``"CN=NC,Dementia=AD"`` -> mapping (upper-cased keys); classes and ADNI aliases included.
    ConvertError for a class named twice (labels match case-insensitively, and the store's class
    list would hold it twice) or a label the tables read as "no diagnosis"."""
    twice = sorted(c for c, n in Counter(c.upper() for c in classes).items() if n > 1)
    if twice:
        raise ConvertError(f"classes {list(classes)} name {', '.join(twice)} more than once (case-insensitively); "
                           "give each class once, in order")
    mapping = {c.upper(): c for c in classes}
    mapping.update({k: v for k, v in ADNI_ALIASES.items() if v in classes})
    given: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise ConvertError(f"label map entry {item!r} must look like RAW=CLASS (e.g. CN=NC)")
        raw, cls = (s.strip() for s in item.split("=", 1))
        if raw.lower() in MISSING_LABEL:
            raise ConvertError(f"label map {item!r}: {raw!r} means no diagnosis in participants.tsv and manifests "
                               "(left empty, or stored unlabeled with --allow-unlabeled); write the diagnosis "
                               "in the table instead")
        if cls not in classes:
            raise ConvertError(f"label map {item!r}: {cls!r} is not one of the classes {list(classes)}")
        if raw.upper() in given and given[raw.upper()] != cls:
            raise ConvertError(f"label map maps {raw!r} twice ({given[raw.upper()]} and {cls}; labels match in any "
                               "case); give each raw label one class")
        own = next((c for c in classes if c.upper() == raw.upper()), None)
        if own is not None and own != cls:
            raise ConvertError(f"label map {item!r}: {own} is one of the classes, and would be left without subjects; "
                               f"to merge it into {cls}, leave it out of --classes as well")
        given[raw.upper()] = mapping[raw.upper()] = cls
    return mapping


def check_sources(sources: list[SubjectSource], label_map: dict[str, str], require: tuple[str, ...],
                  allow_unlabeled: bool = False) -> tuple[list[Job], list[Failure]]:
    """Per-subject checks before any voxel is read; every bad subject becomes a Failure.
    ``allow_unlabeled``: a subject without a diagnosis (:data:`MISSING_LABEL`) becomes a Job with label
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
        if not SAFE_ID.fullmatch(s.subject):
            fail(f"subject id {s.subject!r} is not a safe name; use 1-64 letters, digits, '-' or '_' "
                 "(starting with a letter or digit)")
            continue
        visit = s.visit if s.visit is not None and s.labels_from_visits else None
        if visit is not None and visit.problem:
            fail(visit.problem, visit.table)
            continue
        if s.label is None and not allow_unlabeled:
            where = visit.where if visit else "a row in participants.tsv / the manifest"
            fail(f"has no label; fill in its diagnosis ({where}), or convert with --allow-unlabeled to store it "
                 "for prediction only")
            continue
        cls = None if s.label is None else label_map.get(s.label.upper())
        if cls is None and s.label is not None:
            read = f" ({visit.where})" if visit else ""
            fail(f"label {s.label!r}{read} is not a known class; known labels {sorted(label_map)}; "
                 f"{_label_fix(s.label)}")
            continue
        if s.misplaced is not None:
            fail(s.misplaced[1], s.misplaced[0])
            continue
        notes = s.notes + _visit_differs(s, cls, label_map)
        if s.label is None and s.table is None and s.origin.startswith("folder ") and visit is None:
            notes = notes + ["not in participants.tsv: stored unlabeled (if it is listed under another id, e.g. "
                             "without zero padding, write its folder's name there)"]
        if s.fmri_refused is not None:
            if "fmri" in require or s.t1 is None:
                t1_only = "; or convert with --require t1 to store its T1 without fMRI" if s.t1 is not None else ""
                fail(s.fmri_refused + t1_only)
                continue
            notes = notes + [f"stored without fMRI: {s.fmri_refused}"]
        files = {"t1": s.t1, "fmri": s.fmri}
        missing = [m for m in require if files[m] is None]
        absent = [(m, f) for m, f in {**files, "fMRI sidecar": s.fmri_sidecar}.items()
                  if f is not None and not f.is_file()]
        if not any(files.values()):  # no --require value accepts it: say what can work
            why = f" ({'; '.join(s.notes)})" if s.notes else ""
            where = f"its row from {s.table.name}" if s.table is not None else "it from the input"
            fail(f"has no t1 and no fmri file{why}; a subject needs at least one image: add its images, "
                 f"or remove {where}")
            continue
        if missing:
            where = f" in {s.session}{_elsewhere(s, missing)}" if s.session else ""
            where += f" ({'; '.join(s.notes)})" if s.notes else ""
            fail(f"has no {' and no '.join(missing)} file{where}; add it, or convert with --require "
                 f"{' '.join(m for m in MODALITIES if m not in missing)} to allow this (--require none: every "
                 "subject with the images it has)")
            continue
        if absent:
            m, f = absent[0]
            fail(f"{m} file {f} {_absence(f)}", f)
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
        jobs.append(Job(s.subject, cls, paths, notes))
    return jobs, failures


def _visit_differs(s: SubjectSource, cls: str | None, label_map: dict[str, str]) -> list[str]:
    """A note when participants.tsv's diagnosis (class ``cls``) is not the one its sessions table
    states for the visit converted: ADNI diagnoses change between visits (MCI at baseline, AD at
    month 24), and the images are that visit's."""
    v = s.visit
    if s.labels_from_visits or cls is None or v is None or v.problem or v.label is None:
        return []
    if label_map.get(v.label.upper(), v.label) == cls:
        return []
    return [f"labelled {cls} as participants.tsv says, while {v.where} says {v.label} for {s.session}, the visit its "
            "images are from (pass --label-source sessions to label each subject by its visit)"]


def _absence(path: Path) -> str:
    """Why a listed file cannot be read, and the fix: a broken symbolic link is most often a
    DataLad / git-annex file whose content was never fetched."""
    if path.is_symlink():
        return (f"is a symbolic link to {os.readlink(path)}, which does not exist: if the dataset is a DataLad or "
                "git-annex one, fetch its content (`datalad get` or `git annex get`), else fix the link")
    return "does not exist; fix the path"


def _label_fix(label: str) -> str:
    """How to fix a label that is no class: map it; for one that spells a default class (or an
    ADNI alias of one) that --classes left out, adding that class back is a fix too."""
    raw = label.strip().upper()
    default = next((c for c in DEFAULT_CLASSES if c.upper() == ADNI_ALIASES.get(raw, raw)), None)
    mapped = "map it with --label-map RAW=CLASS"
    if default:
        return f"add {default} to --classes to keep it as a class, {mapped}, or fix the table"
    return f"{mapped} or fix the table"


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
