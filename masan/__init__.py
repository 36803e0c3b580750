"""MASAN-HPC: multiscale autoencoder with structural-functional attention for AD classification.

The data path, top to bottom:
NIfTI -> store (masan.store.cohort) -> dataset (masan.data.dataset) -> model (masan.model)
-> loss (masan.model.loss) -> engine (masan.train) -> checkpoint/logs -> report (masan.evaluate).
"""

__version__ = "0.1.0"
