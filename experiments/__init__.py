"""Validation experiments: does the model learn what it should, on cohorts whose truth is known?
(How fast it runs is bench/'s question.)

Run each from the repository root as a module, e.g. ``python -m experiments.science``:
``experiments`` and ``masan`` then import with the repository as the only path entry (the
working directory), and no script edits ``sys.path``. Modules:

- :mod:`experiments.science`: the science experiment's command line and its run, from the
  cohort to the table;
- :mod:`experiments.cohort`: the validation cohort, made once per set of cohort arguments (its stamp);
- :mod:`experiments.training`: the trained variants, one run's command line, and training it
  once (its stamp: reused, resumed or started afresh);
- :mod:`experiments.scoring`: a run's score against the planted truth, and the printed lines and table;
- :mod:`experiments.baselines`: the rows fitted without training (oracle, linear baselines).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root: the experiments run its tools (data_tools/, launch/) from there."""
