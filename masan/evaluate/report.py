"""Aggregate finished runs into the paper's Table 2: mean ± std over repeats, per method.

A run directory counts when it holds ``config.yaml``, ``metrics.json``, ``predictions.csv``
and the ``DONE`` marker of a run that trained all its epochs (one that ``train.max_steps``
stopped early is unfinished: :func:`masan.rundir.ended_early`), and its prediction files agree
with each other; other runs are listed as skipped with the reason, never crashed on. Unfinished
runs reported on request (``require_done=False``) are named in a warning and marked in every
output (``finished`` false, "unfinished" in the table's row name). A run reached by two paths
(``runs/demo`` and its absolute path, a symlinked parent) counts once.

The scores are recomputed from each run's ``predictions.csv`` (:func:`masan.predictions.split_metrics`,
what training wrote metrics.json with); a metrics.json that disagrees (edited, or from other
predictions) is warned about, naming the run and the metric, and the recomputed values are used.
Runs are grouped by method:

    H-FCN                  model.arch=hfcn
    MASAN                  model.arch=masan, modalities=both, fusion=attention
    MASAN (fusion=add)     the paper's ablation (Fig. 3)
    MASAN (T1 only) / MASAN (fMRI only)   single-modality variants (no fusion)

Table metrics are the paper's: accuracy, precision and recall with the positive class (AD)
vs the rest (``binary_accuracy``, ``precision``, ``recall`` of metrics.json), in %, mean ±
sample standard deviation (ddof=1; undefined for a single run) over the runs of a method,
plus the multi-class accuracy, F1 and AUC as extra columns. An undefined value (None: recall of
a test part without AD, :mod:`masan.metrics`) is missing, not 0: a cell is the mean of the runs
that define it, and says how many when that is fewer than its row's runs.

Only comparable runs share a row: runs of one method that differ in ``data.classes``, the
positive class or the cohort store (``data.store``, resolved) measure different things, so
each such variant is its own row, named by what differs, e.g. ``MASAN [classes NC/AD]``.
Rows of different methods that differ in them (a binary NC/AD run beside a 4-class one) are
warned about, and table.md shows each row's classes (and positive class) when they differ.
A run's positive class is the one its metrics.json was computed with (``positive_class`` there),
checked against its prediction files; the run's config.yaml decides only for metrics files that
do not name one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masan.config import SAME_METHOD, ConfigError, ModelConfig, RunConfig, config_diff, flagged_keys, load_config
from masan.files import atomic_write_json, atomic_write_text, atomic_writer
from masan.metrics import METRIC_TITLES, METRICS, PER_CLASS_METRICS, SUMMARY_METRICS, TABLE_METRICS, MetricsError
from masan.predictions import Predictions, PredictionsError, load_predictions, prediction_csv_rows, split_metrics
from masan.rundir import RunDir

METHOD_ORDER = ("H-FCN", "MASAN", "MASAN (fusion=add)", "MASAN (T1 only)", "MASAN (fMRI only)")
"""Table row order: the baseline first, then the paper's model and its ablation."""
SAME_METHOD_MAY_DIFFER = flagged_keys(SAME_METHOD)
"""Config keys (or sections) that may differ between repeats of one method without a warning:
the fields marked :data:`masan.config.SAME_METHOD`."""


REPORT_FILES = {"table_csv": "table.csv", "table_md": "table.md", "table_json": "table.json",
                "runs_csv": "runs.csv", "predictions_csv": "predictions.csv"}
"""The files :func:`write_report` writes into the report folder (key -> name)."""
FIGURES_DIR = "figures"
"""The report folder's subfolder of region figures (``python -m masan.evaluate``)."""


class RunNotReady(Exception):
    """A run directory cannot be reported yet (unfinished or incomplete); str() says why."""


@dataclass
class RunResult:
    """One finished run, read back from its directory."""

    run_dir: Path
    config: RunConfig
    metrics: dict
    predictions: Predictions
    class_names: list[str]
    unfinished: str | None = None
    """Why the run has not finished (:meth:`masan.rundir.RunDir.unfinished`), None when it has."""

    @property
    def method(self) -> str:
        return method_name(self.config.model)

    @property
    def repeat(self) -> int:
        return self.config.split.repeat


def method_name(model_cfg: ModelConfig) -> str:
    """Table row name of a model config (see the module docstring)."""
    if model_cfg.arch == "hfcn":
        return "H-FCN"
    if model_cfg.modalities != "both":
        return f"MASAN ({'T1' if model_cfg.modalities == 't1' else 'fMRI'} only)"
    return "MASAN" if model_cfg.fusion == "attention" else f"MASAN (fusion={model_cfg.fusion})"


def _recreate(run: Path, split: str) -> str:
    """How to rewrite a run's prediction files: they are reproducible from its final checkpoint."""
    part = "" if split == "test" else f" --split {split}"
    out = run.parent / f"{run.name}_predictions_{split}"
    return (f"recreate them from the run's final checkpoint: python -m masan.predict {run}{part} --out {out}, then "
            f"copy {RunDir.PREDICTIONS_NAME}, {RunDir.REGION_WEIGHTS_NAME} and {RunDir.METRICS_NAME} from {out} "
            f"into {run}")


METRIC_TOLERANCE = 1e-4
"""How far a metrics.json value may lie from the one recomputed from predictions.csv (whose
probabilities are rounded to 6 digits) before it counts as disagreeing."""


def _disagree(stored: object, fresh: float | None) -> bool:
    if stored is None or fresh is None:
        return stored is not fresh
    return not (isinstance(stored, (int, float)) and math.isclose(stored, fresh, abs_tol=METRIC_TOLERANCE))


def checked_metrics(run: Path, stored: dict, preds: Predictions, class_names: list[str], positive: str) -> dict:
    """``stored`` (the run's metrics.json) with every metric recomputed from its predictions
    (:func:`masan.predictions.split_metrics`); warns naming each metric metrics.json disagrees on."""
    fresh = split_metrics(preds, class_names, positive)
    differ = [f"{m.name} {stored.get(m.name)!r} (predictions.csv: {fresh.get(m.name)!r})"
              for m in METRICS if _disagree(stored.get(m.name), fresh.get(m.name))]
    if differ:
        warnings.warn(f"{RunDir(run).metrics} disagrees with {RunDir(run).predictions} in {', '.join(differ)}: "
                      "the table uses the values recomputed from predictions.csv; metrics.json was edited or "
                      f"written for other predictions ({_recreate(run, stored.get('split', 'test'))})", stacklevel=2)
    return {**stored, **fresh}


def load_run(run_dir: str | os.PathLike, require_done: bool = True) -> RunResult:
    """Read a run directory; raises :class:`RunNotReady` naming what is missing or broken.

    With ``require_done``, a run whose DONE records a stop by ``train.max_steps`` before all
    its epochs is unfinished too: its scores are those of a partly trained model. Without it,
    such a run is read with ``unfinished`` saying why. The metrics are :func:`checked_metrics`."""
    run = Path(run_dir)
    if not run.exists():
        raise RunNotReady("does not exist; check the path (a run directory holds config.yaml)")
    if not run.is_dir():
        raise RunNotReady("not a directory; pass a run directory (it holds config.yaml) or a folder above runs")
    rd = RunDir(run)
    # a run submitted but not started has its submitted config or job records; a report or a
    # predict --out (predictions.csv and metrics.json alone) is no run at all
    if rd.any_config() is None and not rd.jobs.is_file() and not rd.checkpoints.is_dir():
        raise RunNotReady(f"not a run directory: no {RunDir.CONFIG_NAME} in it or in any folder below it; pass "
                          "training run directories, or a folder above them (e.g. runs/)")
    needed = [RunDir.CONFIG_NAME, RunDir.METRICS_NAME, RunDir.PREDICTIONS_NAME] + (
        [RunDir.DONE_NAME] if require_done else [])
    missing = [n for n in needed if not (run / n).is_file()]
    if missing:
        raise RunNotReady(f"unfinished: no {', '.join(missing)}")
    try:
        cfg = load_config(rd.config)
    except ConfigError as e:
        raise RunNotReady(f"unreadable {RunDir.CONFIG_NAME}: {e}") from None
    why = rd.unfinished(cfg)
    if why is not None and require_done:
        raise RunNotReady(f"unfinished: {why}; finish it (start it again: it resumes, with a larger "
                          "train.max_steps if that stopped it), or pass --allow-unfinished to report it")
    try:
        metrics = json.loads(rd.metrics.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunNotReady(f"{rd.metrics} is not valid JSON ({e}); {_recreate(run, 'test')}") from None
    if not isinstance(metrics, dict):
        raise RunNotReady(f"{rd.metrics} holds {json.dumps(metrics)[:40]}, not the metrics of a run (a JSON object); "
                          f"{_recreate(run, 'test')}")
    absent = [m for m in TABLE_METRICS if m not in metrics]
    if absent:
        raise RunNotReady(f"{rd.metrics} lacks {absent}: not written by masan.predictions.write_predictions; "
                          f"{_recreate(run, 'test')}")
    split = metrics.get("split", "test")
    try:
        preds, names = load_predictions(run, split)
        positive = metrics.get("positive_class")
        metrics = checked_metrics(run, metrics, preds, names,
                                  positive if isinstance(positive, str) else cfg.data.positive_class)
    except (PredictionsError, MetricsError) as e:
        raise RunNotReady(f"{e}; {_recreate(run, split)}") from None
    return RunResult(run, cfg, metrics, preds, names, why)


def expand_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path that holds a config.yaml is a run; otherwise the folders below it that hold
    one are (so ``runs/`` finds ``runs/<variant>/repeat_R``; no search inside a run). A path
    with neither is kept, to be reported as skipped. A run reached by several paths (relative
    and absolute, through a symlink) is kept once, as first spelled, with a warning: counted
    twice, it would weigh twice in its row's mean and shrink the std."""
    out: list[Path] = []
    for p in map(Path, paths):
        found = []
        if p.is_dir() and not RunDir(p).config.is_file():
            for root, dirs, files in os.walk(p):
                if RunDir.CONFIG_NAME in files:
                    found.append(Path(root))
                    dirs.clear()
                dirs.sort()
        out.extend(found or [p])
    first: dict[str, Path] = {}
    again: dict[str, list[Path]] = {}
    for p in out:
        key = os.path.realpath(p)
        if key not in first:
            first[key] = p
        else:
            again.setdefault(key, []).append(p)
    for key, paths in again.items():
        others = ", ".join(str(p) for p in dict.fromkeys(paths))
        warnings.warn(f"run {first[key]} is given more than once (also as {others}); counted once", stacklevel=2)
    return list(first.values())


def collect_runs(
    run_dirs: Iterable[str | os.PathLike], require_done: bool = True
) -> tuple[list[RunResult], list[tuple[Path, str]]]:
    """Load every run; returns (runs, [(run_dir, why skipped)]), warning per skip and, without
    ``require_done``, per unfinished run reported."""
    runs, skipped = [], []
    for d in expand_run_dirs(run_dirs):
        try:
            runs.append(load_run(d, require_done))
        except RunNotReady as e:
            skipped.append((d, str(e)))
            warnings.warn(f"skipping run {d}: {e}", stacklevel=2)
            continue
        if runs[-1].unfinished:
            warnings.warn(f"UNFINISHED run {d} reported (--allow-unfinished), marked unfinished in the tables: "
                          f"{runs[-1].unfinished}", stacklevel=2)
    return runs, skipped


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in SAME_METHOD_MAY_DIFFER)


COMPARABLE = {"classes": "data.classes", "positive": "positive class", "store": "data.store"}
"""What runs pooled into one table row must share (key -> what the messages call it): other
classes or another positive class make precision and recall other quantities, another cohort
store other subjects. Runs that differ in one are reported as separate rows."""


def _comparable(r: RunResult) -> dict[str, str]:
    """The values of :data:`COMPARABLE` of a run, as shown in a row name."""
    return {"classes": "/".join(r.class_names),
            "positive": str(r.metrics.get("positive_class", r.config.data.positive_class)),
            "store": os.path.realpath(r.config.data.store)}


def _split_incomparable(method: str, members: list[RunResult]) -> dict[str, list[RunResult]]:
    """``{row name: runs}``: one row when the runs share :data:`COMPARABLE`, else one per variant,
    named ``"<method> [<key> <value>, ...]"`` by the keys that differ (with a warning)."""
    variants: dict[tuple, list[RunResult]] = {}
    for r in members:
        variants.setdefault(tuple(_comparable(r).items()), []).append(r)
    if len(variants) == 1:
        return {method: members}
    differing = [k for k in COMPARABLE if len({dict(v)[k] for v in variants}) > 1]
    rows = {f"{method} [{', '.join(f'{k} {dict(v)[k]}' for k in differing)}]": runs for v, runs in variants.items()}
    shown = "; ".join(f"{name}: {', '.join(str(r.run_dir) for r in runs)}" for name, runs in rows.items())
    warnings.warn(f"{method}: runs differ in {', '.join(COMPARABLE[k] for k in differing)}, so their scores are "
                  f"not comparable: reported as separate rows ({shown})", stacklevel=3)
    return rows


def _warn_shared_test_sets(name: str, members: Sequence[RunResult]) -> None:
    """Warn when repeats of a row tested the same subjects (tiny cohorts can split alike): their
    scores are one measurement, not independent ones, and the std understates the spread."""
    by_test: dict[frozenset, list[RunResult]] = {}
    for r in members:
        by_test.setdefault(frozenset(r.predictions.subjects), []).append(r)
    for same in by_test.values():
        repeats = sorted({r.repeat for r in same})
        if len(repeats) > 1:  # one repeat twice is warned about in group_runs
            warnings.warn(f"{name}: repeats {repeats} ({', '.join(str(r.run_dir) for r in same)}) "
                          "have the same test subjects: their scores are not independent and the std over repeats "
                          "understates the spread; keep one of them or use a larger cohort", stacklevel=3)


def group_runs(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs per table row (a method, split further by :data:`COMPARABLE`) in table order, each
    row sorted by repeat. Warns when runs of one row differ in more than the repeat (e.g.
    another lr), repeat a split, or share a test set."""
    by_method: dict[str, list[RunResult]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    ordered: dict[str, list[RunResult]] = {}
    for method, members in sorted(by_method.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        ordered.update(sorted(_split_incomparable(method, members).items()))
    for name, members in ordered.items():
        members.sort(key=lambda r: (r.repeat, str(r.run_dir)))
        for r in members[1:]:
            diff = [d for d in config_diff(members[0].config, r.config) if not _ignored(d.split(":")[0])]
            if diff:
                warnings.warn(f"{name}: {r.run_dir} differs from {members[0].run_dir} in {diff[:5]}", stacklevel=2)
        reps = [r.repeat for r in members]
        dup = sorted({x for x in reps if reps.count(x) > 1})
        if dup:
            warnings.warn(f"{name}: repeat(s) {dup} appear more than once; their splits are the same", stacklevel=2)
        _warn_shared_test_sets(name, members)
    _warn_rows_differ(ordered)
    _warn_test_sets_differ(ordered)
    return ordered


def _warn_test_sets_differ(rows: Mapping[str, Sequence[RunResult]]) -> None:
    """Warn when comparable rows (the same :data:`COMPARABLE`) tested other subjects in the same
    repeat: a row whose model reads a modality some subjects lack leaves them out before its
    split is made (:func:`masan.data.dataset.select_subjects`), so its repeat r is another split,
    and the difference between the rows is partly one of subjects."""
    tested: dict[tuple, dict[frozenset, list[str]]] = {}
    for name, members in rows.items():
        for r in members:
            key = (tuple(_comparable(r).items()), r.repeat)
            tested.setdefault(key, {}).setdefault(frozenset(r.predictions.subjects), []).append(name)
    for (_, repeat), sets in sorted(tested.items(), key=lambda kv: kv[0][1]):
        if len(sets) > 1:
            shown = "; ".join(f"{', '.join(sorted(set(names)))}: {len(subjects)}"
                              for subjects, names in sorted(sets.items(), key=lambda kv: -len(kv[0])))
            warnings.warn(f"repeat {repeat}: the rows tested different subjects ({shown} test subjects), so their "
                          "scores differ partly by subjects, not only by method: a model that reads a modality some "
                          "subjects lack leaves them out before its split (convert with --require t1 fmri to give "
                          "every row the same subjects), or the runs' split settings differ", stacklevel=3)


def _warn_rows_differ(rows: Mapping[str, Sequence[RunResult]]) -> None:
    """Warn when rows of different methods differ in :data:`COMPARABLE` (rows of one method that
    do were split and warned about by :func:`_split_incomparable`): e.g. a binary NC/AD row beside
    a 4-class one, whose accuracies, precisions and recalls are other quantities."""
    values = {name: _comparable(members[0]) for name, members in rows.items()}
    method = {name: members[0].method for name, members in rows.items()}
    differing = [k for k in COMPARABLE
                 if any(values[a][k] != values[b][k] and method[a] != method[b] for a in rows for b in rows)]
    if differing:
        shown = "; ".join(f"{name}: {', '.join(values[name][k] for k in differing)}" for name in rows)
        warnings.warn(f"the table's rows differ in {', '.join(COMPARABLE[k] for k in differing)} ({shown}): their "
                      "scores measure different tasks or cohorts and are not comparable across those rows; report "
                      "runs of one task and cohort together", stacklevel=3)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, count) in % of the defined values (None is missing, never 0)."""
    v = np.array([x for x in values if x is not None], dtype=np.float64) * 100.0
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def summary_table(groups: dict[str, list[RunResult]]) -> list[dict]:
    """One row per method: ``method, runs, unfinished`` (how many of them), ``repeats, classes,
    positive_class`` and, per metric of SUMMARY_METRICS, ``<metric>_mean``/``<metric>_std`` in %
    (None when undefined) and ``<metric>_n``, the runs that define it (undefined ones are missing)."""
    rows = []
    for method, members in groups.items():
        row = {
            "method": method,
            "runs": len(members),
            "unfinished": sum(r.unfinished is not None for r in members),
            "repeats": [r.repeat for r in members],
            "classes": sorted({"/".join(r.class_names) for r in members}),
            "positive_class": sorted({r.metrics.get("positive_class", "") for r in members}),
        }
        for m in SUMMARY_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"] = _mean_std([r.metrics.get(m) for r in members])
        rows.append(row)
    return rows


def format_cell(mean: float | None, std: float | None, n: int | None = None, runs: int | None = None) -> str:
    """``"67.55 ± 4.26"``; ``"67.55 ± n/a"`` for a single run; ``"n/a"`` without values;
    ``" (n=2)"`` added when only ``n`` of the row's ``runs`` define the value."""
    if mean is None:
        return "n/a"
    cell = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± n/a"
    return cell + (f" (n={n})" if n is not None and runs is not None and n < runs else "")


def row_label(row: dict) -> str:
    """A summary row's name in tables, ``"MASAN (1 of 3 runs unfinished)"`` when it pools
    unfinished runs (``--allow-unfinished``)."""
    if not row.get("unfinished"):
        return row["method"]
    return f"{row['method']} ({row['unfinished']} of {row['runs']} runs unfinished)"


def markdown_table(rows: Sequence[dict], metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """The summary as a Markdown table (values in %, mean ± std over repeats), with the classes
    (and positive class) of each row when they differ between rows."""
    shown = [(title, key) for title, key in (("Classes", "classes"), ("Positive class", "positive_class"))
             if len({tuple(r[key]) for r in rows}) > 1]
    head = ["Method", "Runs"] + [title for title, _ in shown] + [METRIC_TITLES[m] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([row_label(r), str(r["runs"])] + [", ".join(r[key]) for _, key in shown]
                 + [format_cell(r[f"{m}_mean"], r[f"{m}_std"], r.get(f"{m}_n"), r["runs"]) for m in metrics])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_notes(rows: Sequence[dict], groups: Mapping[str, Sequence[RunResult]],
                metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """The lines under table.md that explain its marks: cells over fewer runs, unfinished runs."""
    notes = []
    if any(r[f"{m}_n"] < r["runs"] for r in rows for m in metrics):
        notes.append("n/a: undefined in every run of the row; (n=K): the mean ± std of the K runs that define it. "
                     "A value is undefined, not 0, e.g. recall and F1 of a test part without a positive-class "
                     "subject, or AUC with one class only.")
    late = [r for members in groups.values() for r in members if r.unfinished]
    if late:
        notes.append("Unfinished runs (reported with --allow-unfinished: scores of partly trained models):")
        notes += [f"- {r.run_dir}: {r.unfinished}" for r in late]
    return "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_writer(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def run_rows(groups: Mapping[str, Sequence[RunResult]]) -> list[dict]:
    """Per-run metrics: run_dir, method (the table row, :func:`group_runs`), repeat, finished
    (false: reported with --allow-unfinished), n, the scalar metrics and per-class ones (empty
    where undefined)."""
    rows = []
    for method, r in ((method, r) for method, members in groups.items() for r in members):
        m = r.metrics
        row = {"run_dir": str(r.run_dir), "method": method, "repeat": r.repeat, "finished": r.unfinished is None,
               "n_test": m.get("n")}
        row.update({k.name: m.get(k.name) for k in METRICS})
        for c, pc in m.get("per_class", {}).items():
            row.update({f"{k}/{c}": pc[k] for k in (*PER_CLASS_METRICS, "support")})
        rows.append(row)
    return rows


def prediction_rows(groups: Mapping[str, Sequence[RunResult]]) -> list[dict]:
    """Every evaluated subject of every run: run_dir, method (the table row), repeat, then the
    predictions.csv columns."""
    rows = []
    for method, r in ((method, r) for method, members in groups.items() for r in members):
        head = {"run_dir": str(r.run_dir), "method": method, "repeat": r.repeat}
        split = r.metrics.get("split", "test")
        rows += [{**head, **row} for row in prediction_csv_rows(r.predictions, split, r.class_names)]
    return rows


def write_report(runs: Sequence[RunResult], skipped: Sequence[tuple[Path, str]], out_dir: str | os.PathLike,
                 record: Callable[[Path], object] = lambda path: path,
                 groups: Mapping[str, list[RunResult]] | None = None) -> dict:
    """Write the tables into ``out_dir``, each atomically, calling ``record(path)`` after each
    (:meth:`masan.evaluate.report_folder.ReportFolder.record`); returns ``{"rows": summary rows,
    "groups": {row name: runs} (:func:`group_runs`, or ``groups`` when the caller grouped
    ``runs`` already), "files": {name: path}}``.

    Files: ``table.csv``/``table.md``/``table.json`` (summary per method; the JSON also lists
    runs, with ``finished`` and why not, and skipped runs), ``runs.csv`` (metrics per run),
    ``predictions.csv`` (all subjects).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = dict(groups) if groups is not None else group_runs(runs)
    rows = summary_table(groups)
    files = {k: out / n for k, n in REPORT_FILES.items()}
    _write_csv(files["table_csv"], [{**r, "repeats": " ".join(map(str, r["repeats"])),
                                     "classes": " ".join(r["classes"]),
                                     "positive_class": " ".join(r["positive_class"])} for r in rows])
    record(files["table_csv"])
    md = ("Values in %, mean ± std over repeats; accuracy, precision and recall with the positive class "
          "vs the rest.\n\n")
    atomic_write_text(files["table_md"], md + markdown_table(rows) + table_notes(rows, groups))
    record(files["table_md"])
    atomic_write_json(files["table_json"], {
        "methods": rows,
        "runs": [{"run_dir": str(r.run_dir), "method": method, "repeat": r.repeat, "finished": r.unfinished is None,
                  **({"unfinished": r.unfinished} if r.unfinished else {})}
                 for method, members in groups.items() for r in members],
        "skipped": [{"run_dir": str(d), "reason": why} for d, why in skipped],
    })
    record(files["table_json"])
    _write_csv(files["runs_csv"], run_rows(groups))
    record(files["runs_csv"])
    _write_csv(files["predictions_csv"], prediction_rows(groups))
    record(files["predictions_csv"])
    return {"rows": rows, "groups": groups, "files": files}
