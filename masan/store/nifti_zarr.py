"""One image of the cohort store as a NIfTI-Zarr 1.0 group (an OME-Zarr 0.5 image).

Layout of ``<version>/t1`` and ``<version>/fmri`` (docs/data-format.md; other tools open them
as ``subjects/<id>/current/t1``, ``current`` being a symlink to the subject's version)::

    <image>/zarr.json   group attributes: ``ome`` (OME-Zarr 0.5 ``multiscales``), ``masan`` (our facts)
    <image>/0           level 0, the stored values: t1 (X, Y, Z), fmri (T, X, Y, Z); what training reads
    <image>/1 ...       optional lower levels (``--levels``): 2x2x2 means per frame, for viewers
    <image>/nifti       uint8 (348,) or (540,): the binary NIfTI-1/-2 header of the stored array

The ``nifti`` header describes the stored array (shape, affine after ``--canonical`` or
crop/pad, ``scl_slope``/``scl_inter``, the TR the store uses in seconds) and wins over the OME
metadata on conflict, as NIfTI-Zarr says; the OME ``scale`` carries the stored voxel sizes (and
that TR on ``t``) for viewers.

Axis order. The NIfTI-Zarr writer stores [t, z, y, x]; we keep the (X, Y, Z) C order and
name the axes ``[t,] x, y, z``. OME-Zarr requires only time before space, and readers (the
``nifti-zarr`` package's ``zarr2nii``, neuroglancer, napari's ome-zarr plugin) map axes by
name. The reader then returns contiguous (X, Y, Z) volumes with no transpose: a transposing
read of the (Z, Y, X) order would add a transpose to every training read, a large share of
its time (docs/data-format.md, "Axis order"). Lower levels halve every space axis exactly (scale
``2**k * zoom``, translation to the block centre), so even readers that assume [z, y, x]
when rescaling a level's affine get it right.

Stores of format 1 hold each modality as a bare array with our attributes on it;
:func:`open_image` reads both.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import zarr

OME_VERSION = "0.5"
HEADER = "nifti"
ATTRS = "masan"
"""Group attribute holding our facts (nifti, affine, transform, stats, checksum, levels)."""
POOL_FRAMES = 16
"""Frames pooled at once for the lower levels (bounds the float32 temporary)."""

_SPACE_UNITS = {"meter": "meter", "mm": "millimeter", "micron": "micrometer"}


def axes(modality: str) -> list[str]:
    """Axis names of the stored arrays, in array order."""
    return ["x", "y", "z"] if modality == "t1" else ["t", "x", "y", "z"]


def level_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """Shapes of levels 0..levels-1: each halves (rounding up) the last three (space) axes."""
    out = [tuple(shape)]
    for _ in range(levels - 1):
        prev = out[-1]
        out.append(prev[:-3] + tuple(-(-n // 2) for n in prev[-3:]))
    return out


def halve(block: np.ndarray) -> np.ndarray:
    """2x2x2 mean over the last three axes (an odd axis repeats its last voxel), in the input
    dtype (integers rounded). (..., X, Y, Z) -> (..., ceil(X/2), ceil(Y/2), ceil(Z/2))."""
    pad = [(0, 0)] * (block.ndim - 3) + [(0, n % 2) for n in block.shape[-3:]]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    x, y, z = (n // 2 for n in block.shape[-3:])
    mean = block.reshape(block.shape[:-3] + (x, 2, y, 2, z, 2)).mean(axis=(-5, -3, -1), dtype=np.float32)
    return (np.rint(mean) if block.dtype.kind in "iu" else mean).astype(block.dtype)


def ome_metadata(modality: str, shapes: list[tuple[int, ...]], info: dict) -> dict:
    """The ``ome`` group attribute: one multiscale image, axes in array order, each level's
    voxel size (mm or the header's space unit) and block-centre translation; the TR on ``t``.

    ``info``: the stored array's voxel sizes ``zooms`` (x, y, z: the stored affine's column
    norms), their NIfTI ``space_unit`` and ``tr_seconds``, the TR the store uses (None: none;
    the ``t`` scale is then 1, the neutral value NIfTI-Zarr's own writer uses)."""
    names = axes(modality)
    zooms = [z if z > 0 else 1.0 for z in info["zooms"][:3]]
    space_unit = _SPACE_UNITS.get(info["space_unit"])
    tr = info.get("tr_seconds") or 1.0

    def axis(name: str) -> dict:
        kind = "time" if name == "t" else "space"
        unit = "second" if kind == "time" else space_unit
        return {"name": name, "type": kind, **({"unit": unit} if unit else {})}

    lead = [1.0] * (len(names) - 3)
    datasets = []
    for k in range(len(shapes)):
        f = 2.0 ** k
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": lead + [f * z for z in zooms]},
            {"type": "translation", "translation": [0.0] * len(lead) + [(f - 1) / 2 * z for z in zooms]}]})
    image = {"name": modality, "axes": [axis(n) for n in names], "datasets": datasets,
             "type": "2x2x2 mean" if len(shapes) > 1 else "none"}
    if lead:
        image["coordinateTransformations"] = [{"type": "scale", "scale": [tr, 1.0, 1.0, 1.0]}]
    return {"version": OME_VERSION, "multiscales": [image]}


class ImageWriter:
    """Creates one NIfTI-Zarr image group and writes it block by block.

    ``write(t0, block)`` takes the stored values in array order (t1: (X, Y, Z) whole; fmri:
    (n, X, Y, Z) frames ``t0..t0+n``, one whole shard of level 0 at a time: partial shard
    writes lose data in zarr-python) and fills every level; CRC-32s are kept per level.
    """

    def __init__(self, parent: Any, modality: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple,
                 shards: tuple, compressors: Any, levels: int, header: bytes, info: dict):
        self.modality = modality
        self.group = parent.create_group(modality, overwrite=True)
        self.shapes = level_shapes(shape, levels)
        self.arrays = []
        for k, s in enumerate(self.shapes):
            # Level 0 is chunked for training reads; lower levels are small views: one chunk
            # per volume (t1) or per chunk of frames (fmri), same shard extent in frames.
            ch, sh = (chunks, shards) if k == 0 else ((s if modality == "t1" else (chunks[0],) + s[1:]),
                                                      (s if modality == "t1" else (shards[0],) + s[1:]))
            self.arrays.append(self.group.create_array(
                str(k), shape=s, dtype=dtype, chunks=ch, shards=sh, compressors=compressors, fill_value=0,
                dimension_names=axes(modality),
                # Every chunk is written, even all-zero ones: readers then treat a missing chunk
                # file as damage (StrictLocalStore) instead of silently reading zeros.
                config={"write_empty_chunks": True}))
        nifti = self.group.create_array(HEADER, shape=(len(header),), dtype="uint8", chunks=(len(header),),
                                        compressors=None, fill_value=0)
        nifti[...] = np.frombuffer(header, dtype=np.uint8)
        self.header_crc = zlib.crc32(header)
        self.ome = ome_metadata(modality, self.shapes, info)
        self.crc = [0] * len(self.shapes)

    def write(self, t0: int, block: np.ndarray) -> None:
        for k, arr in enumerate(self.arrays):
            if k:
                block = self._halve_frames(block)
            block = np.ascontiguousarray(block)
            self.crc[k] = zlib.crc32(memoryview(block).cast("B"), self.crc[k])
            if self.modality == "t1":
                arr[...] = block
            else:
                arr[t0:t0 + block.shape[0]] = block

    @staticmethod
    def _halve_frames(block: np.ndarray) -> np.ndarray:
        if block.ndim == 3:
            return halve(block)
        return np.concatenate([halve(block[i:i + POOL_FRAMES]) for i in range(0, block.shape[0], POOL_FRAMES)])

    def checksums(self) -> dict:
        """``checksum`` attribute: CRC-32 of level 0 (``crc32``), of every level (``levels``) and
        of the ``nifti`` header bytes (``nifti``)."""
        crcs = [f"{c:08x}" for c in self.crc]
        return {"crc32": crcs[0], "levels": crcs, "nifti": f"{self.header_crc:08x}",
                "of": "stored values, C order, native dtype"}

    def finish(self, attrs: dict) -> None:
        """Write the group attributes: ``ome`` and ``masan`` (``attrs`` plus the level count)."""
        self.group.update_attributes({"ome": self.ome, ATTRS: {**attrs, "levels": len(self.shapes)}})


def is_image_group(node: Any) -> bool:
    return isinstance(node, zarr.Group)


def open_image(node: Any) -> tuple[Any, dict]:
    """(level-0 array, our attributes) of an image node: a NIfTI-Zarr group, or a format-1
    bare array (its attributes are ours)."""
    if not is_image_group(node):
        return node, dict(node.attrs)
    attrs = dict(node.attrs)
    path = attrs["ome"]["multiscales"][0]["datasets"][0]["path"]
    return node[path], attrs[ATTRS]


def levels(node: Any) -> list[Any]:
    """Every level's array, level 0 first (a format-1 array is its only level)."""
    if not is_image_group(node):
        return [node]
    return [node[d["path"]] for d in dict(node.attrs)["ome"]["multiscales"][0]["datasets"]]


def array_checksum(arr: Any, slab_frames: int) -> str:
    """CRC-32 of a stored array's values (C order); a 4D run is read ``slab_frames`` frames at a time."""
    crc = 0
    step = slab_frames if arr.ndim == 4 else arr.shape[0]
    for i in range(0, arr.shape[0], step):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(arr[i:i + step])).cast("B"), crc)
    return f"{crc:08x}"


def verify(node: Any, slab_frames: int) -> bool:
    """True when every level of the image, and its ``nifti`` header, read back to their
    recorded CRC-32s (a missing or damaged chunk file reads as a mismatch)."""
    recorded = open_image(node)[1].get("checksum", {})
    want = recorded.get("levels") or [recorded.get("crc32")]
    try:
        got = [array_checksum(a, slab_frames) for a in levels(node)]
        if is_image_group(node):
            want, got = want + [recorded.get("nifti")], got + [array_checksum(node[HEADER], slab_frames)]
    except Exception:  # noqa: BLE001 - any read failure of damaged chunk files (codec, missing chunk) is "damaged"
        return False
    return got == want
