"""What ``qc_report.py`` checks and draws: :class:`QCOptions`, one field per threshold or option,
and the tool's command-line options made from it (:func:`add_option_arguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from masan.argtypes import number
from masan.convert.registration import MIN_BRAIN_DICE, MIN_TEMPLATE_CORRELATION


class QCError(ValueError):
    """The report cannot be made (bad store, subject or output folder); the message names the fix."""


def _flag(default, flag: str | None, help: str, **argparse_kw):
    """A :class:`QCOptions` field that is also ``qc_report.py``'s option ``flag`` (None: none)."""
    return field(default=default, metadata={"flag": flag, "help": help, "argparse": argparse_kw})


@dataclass
class QCOptions:
    """What ``qc_report.py`` checks and draws. A field with a ``flag`` is that option of the
    tool, one for one (:func:`add_option_arguments`, :meth:`from_args`): a new threshold is one
    field here."""

    subjects: list[str] | None = _flag(None, "--subjects", "only these subjects (default: all); the cohort "
                                       "section still covers the whole store", nargs="+", metavar="ID")
    min_frames: int | None = _flag(None, "--min-frames", "flag fMRI runs with fewer frames (default: the "
                                   "cohort's most common run length, at least 2)", type=number(int, 1))
    z_threshold: float = _flag(3.5, "--z-threshold", "flag a modality whose mean or std is this many robust SD "
                               "(median / MAD) from the cohort median", type=number(float, above=0))
    clip_fraction: float = _flag(0.01, "--clip-fraction", "flag a volume with more than this share of its "
                                 "nonzero voxels at the maximum", type=number(float, 0, 1))
    fov_overlap: float = _flag(0.5, "--fov-overlap", "flag a subject with less than this share of the fMRI "
                               "foreground inside the T1 volume", type=number(float, 0, 1))
    min_template_corr: float = _flag(MIN_TEMPLATE_CORRELATION, "--min-template-corr", "registered stores: flag a "
                                     "T1 whose correlation with the template over its brain voxels is below this",
                                     type=number(float, -1, 1))
    min_brain_dice: float = _flag(MIN_BRAIN_DICE, "--min-brain-dice", "registered stores: flag an fMRI whose "
                                  "mean's brain mask overlaps the template's brain less (Dice)",
                                  type=number(float, 0, 1))
    carpet_voxels: int = _flag(1500, None, "voxel time series in the carpet (an evenly spaced sample of the "
                               "fMRI foreground)")
    dpi: int = _flag(80, None, "resolution of the figures")
    progress: bool = _flag(True, None, "a progress bar (qc_report.py: --no-progress)")

    @classmethod
    def from_args(cls, args, **given) -> "QCOptions":
        """Options from :func:`add_option_arguments`' parsed flags (``given`` wins)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["flag"] and hasattr(args, f.name)}
        return cls(**{**values, **given})


def add_option_arguments(parser) -> None:
    """One option per :class:`QCOptions` field with a ``flag``, its default shown."""
    for f in fields(QCOptions):
        if f.metadata["flag"]:
            default = "" if f.default is None else " (default: %(default)s)"
            parser.add_argument(f.metadata["flag"], dest=f.name, default=f.default,
                                help=f.metadata["help"] + default, **f.metadata["argparse"])
