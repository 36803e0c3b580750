"""Evaluation: the paper's Table 2, region rankings and figures over finished runs.
The command ``python -m masan.evaluate RUN_DIR [RUN_DIR ...] --out REPORT_DIR``.

Modules, one role each (none is imported by training, except :mod:`~masan.evaluate.plots`
lazily, when TensorBoard logs images). A run's prediction files (predictions.csv,
region_weights.npy, metrics.json) are :mod:`masan.predictions`, which training writes too;
the predictions themselves come from :mod:`masan.inference`, the metrics from :mod:`masan.metrics`.

- :mod:`~masan.evaluate.report`: runs grouped per method, Table 2 (mean ± std over repeats);
- :mod:`~masan.evaluate.region_ranking`: region weights -> named, ranked regions (numbers only;
  the model's own patch grid is :mod:`masan.model.regions`);
- :mod:`~masan.evaluate.plots`: matplotlib figures (confusion matrix, region map, ranking bars);
- :mod:`~masan.evaluate.report_figures`: which figures a report writes, for which subject;
- :mod:`~masan.evaluate.oracle`: the planted-effect oracle of the synthetic cohorts.
"""
