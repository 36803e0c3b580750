"""argparse types for the tools' numeric options: a value out of its range is a usage error
(argparse exits 2 naming the flag, the range and the value given), never a silent nonsense run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
