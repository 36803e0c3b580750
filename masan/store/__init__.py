"""The cohort store: a Zarr v3 hierarchy of NIfTI-Zarr images, its layout, reader and safe writes.

The bottom layer of the data path: it imports no other masan data package and no torch
(conversion workers and the QC tool use it). Modules, imported directly:

- :mod:`masan.store.cohort`      layout names and ``CohortStore``, the read API
- :mod:`masan.store.nifti_zarr`  one image as a NIfTI-Zarr 1.0 / OME-Zarr 0.5 group
- :mod:`masan.store.permissions` who may read a store (the sources' most restrictive access)
- :mod:`masan.store.places`      what a folder is: a run directory or a cohort store
- :mod:`masan.store.publish`     locking, versions and atomic publication of a conversion

Store layout and fidelity choices: docs/data-format.md.
"""
