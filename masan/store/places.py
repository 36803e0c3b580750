"""What a folder is: a training run directory or a cohort store (one definition for every tool).

A conversion rewrites and prunes its store, and a training run writes checkpoints into its
run directory; one nested in the other is destroyed or polluted by the other's tool, so
both tools refuse the nesting. A run directory is recognised by the
file ``masan.train.run`` writes first (``config.yaml``, a MASAN config) or that file beside
its ``checkpoints/`` folder (:func:`is_run_dir`);
a cohort store by its root ``zarr.json`` naming the MASAN store format. The tools that write
elsewhere (predictions, reports) keep out of both (:func:`output_folder_problem`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from masan.access import nearest_existing, write_refusal
from masan.rundir import RunDir

STORE_FORMAT = "masan-cohort-store"
"""``masan_store.format`` in a cohort store's root attributes (masan.store.cohort.FORMAT)."""


MASAN_CONFIG_SECTIONS = ("model:", "data:")
"""Top-level keys every saved MASAN config has (masan.config.config_to_dict)."""


def is_run_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a training run directory: its ``config.yaml`` beside a
    ``checkpoints/`` folder, or a ``config.yaml`` that is a MASAN config (a run that has
    not saved yet). Either marker alone is too common (a home folder's config.yaml) to count."""
    run = RunDir(path)
    config, checkpoints = run.config, run.checkpoints
    if not config.is_file():
        return False
    if checkpoints.is_dir():
        return True
    try:
        lines = config.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return all(any(line.startswith(key) for line in lines) for key in MASAN_CONFIG_SECTIONS)


def is_cohort_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is the root of a MASAN cohort store."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return isinstance(attrs, dict) and attrs.get("masan_store", {}).get("format") == STORE_FORMAT


def enclosing(path: str | os.PathLike, test) -> Path | None:
    """``path`` itself or its nearest ancestor for which ``test(folder)`` holds, else None."""
    p = Path(os.path.abspath(path))
    for folder in (p, *p.parents):
        if test(folder):
            return folder
    return None


def nested_inside(root: str | os.PathLike, test, depth: int = 3) -> list[Path]:
    """Folders below ``root`` (down to ``depth`` levels; a store's subject versions are at 3)
    for which ``test(folder)`` holds. Symlinks are not followed."""
    found, level = [], [Path(root)]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                children = [c for c in folder.iterdir() if c.is_dir() and not c.is_symlink()]
            except OSError:
                continue
            for c in children:
                (found if test(c) else nxt).append(c)
        level = nxt
    return sorted(found)


def output_folder_problem(out: str | os.PathLike, suggestion: str | os.PathLike, files: str) -> str | None:
    """Why ``out`` cannot be the output folder of a tool that writes ``files`` (e.g.
    ``"predictions.csv, region_weights.npy and metrics.json"``) into it, or None: an existing
    file, a folder in or of a cohort store or a training run (their own tools rewrite and prune
    them, and the run's own predictions.csv and metrics.json would be overwritten), a path
    below a file, a folder this user may not write. The message names ``--out`` and the fix,
    ``--out suggestion``. Symlinks are resolved, so a link into a store is refused like it."""
    out = Path(out)

    def outside(example) -> str:
        return f"pass a folder outside every store and run directory, e.g. --out {example}"

    fix = outside(suggestion)
    if out.exists() and not out.is_dir():
        return (f"--out {out} is an existing file; --out names a folder (new or existing) for {files}: "
                f"pass e.g. --out {suggestion}")
    real = out.resolve()
    for test, what, why in ((is_cohort_store, "the cohort store", "a store holds only what the converter writes "
                             "(a later conversion prunes anything else)"),
                            (is_run_dir, "the training run directory", f"writing {files} there would overwrite "
                             "the run's own files or mix files into it")):
        found = enclosing(real, test)
        if found is not None:
            if enclosing(Path(suggestion).resolve(), test) == found:  # a suggestion must not be refused again
                fix = outside(found.parent / f"{found.name}_{(out if real != found else Path(suggestion)).name}")
            return f"--out {out} is {'' if found == real else 'inside '}{what} {found}: {why}; {fix}"
    parent = nearest_existing(real)
    why = write_refusal(parent)
    if why:  # a folder beside it would be refused alike: the fix is another place
        return (f"--out {out} cannot be {'written' if parent.is_dir() else 'created'}: {why}; pass a folder you may "
                "write, e.g. one in your home or scratch folder")
    return None
