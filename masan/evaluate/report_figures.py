"""The region figures of a report (``python -m masan.evaluate``): which subject, which T1 slice,
which region names; the drawing is :mod:`masan.evaluate.plots`, the ranking
:mod:`masan.evaluate.region_ranking`.

Per method (a group of runs, see :mod:`masan.evaluate.report`), from the test subjects'
``region_weights.npy`` of all its repeats:

- ``<method>_region_ranking.png`` / ``.csv``: regions ranked by
  :func:`masan.evaluate.region_ranking.region_scores` (default: mean weight over the positive
  class, i.e. AD), with each class's mean weight;
- ``<method>_region_map_<subject>.png``: one test subject's region weights over its own T1
  (the paper's Fig. 4), read from the cohort store; default subject: the first
  positive-class test subject of the lowest repeat;
- ``<method>_region_map_mean_<class>.png``: the positive class's mean weights over that T1.

Regions are named by grid cell, or with ``atlas`` by the majority atlas label of each cell
(atlas resampled onto the displayed subject's T1 grid: see :func:`masan.evaluate.region_ranking.resample_atlas`).

A T1 is drawn only from a store that can show the run's test subjects (:func:`store_problem`):
one that holds them with the run's diagnoses, in the geometry the run trained on.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from masan.config import ConfigError
from masan.evaluate.plots import VIEWS, ranking_figure, region_map_figure, save_figure
from masan.evaluate.region_ranking import (
    RankMethod,
    atlas_region_names,
    grid_names,
    load_atlas_labels,
    region_scores,
    resample_atlas,
)
from masan.evaluate.report import RunResult
from masan.metrics import positive_index
from masan.rundir import RunDir


def slug(text: str) -> str:
    """File-name-safe form of a method name: ``"MASAN (fusion=add)"`` -> ``"masan-fusion-add"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _read_t1(store_path: str | os.PathLike, subject: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(T1 (X, Y, Z) float32, affine (4, 4)) of a subject from the store, or None with a warning."""
    from masan.store.cohort import CohortStore  # zarr only when a map is drawn

    try:
        store = CohortStore(store_path)
        return store.read_t1(subject, normalize=False), store.affine(subject, "t1")
    except Exception as e:  # noqa: BLE001 - a missing/moved store must not stop the tables and rankings
        warnings.warn(f"no region map for {subject}: cannot read its T1 from store {store_path} ({e}); "
                      f"pass --store with the cohort store the runs trained on", stacklevel=2)
        return None


def store_problem(run: RunResult, store: str | os.PathLike) -> str | None:
    """Why ``store`` cannot show ``run``'s test subjects (one line), or None when it can.

    A store of another cohort that lacks them, or holds them under other diagnoses, would draw
    another person's T1 under a subject's name; one in another geometry than the run trained on
    (orientation, grid, voxel size: :func:`masan.predict.check_contract`, the check predict
    makes) would draw the map mirrored or shifted under its L/R labels.
    """
    from masan.data.dataset import select_subjects  # torch and zarr only when a map is drawn
    from masan.predict import check_contract
    from masan.store.cohort import StoreError

    cfg, preds = run.config, run.predictions
    fix = f"pass the store {run.run_dir} was trained on (its data.store: {cfg.data.store})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the subjects it leaves out are named below
            subjects, labels, _ = select_subjects(store, cfg.data, unlabeled=True)
        have = dict(zip(subjects, labels))
        absent = [s for s in preds.subjects if s not in have]
        if absent:
            return (f"store {store} lacks {len(absent)} of the {len(preds)} test subjects of {run.run_dir} "
                    f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}): another cohort; {fix}")
        other = [(s, y) for s, y in zip(preds.subjects, preds.labels) if y >= 0 and have[s] >= 0 and have[s] != y]
        if other:
            s, y = other[0]
            return (f"store {store} gives {len(other)} test subject(s) of {run.run_dir} another diagnosis (e.g. {s}: "
                    f"{run.class_names[have[s]]} there, {run.class_names[y]} in the run): another cohort under the "
                    f"same subject ids; {fix}")
        check_contract(cfg, run.run_dir, store, list(preds.subjects))
    except (ConfigError, StoreError, OSError, ValueError) as e:
        return f"store {store} cannot show the test subjects of {run.run_dir}: " + str(e).replace("\n  - ", "; ")
    return None


def _pooled(name: str, members: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, list[str], list[RunResult]]:
    """Region weights (N, R) and labels (N,) of the test subjects of all runs sharing the first
    run's classes and region count, among the runs that have region weights."""
    def runs(rs: Sequence[RunResult]) -> str:
        return ", ".join(str(r.run_dir) for r in rs)

    # an absent file reads as zero regions, like a model that gives none: tell the two apart
    lost = [r for r in members if not RunDir(r.run_dir).region_weights.is_file()]
    if lost:
        warnings.warn(f"{name}: {RunDir.REGION_WEIGHTS_NAME} is missing in {runs(lost)}; left out of the region "
                      "figures", stacklevel=3)
    have = [r for r in members if r not in lost] or list(members)
    ref = have[0]
    same = [r for r in have if r.class_names == ref.class_names
            and r.predictions.region_weights.shape[1] == ref.predictions.region_weights.shape[1]]
    other = [r for r in have if r not in same]
    if other:
        warnings.warn(f"{name}: {runs(other)} have other classes or region counts than {ref.run_dir}; left out of "
                      f"the region figures", stacklevel=3)
    w = np.concatenate([r.predictions.region_weights for r in same])
    y = np.concatenate([r.predictions.labels for r in same])
    return w, y, ref.class_names, same


def _pick_subject(runs: Sequence[RunResult], pos: int, subject: str | None) -> tuple[RunResult, int] | None:
    """(run, row) of ``subject`` (first run that tested it) or of the first positive test subject."""
    for r in runs:
        for i, (s, y) in enumerate(zip(r.predictions.subjects, r.predictions.labels)):
            if (subject is not None and s == subject) or (subject is None and y == pos):
                return r, i
    return None


def _write_ranking_csv(path: Path, scores: np.ndarray, names: Sequence[str], w: np.ndarray, y: np.ndarray,
                       class_names: Sequence[str]) -> None:
    order = np.argsort(-scores, kind="stable")
    present = [c for c in range(len(class_names)) if (y == c).any()]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "region", "name", "score"] + [f"mean_{class_names[c]}" for c in present])
        for rank, r in enumerate(order, 1):
            out.writerow([rank, int(r), names[r], f"{scores[r]:.6g}"] + [f"{w[y == c, r].mean():.6g}" for c in present])


def method_figures(
    members: Sequence[RunResult],
    out_dir: str | os.PathLike,
    store: str | os.PathLike | None = None,
    atlas: str | os.PathLike | None = None,
    atlas_labels: str | os.PathLike | None = None,
    subject: str | None = None,
    rank_method: RankMethod = "mean",
    top_k: int = 15,
    views: Sequence[str] = VIEWS,
    name: str | None = None,
) -> list[Path]:
    """Draw the region figures of one method's runs into ``out_dir``; returns the files.

    Args:
        members: runs of one method (sorted by repeat).
        store: cohort store with the T1s; default the first run's ``data.store``. A store
            that cannot show the chosen run's test subjects (:func:`store_problem`) gives no map.
        atlas, atlas_labels: label volume (NIfTI) and optional index->name table.
        subject: test subject for the map (default: first positive-class test subject).
        rank_method: ``"mean"`` or ``"difference"`` (see ``region_scores``).
        top_k: regions in the bar chart.
        views: slice orientations of the map.
        name: the table row (file names and titles); default the runs' method.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = name or members[0].method
    w, y, class_names, runs = _pooled(method, members)
    if w.shape[1] == 0:
        warnings.warn(f"{method}: no region weights in the runs; no region figures", stacklevel=2)
        return []
    cfg = runs[0].config
    grid = list(cfg.model.patch_grid)
    pos = positive_index(class_names, runs[0].metrics.get("positive_class", cfg.data.positive_class))
    names = grid_names(grid)
    files: list[Path] = []

    picked = _pick_subject(runs, pos, subject)
    if picked is None:
        warnings.warn(f"{method}: subject {subject or class_names[pos]!r} is in no run's test part; no region map",
                      stacklevel=2)
    t1 = _read_t1(store or cfg.data.store, picked[0].predictions.subjects[picked[1]]) if picked else None
    problem = store_problem(picked[0], store or cfg.data.store) if t1 is not None else None
    if problem:
        warnings.warn(f"{method}: no region map: {problem}", stacklevel=2)
        t1 = None
    if atlas is not None:
        if t1 is None:
            warnings.warn("--atlas needs a T1 grid from the store; regions are named by grid cell", stacklevel=2)
        else:
            label_names = load_atlas_labels(atlas_labels) if atlas_labels else None
            names = atlas_region_names(resample_atlas(atlas, t1[0].shape, t1[1]), grid, label_names)

    stem = slug(method)
    scores = region_scores(w, y, pos, rank_method)
    _write_ranking_csv(out / f"{stem}_region_ranking.csv", scores, names, w, y, class_names)
    files.append(out / f"{stem}_region_ranking.csv")
    fig = ranking_figure(w, y, class_names, names, pos, rank_method, top_k,
                         title=f"{method}: regions ranked by " + (
                             f"mean weight over {class_names[pos]}" if rank_method == "mean"
                             else f"{class_names[pos]} minus rest") + f" ({len(y)} test predictions, {len(runs)} runs)")
    files.append(save_figure(fig, out / f"{stem}_region_ranking.png"))

    if t1 is not None:
        run, row = picked
        s = run.predictions.subjects[row]
        label = class_names[run.predictions.labels[row]]
        pred = class_names[run.predictions.preds[row]]
        fig = region_map_figure(t1[0], run.predictions.region_weights[row], grid, t1[1], views=views,
                                title=f"{method}, {s} ({label}, predicted {pred}, repeat {run.repeat})")
        files.append(save_figure(fig, out / f"{stem}_region_map_{slug(s)}.png"))
        fig = region_map_figure(t1[0], w[y == pos].mean(axis=0), grid, t1[1], views=views,
                                title=f"{method}: mean weights of {(y == pos).sum()} {class_names[pos]} "
                                      f"test prediction(s) over the T1 of {s}")
        files.append(save_figure(fig, out / f"{stem}_region_map_mean_{slug(class_names[pos])}.png"))
    return files
