"""The model's input contract: which batch keys every model takes as keyword arguments."""

MODALITY_KEYS = ("t1", "fmri")
"""``model(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None)``: batch keys passed to the
model as keyword arguments; an absent key is passed as None."""
