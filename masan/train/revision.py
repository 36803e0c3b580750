"""Changes of the training code that a resumed run adopts from its next step: what the
checkpoint's training revision says, and the warning a resume gives.

A config fingerprint says whether a checkpoint's settings still hold; it cannot say that the
code behind a setting changed. A run of hundreds of epochs spans versions of this project, and
its checkpoints resume under the newer code without a word: a change that alters what a given
config trains (a loss term's weighting, say) would then change the objective halfway through,
unseen. Each such change gets a :class:`Change` below with the next revision number; every
checkpoint records :data:`TRAINING_REVISION`, and a resume from an older one warns, naming
each change that applies to its config and the choice (finish under the new code knowingly, or
train again in a new run directory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from masan.config import RunConfig

KEY = "training_revision"
"""The checkpoint state's field holding the revision its code trained with."""


@dataclass(frozen=True)
class Change:
    """One change of what a config trains: ``revision`` (from 1, in order), what changed
    (``what``), and whether a config is affected (``applies``)."""

    revision: int
    what: str
    applies: Callable[[RunConfig], bool]


CHANGES = (
    Change(1, "loss.class_weights=balanced weighs each subject's cross-entropy by its class's weight, then takes "
              "the batch mean (before: the weighted mean that divided by the batch's weight sum, inert at "
              "micro-batch 1 and about half as strong at 2)",
           lambda cfg: cfg.loss.class_weights != "none"),
)
TRAINING_REVISION = max((c.revision for c in CHANGES), default=0)
"""The revision this code trains with, recorded in every checkpoint."""


def saved_revision(state: dict) -> int:
    """The training revision of a checkpoint's state. Checkpoints from before the field existed:
    1 when they hold the LR anchor (added right after revision 1's change, so a checkpoint of the
    code between the two is warned about needlessly), else 0."""
    if KEY in state:
        return int(state[KEY])
    return 1 if "lr_anchor" in state else 0


def resume_warning(state: dict, cfg: RunConfig, tag: str) -> str | None:
    """The warning for a resume of checkpoint ``tag`` (its ``state``) under ``cfg``: the changes
    since its revision that apply to ``cfg``; None when there are none."""
    since = [c for c in CHANGES if c.revision > saved_revision(state) and c.applies(cfg)]
    if not since:
        return None
    return (f"{tag} was trained by an older version of this code, and resuming it adopts these changes of "
            f"what its config trains from the next step: " + "; ".join(c.what for c in since)
            + ". To finish under the old behaviour, resume it with the version that trained it; to have one "
            "behaviour throughout, train again in a new run directory (run_dir=...)")
