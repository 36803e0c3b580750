"""The files of one report folder (``python -m masan.evaluate --out DIR``): which of them the
report tool wrote, so that a rerun replaces its own earlier report whole, and never anything else.

A report must not mix two evaluations (a region map of a subject from an earlier run set beside
a new table reads as this report's), nor look finished while it is written. So:

1. :meth:`ReportFolder.begin` writes ``INCOMPLETE`` before any other file: while it exists
   the folder is being written, or the tool was stopped (Ctrl-C, a crash) part way and the
   files may mix this report with an earlier one; rerunning the same command completes it;
2. every file goes in atomically (:mod:`masan.files`) and is recorded at once in the folder's
   list of the tool's files (:data:`MANIFEST_NAME`, JSON: paths relative to the folder), which
   keeps the earlier report's files until the end, so that a run stopped part way still lists
   everything a rerun must replace;
3. :meth:`ReportFolder.finish` removes the listed files this report did not write again, lists
   only this report's files, and removes ``INCOMPLETE`` last.

Only listed files are ever removed: a user's own files in ``--out`` stay, and so do the files
of a report written before the list existed (rerun into a new folder to leave none behind).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from masan.files import atomic_write_json, atomic_write_text, remove_stale_temporaries

MANIFEST_NAME = ".masan_evaluate_files.json"
"""The list of the files the report tool wrote into the folder (relative paths)."""
INCOMPLETE_NAME = "INCOMPLETE"
"""Present while a report is written, and after a run that stopped before it finished."""
INCOMPLETE_TEXT = (
    "python -m masan.evaluate is writing this report, or was stopped before it finished: the files here may "
    "mix this report with an earlier one. Rerun the same command (the same --out) to complete it; this file "
    "is removed when a report is complete.\n"
)


class ReportFolder:
    """Writes one report into ``root`` (see the module docstring); ``record`` each file written."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._earlier: list[str] = []
        self._now: list[str] = []
        self.state = "untouched"
        """``"untouched"`` (nothing written yet), ``"writing"`` or ``"complete"``."""

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def incomplete(self) -> Path:
        return self.root / INCOMPLETE_NAME

    def own_files(self) -> list[Path]:
        """The tool's bookkeeping files, for callers that set access modes on what was written."""
        return [self.manifest, self.incomplete]

    def _listed(self) -> list[str]:
        """The relative paths the folder's list names (none for a missing or unreadable list:
        then nothing is known to be the tool's, and nothing is removed)."""
        try:
            names = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def begin(self) -> None:
        """Create the folder and ``INCOMPLETE`` (the first file written), read the earlier list."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, *(d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink())):
            remove_stale_temporaries(folder)  # of a report killed mid-write
        self.state = "writing"
        atomic_write_text(self.incomplete, INCOMPLETE_TEXT)
        self._earlier = self._listed()

    def _save_list(self, names: list[str]) -> None:
        atomic_write_json(self.manifest, sorted(dict.fromkeys(names)))

    def record(self, path: str | os.PathLike) -> Path:
        """Note ``path`` (a file under the folder, just written) as this report's; returns it."""
        p = Path(path)
        self._now.append(p.relative_to(self.root).as_posix())
        self._save_list(self._earlier + self._now)
        return p

    def _inside(self, name: str) -> Path | None:
        """The listed file ``name`` if it is a plain file under the folder, reached through no
        symbolic link (a hand-edited list, or a subfolder replaced by a link, must not reach files
        elsewhere), else None."""
        p = self.root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None
        if any((self.root / part).is_symlink() for part in _prefixes(Path(name))) or not p.is_file():
            return None
        return p

    def finish(self) -> list[Path]:
        """Remove the earlier report's files this one did not write again, keep the list of this
        report's files, remove ``INCOMPLETE``. Returns the files removed."""
        now = set(self._now)
        removed = []
        for name in dict.fromkeys(self._earlier):
            p = None if name in now else self._inside(name)
            if p is not None:
                p.unlink()
                removed.append(p)
        for folder in {p.parent for p in removed} - {self.root}:
            if not any(folder.iterdir()):  # a figures/ left empty holds nothing of anyone's
                folder.rmdir()
        self._save_list(self._now)
        self.incomplete.unlink(missing_ok=True)
        self.state = "complete"
        return removed

    def left_behind(self) -> str:
        """What a report stopped part way (Ctrl-C, SIGTERM) left in the folder, for one line."""
        if self.state == "untouched":
            return f"nothing was written to {self.root}; rerun the same command"
        if self.state == "complete":
            return f"the report in {self.root} is complete"
        return (f"the report in {self.root} is incomplete ({self.incomplete} marks it): rerun the same command "
                "(the same --out) to complete it")


def _prefixes(name: Path) -> list[Path]:
    """``a``, ``a/b``, ``a/b/c`` of the relative path ``a/b/c``: every step from a folder down to it."""
    return [Path(*name.parts[: i + 1]) for i in range(len(name.parts))]
