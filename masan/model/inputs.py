"""The dtype the model's inputs and parameters have for each ``train.precision`` (the batch keys
it takes: :data:`masan.batch.MODALITY_KEYS`)."""

import torch

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``train.precision`` -> the dtype of the model's parameters and inputs."""
