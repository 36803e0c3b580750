"""A resumed run adopts the training code's changes since its checkpoint (masan/train/revision.py):
the resume says so, naming the changes that apply to its config, instead of changing the
objective halfway through a run without a word."""

from __future__ import annotations

from masan.config import load_config
from masan.train.revision import CHANGES, KEY, TRAINING_REVISION, resume_warning, saved_revision


def test_the_revisions_are_numbered_in_order_and_the_newest_is_recorded():
    assert [c.revision for c in CHANGES] == list(range(1, len(CHANGES) + 1))
    assert TRAINING_REVISION == len(CHANGES)


def test_a_checkpoint_from_before_a_change_that_applies_is_warned_about():
    balanced, plain = (load_config(None, [f"loss.class_weights={w}"]) for w in ("balanced", "none"))
    old = {"step": 27, "phase_steps": 0}  # written before the class weights acted at micro-batch 1
    warning = resume_warning(old, balanced, "step_000027")
    assert warning and "step_000027" in warning and "loss.class_weights=balanced" in warning
    assert "new run directory" in warning
    assert resume_warning(old, plain, "step_000027") is None, "a change that does not touch this config"
    assert saved_revision({"lr_anchor": None}) == 1, "written with the change, before revisions were kept"
    assert resume_warning({KEY: TRAINING_REVISION}, balanced, "step_000027") is None
