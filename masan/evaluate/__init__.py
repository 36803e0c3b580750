"""Evaluation: predictions, the paper's metrics (AD vs rest), Table-2 report and figures.

Used by training (end-of-run predictions, TensorBoard epoch metrics) and by the command
``python -m masan.evaluate RUN_DIR [RUN_DIR ...] --out REPORT_DIR``.
"""

from masan.evaluate.metrics import MetricsError, classification_metrics, flat_scalars, positive_index
from masan.evaluate.predict import (
    Predictions,
    PredictionsError,
    epoch_metrics,
    gather_predictions,
    load_predictions,
    merge_predictions,
    predict,
    write_predictions,
)
from masan.evaluate.regions import rank_regions, region_scores

__all__ = [
    "MetricsError", "Predictions", "PredictionsError", "classification_metrics", "epoch_metrics", "flat_scalars",
    "gather_predictions", "load_predictions", "merge_predictions", "positive_index", "predict", "rank_regions",
    "region_scores", "write_predictions",
]
