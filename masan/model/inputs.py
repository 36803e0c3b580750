"""The model's input contract: which batch keys every model takes as keyword arguments, and the
dtype its inputs and parameters have for each ``train.precision``."""

import torch

MODALITY_KEYS = ("t1", "fmri")
"""``model(t1=(B, 1, X, Y, Z) | None, fmri=(B, T, x, y, z) | None)``: batch keys passed to the
model as keyword arguments; an absent key is passed as None."""

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``train.precision`` -> the dtype of the model's parameters and inputs."""
