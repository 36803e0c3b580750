"""Visual quality check of a cohort store (the library behind ``data_tools/qc_report.py``).

Imports :mod:`masan.store` and :mod:`masan.convert.registration` (the template overlay), never
torch. Modules, imported directly:

- :mod:`masan.qc.report`   ``write_report``: the checks, figures and page of a store
- :mod:`masan.qc.options`  ``QCOptions``: what it checks and draws, and the tool's options
- :mod:`masan.qc.checks`   per-subject checks: header facts, value ranges, frames, overlap
- :mod:`masan.qc.geometry` cohort geometry checks: voxel size, TR, voxel axes
- :mod:`masan.qc.damage`   why a subject's arrays could not be read
- :mod:`masan.qc.figures`  orthogonal views, registration overlay, fMRI panel
- :mod:`masan.qc.page`     the static HTML page
"""
