"""The MNI152 template: its maps, grids on its brain box, and partial-volume sampling onto a grid.

The ICBM 2009a nonlinear symmetric MNI152 template (1 mm T1 and grey/white-matter probability
maps, shipped inside nilearn's wheel: nothing is downloaded) is what ``to_zarr.py --register``
registers onto (:mod:`masan.convert.registration`), what the QC report overlays, and what the
validation cohorts are made of (:mod:`masan.synth.anatomy`).

Grids (:func:`grid_affine`): isotropic RAS voxels, the field of view is the template's brain
bounding box plus a margin, centred, with the voxel size chosen so that the box fills the
tightest axis (the other axes are padded). T1 and fMRI grids of proportional shapes (e.g.
the paper's 240x256x176 and 60x64x44) therefore cover the same field of view.

Resampling (:func:`sample`): a map is first block-averaged and Gaussian-smoothed to the
target voxel size (:func:`prepared`: the spread of a voxel-wide box, i.e. partial volume),
then read at the target voxel centres through one ``scipy.ndimage.affine_transform`` that
also applies an optional rigid motion (warps: :func:`masan.synth.deformation.sample_through`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

TEMPLATE_NAME = "ICBM 2009a nonlinear symmetric MNI152, 1 mm (nilearn's copy)"
_TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


@dataclass(frozen=True)
class Template:
    """The MNI152 maps on the template's 1 mm grid (cropped to the brain plus a margin).

    ``t1``: template intensities (0-255 scale), ``gm``/``wm``/``csf``: tissue probabilities
    in [0, 1] (CSF = brain - GM - WM), ``brain``: 0/1 mask (T1 > 0). All float32 (X, Y, Z);
    ``affine`` voxel -> MNI mm. ``i_gm``/``i_wm``/``i_csf``: mean T1 of nearly pure tissue.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    i_gm: float
    i_wm: float
    i_csf: float
    bbox_mm: tuple[tuple[float, float, float], tuple[float, float, float]]
    """Brain bounding box (low, high corners, mm, voxel edges included)."""


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI152 files (found without importing nilearn: it is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MNI152 cohort needs nilearn (pip install 'nilearn>=0.10'), "
                           "whose wheel ships the template")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: nilearn's bundled template files {missing} are missing; reinstall nilearn")
    return folder


@lru_cache(maxsize=1)
def load_template(margin_vox: int = 8) -> Template:
    """Load (once per process) the template maps, cropped to the brain + ``margin_vox``."""
    folder = template_dir()
    imgs = {k: nib.load(folder / f) for k, f in _TEMPLATE_FILES.items()}
    data = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in imgs.items()}
    affine = np.asarray(imgs["t1"].affine, dtype=np.float64)
    brain = (data["t1"] > 0).astype(np.float32)
    idx = np.argwhere(brain > 0)
    lo_v, hi_v = idx.min(axis=0), idx.max(axis=0)
    lo_c = np.maximum(lo_v - margin_vox, 0)
    hi_c = np.minimum(hi_v + margin_vox + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo_c, hi_c))
    shift = np.eye(4)
    shift[:3, 3] = lo_c
    gm = data["gm"][crop] / 255.0
    wm = data["wm"][crop] / 255.0
    brain = brain[crop]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    t1 = data["t1"][crop]
    zoom = np.abs(np.diag(affine)[:3])
    lo_mm = affine[:3, :3] @ lo_v + affine[:3, 3] - zoom / 2
    hi_mm = affine[:3, :3] @ hi_v + affine[:3, 3] + zoom / 2
    return Template(t1=np.ascontiguousarray(t1), gm=np.ascontiguousarray(gm), wm=np.ascontiguousarray(wm),
                    csf=np.ascontiguousarray(csf), brain=np.ascontiguousarray(brain), affine=affine @ shift,
                    i_gm=float(t1[gm > 0.8].mean()), i_wm=float(t1[wm > 0.9].mean()),
                    i_csf=float(t1[(csf > 0.8) & (brain > 0)].mean()),
                    bbox_mm=(tuple(float(v) for v in np.minimum(lo_mm, hi_mm)),
                             tuple(float(v) for v in np.maximum(lo_mm, hi_mm))))


def grid_affine(shape: Sequence[int], margin_mm: float = 4.0) -> np.ndarray:
    """(4, 4) voxel -> MNI mm affine of an isotropic RAS grid of ``shape`` whose field of view is
    the template's brain bounding box + ``margin_mm`` on every side, centred; the voxel size is
    the smallest that fits the box (it fills the tightest axis, the others are padded)."""
    lo, hi = (np.asarray(c) for c in load_template().bbox_mm)
    shape = np.asarray(shape, dtype=float)
    voxel = float(np.max((hi - lo + 2 * margin_mm) / shape))
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = (lo + hi) / 2 - voxel * (shape - 1) / 2
    return aff


def voxel_size(affine: np.ndarray) -> float:
    """Largest voxel edge (mm) of an affine."""
    return float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).max())


def _prepare(volume: np.ndarray, affine: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Low-pass a 1 mm map for sampling at ``voxel_mm``: block-average by f = floor(voxel / 2)
    (at least 1), then Gaussian smoothing to the spread of a voxel-wide box (total variance
    voxel^2 / 12, as the block average's f^2 / 12): the map's value at a voxel centre is then
    about its mean over the voxel (partial volume), without aliasing."""
    f = max(1, int(voxel_mm // 2))
    if f > 1:
        pad = [(0, -n % f) for n in volume.shape]
        v = np.pad(volume, pad)
        s = v.shape
        volume = v.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)
        block = np.diag([f, f, f, 1.0]).astype(np.float64)
        block[:3, 3] = (f - 1) / 2
        affine = affine @ block
    sigma = math.sqrt(max(voxel_mm ** 2 - f ** 2, 0.0) / 12.0) / f
    if sigma > 0.2:
        volume = ndimage.gaussian_filter(volume, sigma, mode="constant", truncate=3.0)
    return np.ascontiguousarray(volume, dtype=np.float32), affine


_PREPARED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def prepared(key: tuple, voxel_mm: float, make=None) -> tuple[np.ndarray, np.ndarray]:
    """Cached :func:`_prepare` of a template map (``key = ("gm",)`` etc.) or of a derived map
    (``make()`` returns it on the template grid). Returns (volume, voxel -> mm affine)."""
    ck = (key, round(float(voxel_mm), 3))
    if ck not in _PREPARED:
        tpl = load_template()
        vol = getattr(tpl, key[0]) if make is None else make()
        if len(_PREPARED) > 64:
            _PREPARED.clear()
        _PREPARED[ck] = _prepare(vol, tpl.affine, voxel_mm)
    return _PREPARED[ck]


def sample(source: tuple[np.ndarray, np.ndarray], shape: Sequence[int], affine: np.ndarray,
           motion: np.ndarray | None = None, order: int = 1) -> np.ndarray:
    """float32 ``shape`` array: ``source`` (volume, voxel -> mm affine) read at the voxel centres
    of the grid ``affine`` (voxel -> mm). ``motion`` (4, 4) mm -> mm, rigid, maps a grid position
    to the source position shown there (None: the same position); outside the source: 0."""
    vol, src_aff = source
    shape = tuple(int(n) for n in shape)
    m = np.linalg.inv(src_aff) @ (np.eye(4) if motion is None else motion) @ np.asarray(affine, dtype=np.float64)
    return ndimage.affine_transform(vol, m[:3, :3], m[:3, 3], output_shape=shape,
                                    order=order, mode="constant", cval=0.0, output=np.float32)
