"""Cohort geometry checks: each subject's voxel size, fMRI TR and voxel axes against the cohort's.

A cohort's images are meant to share one voxel size (mm), one fMRI sampling interval (TR, s)
and one voxel-axis orientation; a subject that differs is flagged with both values and the fix:

- ``voxel_size``: the stored affine's voxel size differs from the cohort's most common one by
  more than :data:`SAME_VALUE_RTOL` on some axis (the model's patches then cover other anatomy);
- ``tr``: the fMRI TR differs from the cohort's most common one by more than :data:`SAME_VALUE_RTOL`,
  or the run has none (neither the image's ``tr_seconds`` nor its header's);
- ``mirrored``: the stored voxel axes have the other handedness than the cohort majority's (sign
  of det(affine[:3, :3]): LAS among RAS): each header may be right, but the voxel arrays are
  mirror images of the others', so anything that reads voxels without the affine (the model)
  sees this subject's left and right swapped;
- ``axes``: same handedness, but the stored axis codes (``aff2axcodes``) differ from the cohort's
  most common ones (e.g. LPS among RAS: rotated, for tools that ignore the affine).

"Most common" is over every subject whose header was read (not only ``--subjects``); a tie for
the most common value flags nobody, and the cohort table (:func:`cohort_geometry`) lists it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from masan.convert.nifti import SAME_VALUE_RTOL
from masan.qc.checks import Flag

CANONICAL_FIX = ("reconvert the cohort with data_tools/to_zarr.py --canonical, which stores every image's voxel "
                 "axes as RAS")
HANDEDNESS = {1: "right-handed", -1: "left-handed"}
"""Sign of det(affine[:3, :3]): RAS, LPS, ... are right-handed; LAS, RPS, ... left-handed."""
VOXEL_FIX = ("resample it to the cohort's voxel size (to_zarr.py --register puts every subject on one grid) or "
             "leave it out; check the scan protocol of its source")
TR_FIX = ("check RepetitionTime in its BIDS sidecar and pixdim[4] in its header; if right, resample the run in time or "
          "leave it out (filters and connectivity assume one TR)")


@dataclass
class Majority:
    """The most common value of one property over the cohort: ``value``, held by ``count`` of ``total``."""

    value: object
    count: int
    total: int

    def __str__(self) -> str:
        return f"{_show(self.value)} ({self.count} of {self.total} subjects)"


def _show(value) -> str:
    if isinstance(value, tuple):
        return " x ".join(f"{v:g}" for v in value) + " mm"
    if isinstance(value, float):
        return f"{value:g} s"
    if isinstance(value, int):
        return HANDEDNESS.get(value, str(value))
    return str(value)


def majority(values: dict[str, object]) -> Majority | None:
    """The most common of ``values`` (subject -> value; None values skipped); None when there are
    none or two values tie for the most common (then no subject is the odd one out)."""
    counts = Counter(v for v in values.values() if v is not None).most_common(2)
    if not counts or (len(counts) == 2 and counts[0][1] == counts[1][1]):
        return None
    return Majority(counts[0][0], counts[0][1], sum(1 for v in values.values() if v is not None))


def _differs(a, b) -> bool:
    """More than :data:`SAME_VALUE_RTOL` relative difference (per element of tuples)."""
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return any(abs(x - y) > SAME_VALUE_RTOL * max(abs(y), 1e-9) for x, y in pairs)


def _properties(facts: dict[str, dict[str, dict]]) -> dict[tuple[str, str], dict[str, object]]:
    """(modality, property) -> {subject: value} for voxel size, TR (fMRI), axis codes, handedness."""
    props: dict[tuple[str, str], dict[str, object]] = {}
    for s, per_modality in facts.items():
        for m, f in per_modality.items():
            props.setdefault((m, "voxel size"), {})[s] = tuple(f["zooms_mm"])
            props.setdefault((m, "axes"), {})[s] = f["axcodes"]
            props.setdefault((m, "handedness"), {})[s] = f["handedness"]
            if m == "fmri":
                tr = f["tr_seconds"]
                props.setdefault((m, "TR"), {})[s] = None if tr is None else round(float(tr), 6)
    return props


def geometry_flags(facts: dict[str, dict[str, dict]]) -> dict[str, list[Flag]]:
    """subject -> its ``voxel_size``, ``tr``, ``mirrored`` and ``axes`` flags (module docstring)
    against the majority of ``facts`` (:func:`masan.qc.checks.read_headers`)."""
    props = _properties(facts)
    ref = {key: majority(values) for key, values in props.items()}
    out: dict[str, list[Flag]] = {}

    def flag(subject: str, code: str, modality: str, message: str) -> None:
        out.setdefault(subject, []).append(Flag(code, modality, f"{subject}: {message}"))

    for (m, prop), values in props.items():
        common = ref[(m, prop)]
        for s, value in values.items():
            if prop == "TR" and value is None:
                usual = f"; the cohort's most common TR is {common}" if common else ""
                flag(s, "tr", m, "the fMRI has no TR (no tr_seconds from a BIDS sidecar, pixdim[4] 0 in the "
                     f"header){usual}: set RepetitionTime in its sidecar (or pixdim[4]) and reconvert it")
            elif common is None or value is None:
                continue
            elif prop == "voxel size" and _differs(value, common.value):
                flag(s, "voxel_size", m, f"{m} voxels are {_show(value)}, the cohort's most common is {common}: "
                     f"{VOXEL_FIX}")
            elif prop == "TR" and _differs(value, common.value):
                flag(s, "tr", m, f"fMRI TR is {_show(value)}, the cohort's most common is {common}: {TR_FIX}")
            elif prop == "handedness" and value != common.value:
                axes = ref.get((m, "axes"))
                usual = f"{axes.value}, " if axes else ""
                flag(s, "mirrored", m, f"{m} is stored {facts[s][m]['axcodes']} ({_show(value)} voxel axes), "
                     f"mirrored against the cohort's {usual}{common}: its voxel array is the others' mirror image, so "
                     f"whatever reads voxels without the affine (the model) sees its left and right swapped; "
                     f"{CANONICAL_FIX}")
            elif prop == "axes" and value != common.value and _same_hand(facts, s, m, ref):
                flag(s, "axes", m, f"{m} voxel axes point {value}, the cohort's most common is {common}: tools "
                     f"that ignore the affine see it rotated or flipped; {CANONICAL_FIX}")
    return out


def _same_hand(facts: dict[str, dict[str, dict]], subject: str, modality: str,
               ref: dict[tuple[str, str], Majority | None]) -> bool:
    """True unless the subject is already flagged ``mirrored`` (one flag per cause)."""
    hand = ref.get((modality, "handedness"))
    return hand is None or facts[subject][modality]["handedness"] == hand.value


def cohort_geometry(facts: dict[str, dict[str, dict]]) -> list[list[str]]:
    """Rows for the cohort page: modality, property, the most common value (count of total), and
    every other value with its subjects."""
    rows = []
    for (m, prop), values in sorted(_properties(facts).items()):
        common = majority(values)
        others: dict[object, list[str]] = {}
        for s, v in sorted(values.items()):
            if common is None or v is None or (v != common.value and (prop in ("axes", "handedness")
                                                                     or _differs(v, common.value))):
                others.setdefault(v, []).append(s)
        rest = "; ".join(f"{'none' if v is None else _show(v)}: {', '.join(ss[:8])}{' ...' if len(ss) > 8 else ''}"
                         for v, ss in others.items())
        rows.append([m, prop, str(common) if common else "no single most common value", rest or "-"])
    return rows
