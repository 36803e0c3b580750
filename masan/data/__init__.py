"""Training-time data: a cohort store's subjects -> torch samples, splits and the node cache.

Imports :mod:`masan.store` (the reader) and :mod:`masan.convert.resample` (voxel sizes, for
the contract); the conversion, QC and synthesis tools live in :mod:`masan.convert`,
:mod:`masan.qc` and :mod:`masan.synth`. Modules, imported directly:

- :mod:`masan.data.dataset`    ``select_subjects`` and ``CohortDataset``
- :mod:`masan.data.splits`     stratified subject-level splits
- :mod:`masan.data.transforms` train-only augmentation
- :mod:`masan.data.temporal`   how an fMRI run is presented (z-score or fluctuations)
- :mod:`masan.data.cache`      the node-wide cohort cache (``data.cache``): decode once, share
- :mod:`masan.data.batches`    the cache's training batches, prepared ahead and scaled on the device
- :mod:`masan.data.contract`   the geometry contract between a store, a model and a run
- :mod:`masan.data.workers`    how DataLoader workers start (a fork server by default)
"""
