"""The order names are listed in where they carry numbers: numbers compared as numbers.

Scanners and ADNI number visits and runs (``ses-M12`` before ``ses-M108``, ``run-2`` before
``run-10``), and repeats are named ``repeat_2`` before ``repeat_10``: plain string order puts them
the wrong way round. Used where a choice or a listing follows the order (the session and run a
conversion takes, the rows of ``launch/status.py``).
"""

from __future__ import annotations

import re
from pathlib import Path


def natural(path: Path) -> tuple[list, str]:
    """Sort key of a file or folder name with its numbers compared as numbers (``run-2`` before
    ``run-10``, ``ses-M12`` before ``ses-M108``): the order scanners and ADNI number visits in."""
    tokens = [(0, int(t), "") if t.isascii() and t.isdigit() else (1, 0, t) for t in re.split(r"([0-9]+)", path.name)]
    return tokens, path.name  # ses-1 and ses-01 tie on numbers: the name decides, not the listing


def natural_path(path: Path) -> list[tuple[list, str]]:
    """Sort key of a whole path: :func:`natural` of each of its components in turn."""
    return [natural(Path(part)) for part in path.parts]
