"""How an fMRI run is presented to the model: whole-run z-score, or per-voxel fluctuations.

A resting-state run is a bright, static EPI image plus fluctuations of a few percent; the
fluctuations (their amplitude and their correlations) are what resting-state studies are
about. Z-scoring the whole 4-D run with one mean and std (``none``, the store's ``stats``)
keeps the static image in front: a 1 % BOLD fluctuation becomes ~0.03 z, and fPM mostly sees
the mean EPI. The per-voxel modes remove the static image first (``data.fmri_temporal``):

* ``psc``: percent signal change ``(x - m) / m`` with ``m`` the voxel's temporal mean, divided
  by its root mean square over the run (one number per run, so values are O(1) and the
  reconstruction loss stays on the scale of T1's); keeps the regional contrast of fluctuation
  amplitude (ALFF-like) and the correlations. Voxels whose mean is below ``PSC_MIN_MEAN`` of
  the run's mean intensity (air, outside the head) are set to 0, as their ratio is noise over ~0.
* ``mean_psc``: the run's temporal mean image, z-scored over the head, plus the ``psc``
  fluctuations: every frame shows the anatomy (atrophy changes the EPI baseline too) and, at
  the same O(1) scale, the fluctuations, so fPM can average frames for the one and contrast
  them for the other.
* ``demean``: ``x - m``, divided by the run's global temporal std (one number per run), so
  regional amplitude differences stay and values are O(1).
* ``zscore``: ``(x - m) / s`` per voxel: amplitude removed, only the correlations remain.

All take and return float32 ``(T, X, Y, Z)`` of scaled (not z-scored) values. ``psc`` and
``mean_psc`` need the scanner's intensities (a positive baseline in every voxel): a run stored
demeaned or sign-flipped (by a denoising pipeline) is refused, naming the subject, as its ratios
would keep a random half of the head.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "psc", "mean_psc", "demean", "zscore")
PSC_MIN_POSITIVE = 0.9
"""Share of the voxels with a nonzero temporal mean that must have a positive one for ``psc``
(raw BOLD, air included, is positive throughout; a demeaned run is positive in about half)."""
PSC_MIN_MEAN = 0.1
"""Voxels whose temporal mean is below this fraction of the run's mean over non-zero voxels get 0 in ``psc``."""
EPS = 1e-6


def fluctuations(run: np.ndarray, mode: str, subject: str = "") -> np.ndarray:
    """``run`` float32 ``(T, X, Y, Z)`` scaled values -> float32 per ``mode`` (see module doc).
    ValueError (naming ``subject``) for an unknown mode, or a run without a positive baseline
    under ``psc``/``mean_psc``."""
    if mode not in MODES[1:]:
        raise ValueError(f"data.fmri_temporal={mode!r}: use one of {list(MODES)}")
    x = run.astype(np.float32, copy=False)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    out = x - mean
    if mode in ("psc", "mean_psc"):
        positive = mean[mean > 0]
        nonzero = int(np.count_nonzero(mean))
        if nonzero and positive.size < PSC_MIN_POSITIVE * nonzero:
            raise ValueError(f"subject {subject}: data.fmri_temporal={mode} needs the scanner's BOLD intensities, "
                             f"but only {positive.size} of the run's {nonzero} voxels have a positive temporal "
                             "mean (stored demeaned or sign-flipped?): convert the raw BOLD series, or use "
                             "data.fmri_temporal=demean or zscore")
        floor = PSC_MIN_MEAN * float(positive.mean()) if positive.size else np.inf
        keep = mean > floor
        out *= np.where(keep, 1.0 / np.maximum(mean, EPS), 0.0).astype(np.float32)
        out /= _rms(out[:, keep])
        if mode == "mean_psc" and keep.any():
            head = mean[keep]
            out += ((mean - head.mean()) / max(float(head.std()), EPS)) * keep
    elif mode == "demean":
        out /= _rms(out)
    else:
        out /= np.maximum(out.std(axis=0), EPS)
    return out


def _rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0, EPS)
