"""NIfTI/BIDS -> cohort store conversion (the library behind ``data_tools/to_zarr.py``).

Imports :mod:`masan.store` only, and never torch: conversions run in worker processes that
must start fast. Modules, imported directly:

- :mod:`masan.convert.sources`      finding and checking a cohort's subjects (BIDS, manifest)
- :mod:`masan.convert.nifti`        NIfTI header facts, exact voxels, frame-slab streaming
- :mod:`masan.convert.resample`     resampling onto one voxel size (``--spacing``)
- :mod:`masan.convert.registration` ANTs registration onto the MNI152 template (``--register``)
- :mod:`masan.convert.template`     the MNI152 template: maps, grids on its brain box, partial-volume sampling
- :mod:`masan.convert.options`      ``ConvertOptions``: how voxels are laid out, checked
- :mod:`masan.convert.subject`      ``convert_subject``: one subject -> a published version (a worker's job)
- :mod:`masan.convert.cohort`       ``convert_cohort``: subjects -> a published store
"""
