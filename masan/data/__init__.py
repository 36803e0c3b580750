"""Cohort data: NIfTI/BIDS -> Zarr v3 cohort store -> torch samples.

Modules (imported directly, so that conversion workers need not import torch):

- :mod:`masan.data.nifti`   NIfTI header facts, exact voxels, frame-slab streaming
- :mod:`masan.data.convert` cohort discovery and conversion (``data_tools/to_zarr.py``)
- :mod:`masan.data.store`   ``CohortStore``, the read API
- :mod:`masan.data.dataset` ``select_subjects`` and ``CohortDataset``
- :mod:`masan.data.splits`  stratified subject-level splits
- :mod:`masan.data.synth`   phantom cohorts with a planted effect (``data_tools/synth_cohort.py``)
- :mod:`masan.data.anatomy` MNI152 validation cohorts with planted effects (``synth_cohort.py --anatomy mni152``)

Store layout and fidelity choices: docs/data-format.md.
"""
