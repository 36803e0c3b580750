"""How a conversion lays voxels out in the store (``to_zarr.py``'s layout options), checked.

:class:`ConvertOptions` is what :func:`masan.convert.cohort.convert_cohort` and each worker's
:func:`masan.convert.subject.convert_subject` take; its :meth:`~ConvertOptions.fingerprint` is
what decides a subject's stored bytes (a subject converted under another is redone).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Literal

from masan.convert import registration
from masan.convert.sources import BIDS_LABEL, REST_TASK, ConvertError
from masan.store.cohort import FORMAT_VERSION, MODALITIES


@dataclass
class ConvertOptions:
    """How voxels are laid out in the store. Changing any of these reconverts every subject."""

    canonical: bool = False
    """Reorient every image to RAS+ (voxels permuted/flipped, affine adjusted). The command
    line does it by default (``--keep-orientation`` opts out)."""
    spacing: tuple[float, float] | None = None
    """Resample every image onto an isotropic RAS grid of (T1 mm, fMRI mm) over its field of
    view (:mod:`masan.convert.resample`), then centre it into ``t1_shape``/``fmri_shape``; 0 for a
    modality: the cohort's most common voxel size (chosen by :func:`masan.convert.cohort.convert_cohort`). None:
    the file's voxels (a cohort of several voxel sizes then breaks the training contract)."""
    t1_shape: tuple[int, int, int] | None = None
    """Centre crop/pad T1 to this (X, Y, Z) (the paper: 240 256 176); None keeps it. With
    ``register``: the shape of the template grid (None: ``registration.DEFAULT_VOXEL_MM``)."""
    fmri_shape: tuple[int, int, int] | None = None
    """Centre crop/pad each fMRI frame to this (the paper: 60 64 44); None keeps it. With
    ``register``: the shape of the template grid, as ``t1_shape``."""
    patch_grid: tuple[int, int, int] = (4, 4, 4)
    """T1 chunk = one cell of this grid (shape // grid), so a patch read touches one chunk."""
    fmri_chunk_frames: int = 16
    """fMRI chunk = this many whole frames."""
    fmri_shard_frames: int = 128
    """fMRI shard (one file) = this many frames; also the streaming slab (memory bound)."""
    codec: str = "lz4hc"
    """Blosc compressor: lz4hc (default: decodes faster than zstd for a few percent more bytes,
    which the read target needs; docs/data-format.md, "Chunks, shards, codec"), zstd, lz4,
    blosclz, zlib."""
    clevel: int = 5
    """0-9."""
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "bitshuffle"
    levels: int = 1
    """Resolution levels per image: 1 is level 0 only (what training reads); each further
    level halves X, Y, Z (2x2x2 means, per frame) for OME-Zarr viewers."""
    nan: Literal["error", "zero"] = "error"
    """NaN voxels: ``error`` rejects the subject, ``zero`` stores 0 and records the count."""
    unoriented: Literal["refuse", "assume-las"] = "refuse"
    """A file whose header states no orientation (sform and qform codes 0,
    :func:`masan.convert.nifti.unoriented`): ``refuse`` fails its subject, ``assume-las`` takes
    nibabel's affine (LAS) with a warning. Not in the fingerprint: it decides which subjects
    are converted, not the bytes of the others."""
    bold_task: str | None = None
    """The BIDS task label of the BOLD runs to use (``func/*_task-<label>_*bold.nii[.gz]``, any
    case); None: resting-state runs, whose task label contains ``"rest"`` (``REST_TASK``). A
    subject with BOLD runs but none of that task fails naming the tasks it has. Not in the
    fingerprint: it decides which file is a subject's source (recorded with its checksum), not
    how voxels are stored."""
    require: tuple[str, ...] = ("t1", "fmri")
    """Modalities every subject must have; a subject missing one fails. Empty: every subject
    with the images it has (at least one)."""
    register: Literal["none", "rigid", "affine", "syn"] = "none"
    """Spatial normalisation (:mod:`masan.convert.registration`): ``none`` stores the file's voxels;
    otherwise each T1 is registered to ``template`` with ANTs and resampled onto the template
    grid of ``t1_shape`` (then a template-grid shape, not a crop/pad; ``canonical`` has no
    effect), each fMRI through its mean's rigid fit to the T1 onto the grid of ``fmri_shape``."""
    template: str = "mni152"
    """Registration template (``registration.TEMPLATES``)."""
    allow_unlabeled: bool = False
    """Store subjects without a diagnosis (label null) for prediction; training leaves them out.
    Not in the fingerprint: it decides which subjects are converted, not their bytes."""
    threads: int | None = None
    """ITK threads per worker when registering (None: the usable cores over the workers). Not
    in the fingerprint: more than one only makes reruns differ by fractions of a millimetre."""

    def __post_init__(self) -> None:
        for name in ("fmri_chunk_frames", "fmri_shard_frames"):
            if getattr(self, name) < 1:
                raise ConvertError(f"{name} must be 1 or more frames, got {getattr(self, name)}")
        if self.fmri_shard_frames % self.fmri_chunk_frames:
            raise ConvertError(f"fmri_shard_frames ({self.fmri_shard_frames}) must be a multiple of "
                               f"fmri_chunk_frames ({self.fmri_chunk_frames})")
        if not 0 <= self.clevel <= 9:
            raise ConvertError(f"clevel must be 0-9, got {self.clevel}")
        if self.levels < 1:
            raise ConvertError(f"levels must be 1 or more (1: full resolution only), got {self.levels}")
        bad = set(self.require) - set(MODALITIES)
        if bad:  # empty: every subject with the images it has (at least one)
            raise ConvertError(f"require must name some of {MODALITIES} (or none), got {self.require}")
        for name in ("t1_shape", "fmri_shape", "patch_grid"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or min(v) < 1):
                raise ConvertError(f"{name} must be three positive integers, got {v}")
        if self.register not in registration.TYPES:
            raise ConvertError(f"register must be one of {registration.TYPES}, got {self.register!r}")
        if self.template not in registration.TEMPLATES:
            raise ConvertError(f"template must be one of {registration.TEMPLATES}, got {self.template!r}")
        if self.register != "none" and registration.tool_version() == registration.NOT_INSTALLED:
            raise ConvertError(f"--register {self.register} needs ANTs' Python package: pip install antspyx "
                               "(or convert without --register)")
        if self.spacing is not None and (len(self.spacing) != 2 or not all(0 <= v < math.inf for v in self.spacing)):
            raise ConvertError(f"spacing must be (T1 mm, fMRI mm), 0 for the cohort's most common, got {self.spacing}")
        if self.spacing is not None and self.register != "none":
            raise ConvertError("--spacing and --register both set the grid; with --register the template grid "
                               "decides (drop --spacing)")
        if self.bold_task is not None and not re.fullmatch(BIDS_LABEL, self.bold_task):
            raise ConvertError(f"bold_task (--bold-task) must be a BIDS task label, letters and digits only "
                               f"(the {REST_TASK!r} of task-{REST_TASK}), got {self.bold_task!r}")
        if self.threads is not None and self.threads < 1:
            raise ConvertError(f"threads must be 1 or more, got {self.threads}")

    def registration_settings(self) -> dict | None:
        """The registration settings (``registration.settings``; the root attribute
        ``registration``), None without registration."""
        if self.register == "none":
            return None
        return registration.settings(self.register, self.template, self.t1_shape, self.fmri_shape)

    def fingerprint(self) -> dict:
        """Options that decide the stored bytes (a subject converted otherwise is redone).
        Without registration it is what it was before registration existed, so such stores
        are not redone."""
        d = asdict(self)
        for key in ("require", "register", "template", "threads", "allow_unlabeled", "unoriented", "bold_task"):
            d.pop(key)
        if self.spacing is None:  # stores from before resampling existed keep their fingerprint
            d.pop("spacing")
        if self.register != "none":
            d["registration"] = self.registration_settings()
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d))
