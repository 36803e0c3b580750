"""Time left of a training run: steps left times the recent median seconds per step, and its text.

One formula for both places that show it: the training loop's log line
(:mod:`masan.train.loop`, from the intervals it timed) and the status table
(:mod:`launch.run_status`, from a run's TensorBoard events). Standard library only, so the
status table imports it without torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

ETA_INTERVALS = 10
"""Logged intervals whose median step time gives the ETA: the recent speed, and a median so that
one slow interval (a restart, the first step's compile, an epoch end's evaluation and save)
does not dominate it."""


def epoch_fraction(consumed: int, n: int, per_step: int) -> float:
    """How far through its epoch a position of ``consumed`` samples is, 0 to 1, counted over the
    samples whole optimizer steps use (``n // per_step * per_step`` of the ``n`` training
    subjects; the rest rotate out of the epoch): its last step reads 1, not 6/7 when one of 7
    subjects rotates out, so the epoch column and the ETA from it are right."""
    usable = (n // per_step) * per_step if per_step > 0 else n
    return min(1.0, consumed / usable) if usable > 0 else 0.0


def eta_seconds(step_seconds: Sequence[float], steps_left: float) -> float | None:
    """Seconds until ``steps_left`` more optimizer steps are done.

    Args:
        step_seconds: seconds per optimizer step of each logged interval, oldest first (only
            the last :data:`ETA_INTERVALS` count).
        steps_left: optimizer steps still to run (negative counts as 0).

    Returns:
        ``steps_left`` x the median of the recent seconds per step; None before any interval.
    """
    recent = list(step_seconds)[-ETA_INTERVALS:]
    if not recent:
        return None
    return max(0.0, steps_left) * statistics.median(recent)


def duration_text(seconds: float | None) -> str:
    """``seconds`` in two units at most: ``42s``, ``5m03s``, ``1h52m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
