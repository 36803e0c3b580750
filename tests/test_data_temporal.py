"""How fPM sees an fMRI run (data.fmri_temporal): fluctuations around each voxel's mean, with
their regional amplitude contrast kept (psc), removed (zscore), or beside the anatomy (mean_psc)."""

from __future__ import annotations

import numpy as np
import pytest

from masan.data.temporal import fluctuations


def _run(frames: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(T, 4, 4, 4) run: bright head (mean 1000, a darker 'grey matter' half at 600), air at 2 outside;
    fluctuation amplitude 2 % everywhere but 1 % in voxel (1, 1, 1). Returns (run, amplitude)."""
    rng = np.random.default_rng(0)
    base = np.full((4, 4, 4), 1000.0)
    base[:2] = 600.0
    base[3, 3, 3] = 2.0  # air
    amp = np.full((4, 4, 4), 0.02)
    amp[1, 1, 1] = 0.01
    course = rng.standard_normal(frames)
    course = (course - course.mean()) / course.std()
    run = base * (1 + amp * course[:, None, None, None])
    return run.astype(np.float32), amp


def test_psc_keeps_the_regional_amplitude_contrast_and_drops_the_static_image():
    run, amp = _run()
    out = fluctuations(run, "psc")
    assert out.dtype == np.float32 and out.shape == run.shape
    assert np.allclose(out.mean(axis=0), 0, atol=1e-5)  # the static image is gone
    sd = out.std(axis=0)
    assert sd[1, 1, 1] / sd[0, 0, 0] == pytest.approx(0.5, rel=1e-3)  # 1 % vs 2 %: the damping survives
    assert sd[0, 0, 0] == pytest.approx(sd[3, 0, 0], rel=1e-3)  # brightness does not matter, only % change
    assert np.all(out[:, 3, 3, 3] == 0)  # air: noise over ~0 is not signal
    assert np.sqrt(np.mean(out[:, :3] ** 2)) == pytest.approx(1.0, rel=0.1)  # O(1), like the T1


def test_zscore_keeps_only_the_time_courses():
    run, _ = _run()
    sd = fluctuations(run, "zscore").std(axis=0)
    assert np.allclose(sd[:3], 1.0, atol=1e-3)


def test_mean_psc_adds_the_anatomy_back():
    run, _ = _run()
    out = fluctuations(run, "mean_psc")
    mean = out.mean(axis=0)
    assert mean[0, 0, 0] < 0 < mean[3, 0, 0]  # darker half below the head's mean, brighter above
    assert mean[3, 3, 3] == 0
    assert np.allclose(out - mean, fluctuations(run, "psc"), atol=1e-4)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="data.fmri_temporal"):
        fluctuations(np.ones((2, 2, 2, 2), np.float32), "none")


@pytest.mark.parametrize("stored", ["demeaned", "sign-flipped"])
def test_psc_refuses_a_run_without_a_positive_baseline(stored):
    run, _ = _run()
    run = run - run.mean(axis=0) if stored == "demeaned" else -run
    for mode in ("psc", "mean_psc"):
        with pytest.raises(ValueError, match=r"subject sub-7: .*positive temporal mean.*fmri_temporal=demean"):
            fluctuations(run, mode, "sub-7")
    assert np.isfinite(fluctuations(run, "demean", "sub-7")).all()  # the modes that need no baseline take it
