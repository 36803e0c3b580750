"""Command-line options shared by the cohort tools (data_tools/synth_cohort.py, experiments/science.py):
the shapes and the planted effect of both generators, the phantom (:mod:`masan.synth.phantom`) and
the MNI152 cohort (:mod:`masan.synth.anatomy`); kept apart from both so that neither imports the
other for its options."""

from __future__ import annotations

from masan.argtypes import number
from masan.synth import presets, structures
from masan.synth.phantom import PlantedEffect


def add_shape_arguments(parser, defaults: dict[str, str]) -> None:
    """The ``--t1-shape X Y Z``, ``--fmri-shape X Y Z`` and ``--frames T`` options of the cohort
    tools (None when not given); ``defaults`` says, per option name, what is taken instead."""
    parser.add_argument("--t1-shape", nargs=3, type=number(int, 1), default=None, metavar=("X", "Y", "Z"),
                        help=f"T1 voxels (default: {defaults['t1-shape']})")
    parser.add_argument("--fmri-shape", nargs=3, type=number(int, 1), default=None, metavar=("X", "Y", "Z"),
                        help=f"fMRI frame voxels (default: {defaults['fmri-shape']})")
    parser.add_argument("--frames", type=number(int, 1), default=None,
                        help=f"fMRI frames per run (default: {defaults['frames']})")


def add_effect_arguments(parser, anatomy_group=None) -> None:
    """The planted effect's ``--strength``, ``--structures`` and ``--stages`` options of the cohort
    tools (None when not given: the generators' defaults); the two MNI152-only ones go into
    ``anatomy_group`` (default ``parser``)."""
    group = anatomy_group or parser
    parser.add_argument("--strength", nargs="+", type=number(float, 0, 1), default=None, metavar="K",
                        help="effect at severity 1, in [0, 1] (phantom: one value, default %s; mni152: one "
                             "value for both modalities or T1 and fMRI, default the --preset's: %s)" % (
                                 PlantedEffect.strength, ", ".join(f"{name} {' '.join(map(str, p.strength))}"
                                                                   for name, p in presets.PRESETS.items())))
    group.add_argument("--structures", nargs="+", default=None, choices=sorted(structures.STRUCTURES), metavar="NAME",
                       help="structures carrying the effect (default: hippocampus amygdala); one of "
                            + ", ".join(sorted(structures.STRUCTURES)))
    group.add_argument("--stages", nargs=4, type=number(float, 0, 1), default=None,
                       metavar=("T1_START", "T1_END", "FMRI_START", "FMRI_END"),
                       help="severity window over which each modality's effect rises from 0 to full (default "
                            "0 1 0 1: both alike); e.g. 0.33 1 0 0.67: fMRI changes before atrophy, as in the "
                            "amyloid-cascade model, so fMRI separates the early classes and T1 the late ones")
