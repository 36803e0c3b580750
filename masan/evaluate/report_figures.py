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
- ``<method>_region_map_mean_<class>.png``: the positive class's mean weights over that T1
  (over the default subject's T1 when ``subject`` is in no run's test part: that map does not
  need it).

Regions are named by grid cell, or with ``atlas`` by the majority atlas label of each cell
(atlas resampled onto the displayed subject's T1 grid: see :func:`masan.evaluate.region_ranking.resample_atlas`).
An atlas that gives no region a label is refused, one that hardly overlaps the T1 warned about
(:func:`masan.evaluate.region_ranking.atlas_overlap`): both say that atlas and T1 are in other spaces.

:func:`plan_figures` does everything that may refuse or read (subject, T1, atlas) before
:func:`draw_figures` writes a file, so a report is refused before its first file.

A T1 is drawn only from a store that can show the run's test subjects (:func:`store_problem`):
one that holds them with the run's diagnoses, in the geometry the run trained on.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masan.config import ConfigError
from masan.evaluate.plots import TOP_K, VIEWS, ranking_figure, region_map_figure, save_figure
from masan.evaluate.region_ranking import (
    RankMethod,
    atlas_on_grid,
    atlas_overlap,
    atlas_region_names,
    grid_names,
    load_atlas_labels,
    region_scores,
)
from masan.evaluate.report import RunResult
from masan.files import atomic_writer
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
        subjects, labels, _ = select_subjects(store, cfg.data, unlabeled=True, quiet=True)  # absences named below
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
        unchecked = check_contract(cfg, run.run_dir, store, list(preds.subjects))
        if unchecked:
            warnings.warn(unchecked, stacklevel=3)
    except (ConfigError, StoreError, OSError, ValueError) as e:
        return f"store {store} cannot show the test subjects of {run.run_dir}: " + str(e).replace("\n  - ", "; ")
    return None


def _region_places(run: RunResult) -> tuple:
    """What makes region r of ``run`` one box of the brain: its patch grid and the T1 geometry
    it trained on (``store_geometry.json``: grid, voxel size, orientation, registration; None
    for runs older than that file)."""
    path = RunDir(run.run_dir).store_geometry
    try:
        geo = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        geo = None
    place = None if not isinstance(geo, dict) else json.dumps(
        {k: geo.get(k) for k in ("t1_shape", "t1_spacing_mm", "orientation", "registration")}, sort_keys=True)
    return tuple(run.config.model.patch_grid), place


def _pooled(name: str, members: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, list[str], list[RunResult]]:
    """Region weights (N, R) and labels (N,) of the test subjects of all runs sharing the first
    run's classes, region count and region places (:func:`_region_places`: another grid or a
    store of another orientation numbers other boxes, or the mirrored side, alike), among the
    runs that have region weights."""
    def runs(rs: Sequence[RunResult]) -> str:
        return ", ".join(str(r.run_dir) for r in rs)

    # an absent file reads as zero regions, like a model that gives none: tell the two apart
    lost = [r for r in members if not RunDir(r.run_dir).region_weights.is_file()]
    if lost:
        warnings.warn(f"{name}: {RunDir.REGION_WEIGHTS_NAME} is missing in {runs(lost)}; left out of the region "
                      "figures", stacklevel=3)
    have = [r for r in members if r not in lost] or list(members)
    ref = have[0]
    places = _region_places(ref)  # one read of the reference's store_geometry.json, not one per run
    same = [r for r in have if r.class_names == ref.class_names
            and r.predictions.region_weights.shape[1] == ref.predictions.region_weights.shape[1]
            and _region_places(r) == places]
    other = [r for r in have if r not in same]
    if other:
        warnings.warn(f"{name}: {runs(other)} have other classes, region counts, patch grids or store geometries "
                      f"(orientation, T1 grid, voxel size, registration) than {ref.run_dir}, so their region numbers "
                      "name other boxes of the brain; left out of the region figures", stacklevel=3)
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
    with atomic_writer(path, newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "region", "name", "score"] + [f"mean_{class_names[c]}" for c in present])
        for rank, r in enumerate(order, 1):
            out.writerow([rank, int(r), names[r], f"{scores[r]:.6g}"] + [f"{w[y == c, r].mean():.6g}" for c in present])


@dataclass
class FigurePlan:
    """What the region figures of one table row show, read and checked before anything is drawn."""

    name: str
    """The table row (file names and titles)."""
    weights: np.ndarray
    """(N, R) region weights of the pooled test predictions."""
    labels: np.ndarray
    """(N,) their true class indices."""
    class_names: list[str]
    runs: list[RunResult]
    """The runs pooled (same classes and region count)."""
    pos: int
    """Index of the positive class."""
    region_names: list[str]
    """R names: grid cells, or atlas labels."""
    rank_method: RankMethod
    scores: np.ndarray
    """(R,) the ranking's scores (:func:`masan.evaluate.region_ranking.region_scores`)."""
    subject: tuple[RunResult, int] | None
    """(run, row) of the subject whose own map is drawn; None: no subject map."""
    t1: tuple[np.ndarray, np.ndarray, str] | None
    """(T1 (X, Y, Z), affine (4, 4), subject id) under the maps; None: no maps."""


def plan_figures(
    members: Sequence[RunResult],
    store: str | os.PathLike | None = None,
    atlas: str | os.PathLike | None = None,
    atlas_labels: str | os.PathLike | None = None,
    subject: str | None = None,
    rank_method: RankMethod = "mean",
    name: str | None = None,
) -> FigurePlan | None:
    """Choose and read what :func:`draw_figures` draws for one row's runs; None when the runs
    have no region weights. Raises :class:`masan.evaluate.region_ranking.RegionError` for an
    atlas that labels no region.

    Args:
        members: runs of one method (sorted by repeat).
        store: cohort store with the T1s; default the first run's ``data.store``. A store
            that cannot show the chosen run's test subjects (:func:`store_problem`) gives no map.
        atlas, atlas_labels: label volume (NIfTI) and optional index->name table.
        subject: test subject for the map (default: first positive-class test subject).
        rank_method: ``"mean"`` or ``"difference"`` (see ``region_scores``).
        name: the table row (file names and titles); default the runs' method.
    """
    method = name or members[0].method
    w, y, class_names, runs = _pooled(method, members)
    if w.shape[1] == 0:
        warnings.warn(f"{method}: no region weights in the runs; no region figures", stacklevel=2)
        return None
    cfg = runs[0].config
    grid = list(cfg.model.patch_grid)
    pos = positive_index(class_names, runs[0].metrics.get("positive_class", cfg.data.positive_class))
    names = grid_names(grid)

    picked = _pick_subject(runs, pos, subject)
    shown = picked
    if picked is None and subject is not None:
        shown = _pick_subject(runs, pos, None)  # the class-mean map needs a T1, not that subject
        warnings.warn(f"{method}: subject {subject!r} is in no run's test part; no map of it"
                      + (f" (the class-mean map is drawn over the T1 of {shown[0].predictions.subjects[shown[1]]})"
                         if shown else ""), stacklevel=2)
    elif picked is None:
        warnings.warn(f"{method}: no {class_names[pos]} subject in any run's test part; no region map", stacklevel=2)
    where = store or cfg.data.store
    t1 = None
    if shown is not None:
        s = shown[0].predictions.subjects[shown[1]]
        read = _read_t1(where, s)
        problem = store_problem(shown[0], where) if read is not None else None
        if problem:
            warnings.warn(f"{method}: no region map: {problem}", stacklevel=2)
        elif read is not None:
            t1 = (*read, s)
    if atlas is not None:
        if t1 is None:
            warnings.warn("--atlas needs a T1 grid from the store; regions are named by grid cell", stacklevel=2)
        else:
            labels, inside = atlas_on_grid(atlas, t1[0].shape, t1[1])
            far = atlas_overlap(labels, inside, grid, atlas, f"{t1[2]} (store {where})")
            if far:
                warnings.warn(far, stacklevel=2)
            names = atlas_region_names(labels, grid, load_atlas_labels(atlas_labels) if atlas_labels else None)
    scores = region_scores(w, y, pos, rank_method)
    return FigurePlan(method, w, y, class_names, runs, pos, names, rank_method, scores,
                      picked if t1 is not None else None, t1)


def draw_figures(plan: FigurePlan, out_dir: str | os.PathLike, top_k: int = TOP_K, views: Sequence[str] = VIEWS,
                 record: Callable[[Path], object] = lambda path: path) -> list[Path]:
    """Write the figures of ``plan`` into ``out_dir``, each atomically, calling ``record(path)``
    after each (:meth:`masan.evaluate.report_folder.ReportFolder.record`); returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method, w, y, class_names, pos = plan.name, plan.weights, plan.labels, plan.class_names, plan.pos
    rank_method = plan.rank_method
    grid = list(plan.runs[0].config.model.patch_grid)
    stem = slug(method)
    files: list[Path] = []

    def saved(path: Path) -> None:
        record(path)
        files.append(path)

    _write_ranking_csv(out / f"{stem}_region_ranking.csv", plan.scores, plan.region_names, w, y, class_names)
    saved(out / f"{stem}_region_ranking.csv")
    fig = ranking_figure(w, y, class_names, plan.region_names, pos, rank_method, top_k,
                         title=f"{method}: regions ranked by " + (
                             f"mean weight over {class_names[pos]}" if rank_method == "mean"
                             else f"{class_names[pos]} minus rest")
                         + f" ({len(y)} test predictions, {len(plan.runs)} runs)")
    saved(save_figure(fig, out / f"{stem}_region_ranking.png"))

    if plan.t1 is None:
        return files
    t1, affine, under = plan.t1
    if plan.subject is not None:
        run, row = plan.subject
        s = run.predictions.subjects[row]
        label = class_names[run.predictions.labels[row]]
        pred = class_names[run.predictions.preds[row]]
        fig = region_map_figure(t1, run.predictions.region_weights[row], grid, affine, views=views,
                                title=f"{method}, {s} ({label}, predicted {pred}, repeat {run.repeat})")
        saved(save_figure(fig, out / f"{stem}_region_map_{slug(s)}.png"))
    fig = region_map_figure(t1, w[y == pos].mean(axis=0), grid, affine, views=views,
                            title=f"{method}: mean weights of {(y == pos).sum()} {class_names[pos]} "
                                  f"test prediction(s) over the T1 of {under}")
    saved(save_figure(fig, out / f"{stem}_region_map_mean_{slug(class_names[pos])}.png"))
    return files
