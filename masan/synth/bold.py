"""The validation cohort's fMRI signal: slow network, structure and partner fluctuations over
an EPI-like baseline (:mod:`masan.synth.anatomy` draws the subjects and writes the files).

fMRI signal, per voxel x and frame t (fractions of the baseline)::

    bold(x, t) = base(x) * (1 + damp(x) * [a_net(x) sum_k w_k(x) c_k(t)
                                          + a_s occ_s(x) s(t) + a_p occ_p(x) p(t)]) + noise

``base`` is EPI-like (CSF bright, GM > WM) from the tissue maps, ``w_k`` smooth network
fields shared by the cohort (unit length per voxel), ``c_k``, ``p``, ``u`` orthonormal slow
time courses (:func:`masan.synth.phantom.time_courses`, so every voxel's temporal std is its
amplitude exactly), ``occ_s``/``occ_p`` the planted structures' / partner network's
occupancy of the voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from masan.synth.phantom import to_int16


@dataclass(frozen=True)
class Signal:
    """Intensities (stored units) and the fMRI fluctuation model (fractions of baseline)."""

    t1_wm: float = 1000.0
    """The template's T1 is scaled so that white matter is this."""
    epi: dict = field(default_factory=lambda: {"csf": 1300.0, "gm": 900.0, "wm": 650.0})
    network_amplitude: dict = field(default_factory=lambda: {"gm": 0.015, "wm": 0.005, "csf": 0.008})
    """Temporal std of the network fluctuation, by tissue (fraction of baseline)."""
    networks: int = 3
    """Smooth spatial network fields shared by the cohort."""
    network_length: float = 0.15
    """Their correlation length, fraction of the field of view."""
    structure_amplitude: float = 0.03
    """Temporal std of the structures' shared signal s(t) (fully occupied voxel)."""
    partner_amplitude: float = 0.03
    """Temporal std of the partner network's signal p(t)."""
    coupling: float = 0.8
    """corr(s, p) at severity 0."""



def bold_slabs(rng: np.random.Generator, base: np.ndarray, fields: np.ndarray, courses: np.ndarray,
                occ_s: np.ndarray, occ_p: np.ndarray, damp: np.ndarray, r: float, signal: Signal,
                noise_sd: float, slope: float, frames: int, slab: int,
                orient: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
    """(X, Y, Z, n) int16 stored-value slabs of the run (the module docstring's formula).

    ``fields`` (K, X, Y, Z) already carry the per-voxel network amplitude; ``courses``
    (frames, K + 2) are [p, u, c_1..c_K]; ``orient`` turns a RAS slab into the file's voxel order.
    Memory: one slab.
    """
    f32 = np.float32
    courses = courses.astype(f32)
    p, u, net = courses[:, 0], courses[:, 1], courses[:, 2:]
    s = f32(r) * p + f32(math.sqrt(max(1.0 - r * r, 0.0))) * u
    ws = (f32(signal.structure_amplitude) * occ_s).astype(f32)[..., None]
    wp = (f32(signal.partner_amplitude) * occ_p).astype(f32)[..., None]
    gain = (base * damp).astype(f32)[..., None] / f32(slope)  # stored units per unit fluctuation
    offset = base.astype(f32)[..., None] / f32(slope)
    for t0 in range(0, frames, slab):
        t1 = min(t0 + slab, frames)
        fl = np.tensordot(fields, net[t0:t1], axes=([0], [1])) if fields.shape[0] else f32(0.0)
        fl = fl + ws * s[t0:t1] + wp * p[t0:t1]
        out = rng.standard_normal(offset.shape[:3] + (t1 - t0,), dtype=f32)
        out *= f32(noise_sd / slope)
        out += offset
        out += gain * fl
        yield orient(to_int16(out))
