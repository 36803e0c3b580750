"""The batch contract between the data and the model: which keys of a batch hold the images.

A dataset item or a cached batch is a dict; its image keys are the model's keyword arguments
(``model(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None)``). It sits below both
:mod:`masan.data` (which produces these keys) and :mod:`masan.model` (which takes them), so
neither imports the other for it.
"""

MODALITY_KEYS = ("t1", "fmri")
"""Batch keys passed to the model as keyword arguments; an absent key is passed as None."""
