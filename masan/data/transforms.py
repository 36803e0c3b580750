"""Train-only data transforms (augmentation): flips, small affine jitter, intensity jitter.

Not in the paper, and off by default: ``data.augment`` (:class:`masan.config.AugmentConfig`)
switches each on. :meth:`Augment.from_config` is None while every transform is off, and
nothing below runs (training samples are then the stored ones, bit for bit).

**Only training samples.** The training loader reads a view of the training dataset whose
items pass through the transform (:meth:`masan.data.dataset.CohortDataset.with_transform`,
called in ``masan.train.loop.make_loader``); with a cohort cache (``data.cache``) the loop
applies the same transform to each sample of the cached batch (:meth:`Augment.batch`), with
the same draws. Validation, test, the fit of the cohort standardisers and
``python -m masan.predict`` read untransformed samples.

**One spatial transform for both modalities.** T1 ``(1, X, Y, Z)`` and fMRI ``(T, x, y, z)``
cover the same field of view on different grids, so the transform is expressed in coordinates
normalised to that field of view (``[-1, 1]`` along each axis: ``torch.nn.functional.affine_grid``
with ``align_corners=False``) and resampled onto each grid (trilinear ``grid_sample``, edge
values beyond the border): a voxel of either modality moves to the same place of the brain,
and every fMRI frame moves alike. Rotations and zooms are rigid in world space: the field of
view's extent is the grid shape times its voxel size (the store's geometry; without one, cubic
voxels). The flip mirrors the left-right axis of both, found from the store's orientation (the
first axis without one): a store kept in scanner order (``--keep-orientation``, e.g. PIR) holds
left-right on another axis.

**Reproducible draws.** The parameters of a sample come from a generator seeded with
(``seed``, epoch, subject index) only: a resumed run, any number of ranks or loader workers,
and the cache path all draw the same transform for the same subject in the same epoch. The
twelve uniform numbers of a draw are always taken in the same order, so switching one
transform on leaves the others' draws as they were.

Example::

    augment = Augment.from_config(cfg.data.augment, cfg.seed, geometry)  # None: all off
    item = augment(dataset[i], index=i, epoch=3)                   # same shapes and dtypes
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from masan.batch import MODALITY_KEYS
from masan.config import AugmentConfig

STREAM = 0x61756720
"""First word of every augmentation seed: keeps its draws apart from other generators seeded
with (seed, epoch, ...)."""


@dataclass(frozen=True)
class Draw:
    """The transform of one sample."""

    flip: bool
    """Mirror the left-right axis (:attr:`Augment.mirror_axis`)."""
    theta: np.ndarray | None
    """(3, 4) affine, output -> input position in normalised (axis 0, 1, 2) coordinates; None:
    no resampling (rotation, shift and zoom all off)."""
    intensity: dict[str, tuple[float, float]]
    """Modality -> (gain, offset); absent: unchanged."""


def _rotation(angles: np.ndarray) -> np.ndarray:
    """R = R2 @ R1 @ R0, Ri a rotation by angles[i] radians about spatial axis i."""
    out = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def mirror_axis(orientation: str | None) -> int:
    """The spatial axis (0-2) that runs left-right in a store of ``orientation`` (nibabel axis
    codes, e.g. ``RAS`` -> 0, ``PIR`` -> 2); 0 when unknown."""
    return next((i for i, code in enumerate(orientation or "") if code in "LR"), 0)


class Augment:
    """The configured train-only transforms; call on one sample, or :meth:`batch` on a batch.

    ``geometry`` (:class:`masan.data.contract.Geometry` as JSON, the store's): its orientation
    gives the axis a flip mirrors, its voxel sizes (mm) the field of view's proportions; None or
    missing keys: the first axis, cubic voxels."""

    def __init__(self, cfg: AugmentConfig, seed: int, geometry: dict | None = None):
        self.cfg = cfg
        self.seed = seed
        geometry = geometry or {}
        self.mirror_axis = mirror_axis(geometry.get("orientation"))
        self.spacing = {m: geometry.get(f"{m}_spacing_mm") for m in MODALITY_KEYS}
        """Modality -> (3,) voxel size in mm, or None (cubic)."""

    @classmethod
    def from_config(cls, cfg: AugmentConfig, seed: int, geometry: dict | None = None) -> Augment | None:
        """The transforms of ``data.augment``, or None when every one is off."""
        on = cfg.flip or cfg.rotate_deg or cfg.shift or cfg.scale or cfg.intensity
        return cls(cfg, seed, geometry) if on else None

    def draw(self, index: int, epoch: int, shape: tuple[int, int, int],
             spacing: tuple[float, float, float] | None = None) -> Draw:
        """The transform of dataset item ``index`` in ``epoch``; ``shape``: the (X, Y, Z) grid that
        gives the field of view's extent (the T1 grid when there is one), ``spacing`` its voxel
        size in mm (None: cubic)."""
        c = self.cfg
        seq = np.random.SeedSequence([STREAM, self.seed % 2**63, epoch, index])
        u = np.random.default_rng(seq).uniform(-1.0, 1.0, 12)  # fixed order: see the module docstring
        theta = None
        if c.rotate_deg or c.shift or c.scale:
            m = _rotation(np.deg2rad(c.rotate_deg) * u[1:4]) * (1.0 + c.scale * u[7])
            half = np.asarray(shape, dtype=np.float64) * (1.0 if spacing is None else np.asarray(spacing))  # mm
            a = m * half[None, :] / half[:, None]  # E^-1 M E: rigid in world space, in [-1, 1] units
            theta = np.concatenate([a, (2.0 * c.shift * u[4:7])[:, None]], axis=1)
        intensity = {}
        if c.intensity:
            intensity = {"t1": (1.0 + c.intensity * u[8], c.intensity * u[9]),
                         "fmri": (1.0 + c.intensity * u[10], c.intensity * u[11])}
        return Draw(flip=bool(c.flip and u[0] < 0), theta=theta, intensity=intensity)

    def __call__(self, item: dict[str, torch.Tensor], index: int, epoch: int) -> dict[str, torch.Tensor]:
        """``item`` (a CohortDataset item: ``"t1"`` (1, X, Y, Z), ``"fmri"`` (T, x, y, z), others
        untouched) with its images transformed; shapes, dtypes and devices kept."""
        keys = [k for k in MODALITY_KEYS if k in item]
        if not keys:
            return item
        d = self.draw(index, epoch, tuple(item[keys[0]].shape[1:]), self.spacing.get(keys[0]))
        out = dict(item)
        for k in keys:
            out[k] = apply(item[k], d, k, self.mirror_axis)
        return out

    def batch(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """The same transforms on a collated batch (each sample by its ``"index"``), e.g. one the
        cohort cache already put on the GPU."""
        keys = [k for k in MODALITY_KEYS if k in batch]
        index = batch["index"].reshape(-1).tolist()
        samples = [self({k: batch[k][b] for k in keys}, i, epoch) for b, i in enumerate(index)]
        return {**batch, **{k: torch.stack([s[k] for s in samples]) for k in keys}}


def apply(volume: torch.Tensor, d: Draw, modality: str, mirror: int = 0) -> torch.Tensor:
    """One image (C, X, Y, Z) under the draw ``d``: flip (of spatial axis ``mirror``), then
    resampling, then intensity."""
    x = volume.float()
    if d.flip:
        x = x.flip(1 + mirror)
    if d.theta is not None:
        # affine_grid's coordinates run (W, H, D) = spatial axes (2, 1, 0): reverse the axes
        theta = torch.as_tensor(d.theta[::-1, [2, 1, 0, 3]].copy(), dtype=torch.float32, device=x.device)
        grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
        x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if modality in d.intensity:
        gain, offset = d.intensity[modality]
        x = x * gain + offset
    return x.to(volume.dtype)
