"""How hard the MNI152 validation cohort is: named settings of :func:`masan.synth.anatomy.synthesize_anatomy_cohort`.

- ``easy``: balanced classes, one severity for both modalities, a strong effect in amplitude and
  connectivity, small misregistration, no shape differences (the generator's defaults).
- ``adni-like``: the paper's class proportions, a severity per modality drawn independently,
  effects tuned to ADNI-like oracle accuracies (each modality alone about 0.6-0.7 on 4 classes,
  both together above either), connectivity-only fMRI effect, 48 frames at 6.8 mm (a coarser
  fMRI voxel averages the hippocampus with its neighbours and hides the coupling), a smooth warp
  per subject and unregistered head placements (:class:`masan.synth.deformation.Geometry`).

docs/validation-cohort.md gives the measured oracle accuracies of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from masan.synth.anatomy import DEFAULT_STRENGTH, FMRI_EFFECTS, Nuisance
from masan.synth.deformation import Geometry

PAPER_CLASS_COUNTS = {"NC": 64, "EMCI": 34, "LMCI": 36, "AD": 72}
"""Subjects per class of the paper's ADNI cohort (Zong et al.)."""


def class_counts(total: int, proportions: dict[str, float], classes: Sequence[str] | None = None) -> dict[str, int]:
    """``total`` subjects split over ``classes`` (default: the keys of ``proportions``) in the given
    proportions, rounded by largest remainder (ties: the earlier class) so the counts sum to ``total``."""
    classes = list(proportions if classes is None else classes)
    missing = [c for c in classes if c not in proportions]
    if missing:
        raise ValueError(f"no class proportion for {missing}; the proportions cover {list(proportions)}")
    if total < 0:
        raise ValueError(f"the number of subjects is {total}; give a positive number")
    weights = np.array([float(proportions[c]) for c in classes])
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:total - counts.sum()]] += 1
    return dict(zip(classes, (int(n) for n in counts)))


@dataclass(frozen=True)
class Preset:
    """One difficulty setting: the cohort's size and the generator's effect and nuisance arguments."""

    per_class: int | None
    """Subjects per class (balanced), or None: ``subjects`` split by ``proportions``."""
    subjects: int | None
    proportions: dict[str, float] | None
    frames: int
    """fMRI frames per run."""
    strength: tuple[float, float]
    severity_sd: float | tuple[float, float]
    """One spread (one severity for both modalities) or (T1, fMRI): independent severities."""
    fmri_effect: tuple[str, ...]
    nuisance: Nuisance = field(default_factory=Nuisance)
    geometry: Geometry | None = None
    fmri_shape: tuple[int, int, int] | None = None
    """fMRI grid (voxels) the cohort is written at, or None: the tool's default. The voxel bounds
    what a connectivity effect in small structures can show (docs/validation-cohort.md)."""

    def counts(self, classes: Sequence[str], per_class: int | None = None, subjects: int | None = None
               ) -> dict[str, int]:
        """Subjects per class: ``per_class`` (or the preset's) each for a balanced preset, else
        ``subjects`` (or the preset's) by the preset's proportions."""
        if self.proportions is None:
            return {c: int(self.per_class if per_class is None else per_class) for c in classes}
        return class_counts(self.subjects if subjects is None else subjects, self.proportions, classes)

    def generator_arguments(self) -> dict:
        """Keyword arguments of :func:`masan.synth.anatomy.synthesize_anatomy_cohort`."""
        return {"frames": self.frames, "strength": self.strength, "severity_sd": self.severity_sd,
                "fmri_effect": self.fmri_effect, "nuisance": self.nuisance, "geometry": self.geometry}


PRESETS: dict[str, Preset] = {
    "easy": Preset(per_class=16, subjects=None, proportions=None, frames=16, strength=DEFAULT_STRENGTH,
                   severity_sd=0.15, fmri_effect=FMRI_EFFECTS),
    "adni-like": Preset(per_class=None, subjects=96, proportions=PAPER_CLASS_COUNTS, frames=48,
                        strength=(0.2, 0.9), severity_sd=(0.2, 0.2), fmri_effect=("connectivity",),
                        nuisance=Nuisance(misregistration_mm=6.0, misregistration_deg=6.0), geometry=Geometry(),
                        fmri_shape=(24, 28, 24)),
}
"""``synth_cohort.py --preset``: ``easy`` (default) and ``adni-like``."""
DEFAULT_PRESET = "easy"
