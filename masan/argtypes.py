"""argparse types for the tools' numeric, device and path options: a value out of its range, or a
device this machine lacks, is a usage error (argparse exits 2 naming the flag, what it takes and
the value given), never a silent nonsense run or a traceback from the first tensor moved; a path's
``~`` is expanded (a shell leaves it in ``--out=~/x``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def number(kind: type = int, low: float | None = None, high: float | None = None, *,
           above: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type``: ``kind(text)`` (int or float), finite, ``>= low``, ``<= high`` and
    ``> above`` where given, e.g. ``number(float, 0, 1)`` for a fraction."""
    if above is not None:
        wanted = f"a finite number above {above:g}"
    elif low is not None and high is not None:
        wanted = f"between {low:g} and {high:g}"
    elif low is not None:
        wanted = f"at least {low:g}"
    elif high is not None:
        wanted = f"at most {high:g}"
    else:
        wanted = "a finite number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
                and (above is None or value > above)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def torch_device(text: str) -> torch.device:
    """An argparse ``type`` for ``--device``: a ``torch.device`` this machine has (cpu, cuda,
    cuda:N). torch is imported only when the option is parsed: the data tools start without it."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} usable CUDA "
                                         "device(s); use cpu or one it has (nvidia-smi lists them)")
    return dev


def path(text: str) -> Path:
    """An argparse ``type`` for a path: ``~`` and ``~user`` expanded, as a shell does only at
    the start of a word (``--out ~/x``, not ``--out=~/x``, where a folder named ``~`` was made)."""
    return Path(text).expanduser()


def str_path(text: str) -> str:
    """:func:`path` as text, for options kept as strings (a config value, a run directory)."""
    return str(path(text))
