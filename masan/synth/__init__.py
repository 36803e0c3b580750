"""Synthetic cohorts with planted effects (the library behind ``data_tools/synth_cohort.py``).

Writes BIDS folders of NIfTI files that :mod:`masan.convert` turns into stores; imports
:mod:`masan.convert` (NIfTI writing, the effect file's name, the MNI152 template), never torch.
Modules, imported directly:

- :mod:`masan.synth.phantom`     phantom cohorts with a planted group effect
- :mod:`masan.synth.anatomy`     MNI152 validation cohorts with planted, graded AD-like effects
- :mod:`masan.synth.structures`  named structures (ellipsoids in MNI mm), their masks and region ranks
- :mod:`masan.synth.bold`        the MNI152 cohort's fMRI signal model
- :mod:`masan.synth.deformation` where a subject's anatomy sits: rigid placement, warps, sampling through them
- :mod:`masan.synth.presets`     named difficulty settings of the MNI152 cohort
- :mod:`masan.synth.options`     command-line options shared by the cohort tools

What the validation cohorts plant: docs/validation-cohort.md.
"""
