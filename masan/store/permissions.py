"""Who may read a cohort store: the sources' most restrictive permissions unless shared on purpose.

Cohort data come under data-use agreements, so a store must never be more readable than the
files it was made from (the NIfTI files, their sidecars and the table of labels: the store
holds every subject's diagnosis), whatever the converting user's umask. The
rules themselves (modes, umask, applying to a tree) are in :mod:`masan.access`; this module
decides the store's target from its sources, ``--mode``/``--group`` and what an earlier
conversion recorded in the root attributes (``access``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from masan import access


@dataclass
class StoreAccess:
    """Who may read the store (``--mode``/``--group``); by default no more than its sources."""

    mode: int | None = None
    """File mode for everything in the store (folders get x where r), e.g. 0o640 to share
    with the group on purpose; None: the most restrictive mode among the sources."""
    group: int | None = None
    """Group id for the store; None: the group the sources share (if any)."""


def source_paths(files: list[Path]) -> list[Path]:
    """Every source file and the folders from it up to the sources' common folder: a file
    readable by all inside a folder only its owner can enter or list is readable by its owner
    only. (The folders above, and those on the way to a symbolic link's target, count too:
    :func:`masan.access.restrictive_mode` looks at every folder on the way.)"""
    if not files:
        return []
    top = Path(os.path.commonpath([f.parent for f in files]))
    folders = set()
    for f in files:
        for d in f.parents:
            folders.add(d)
            if d == top:
                break
    return files + sorted(folders)


def target_access(out: Path, sources: list[Path], wanted: StoreAccess, tables: list[Path] = ()
                  ) -> tuple[int, int | None, str]:
    """(file mode, gid, how chosen) for the store from its image ``sources`` and the label
    ``tables`` (participants.tsv, a manifest; each with its own folder, wherever it lies: the
    folders between a manifest in a home folder and the images are none of theirs, though the
    folders on the way to the manifest are: labels only its owner may reach are the owner's); a store
    made from restricted sources in an earlier run stays at least as closed unless ``--mode``
    says otherwise."""
    if wanted.mode is not None:
        return wanted.mode, wanted.group, "--mode"
    mode, gid = access.restrictive_mode(source_paths(sources) + [p for t in tables for p in source_paths([t])])
    try:
        before = json.loads((out / "zarr.json").read_text())["attributes"].get("access", {})
    except (OSError, ValueError, KeyError):
        before = {}
    if before.get("chosen_by") == "sources":
        mode &= int(before["file_mode"], 8)
        gid = gid if gid == before.get("gid") else None
    if gid is None:
        mode &= ~0o070
    return mode, wanted.group if wanted.group is not None else gid, "sources"
