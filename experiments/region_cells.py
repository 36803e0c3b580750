"""How finely to cut each region, and how many region features to keep, chosen without a test
subject: a linear proxy on a pretrained MASAN's region features, cross-validated inside one
split's training part.

MASAN screens its region features once, at the start of the joint phase, from the encoders the
pretraining left (``model.screen_fraction``, masan/model/standardize.py). This tool takes a run's
checkpoint of that moment, pools the encoders' levels at each ``--cells`` (``model.fusion_cells``),
fuses the modalities as the model does (eq. 6, the gates as they are then) and scores, for each
``--keep``, ANOVA screening + standardising + a balanced logistic regression by repeated stratified
K-fold inside the run's training part (split.json ``train`` + ``val``). The test part is never
read. Example (a run of ``python -m experiments.science``; its last checkpoint of the pretraining
phase unless ``--checkpoint`` names another)::

    python -m experiments.region_cells runs/science-adni-like/runs/masan/r0 --cells 3 4 5 \\
        --keep 40 68 100 160 300

It prints one markdown row per cells value: 4-class / AD-vs-rest accuracy per kept count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PROXY_C = 0.01
"""Inverse L2 strength of the proxy's logistic regression (strong: a few dozen subjects)."""


def proxy_scores(features: np.ndarray, labels: np.ndarray, keeps: list[int], positive: int, folds: int = 5,
                 repeats: int = 3, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Cross-validated (4-class accuracy, positive-vs-rest accuracy of the arg-max) of the proxy
    keeping each of ``keeps`` features.

    Args:
        features: ``(N, F)`` float, one row per training-part subject.
        labels: ``(N,)`` int class indices.
        keeps: counts of features the ANOVA screening keeps (each <= F).
        positive: index of the positive class (AD).
    """
    cv = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed).split(features, labels))
    out = {}
    for k in keeps:
        scores = []
        for train, test in cv:
            proxy = make_pipeline(SelectKBest(f_classif, k=k), StandardScaler(),
                                  LogisticRegression(C=PROXY_C, class_weight="balanced", max_iter=3000))
            pred = proxy.fit(features[train], labels[train]).predict(features[test])
            truth = labels[test]
            scores.append(((pred == truth).mean(), ((pred == positive) == (truth == positive)).mean()))
        out[k] = tuple(float(v) for v in np.mean(scores, axis=0))
    return out


@torch.no_grad()
def region_feature_rows(model, samples: list[dict], cells: int) -> np.ndarray:
    """``(N, R * D)`` the region features the head of ``model`` would screen, with the encoders'
    levels pooled at ``cells`` cells per region and axis (the model's own cells are restored after)."""
    pooled = [m for m in (model.spm, model.fpm.spatial if model.fpm is not None else None) if m is not None]
    own = [m.cells for m in pooled]
    try:
        for module in pooled:
            module.cells = cells  # pooling only: the encoders and the fusion gates are size-agnostic
        rows = [model.region_inputs(sample.get("t1"), sample.get("fmri")).flatten() for sample in samples]
    finally:
        for module, kept in zip(pooled, own):
            module.cells = kept
    return torch.stack(rows).float().numpy()


def pretraining_end(run_dir: Path) -> str:
    """The tag of ``run_dir``'s newest complete checkpoint saved in the pretraining phase: the
    encoders the screening is fitted on (ValueError when the run kept none)."""
    from masan.model.loss import PHASES
    from masan.train.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir, keep=1)
    for tag in manager.complete_tags():  # newest first
        if manager.manifest(tag).get("state", {}).get("phase") == PHASES[0]:
            return tag
    raise ValueError(f"{run_dir} keeps no complete checkpoint of its pretraining phase; pass --checkpoint TAG "
                     "(a checkpoint's folder name, step_N) or train the run again")


def training_part(run_dir: Path, checkpoint: str):
    """(model, training-part samples as batches of one, their labels, the positive class index)."""
    from masan.data.dataset import CohortDataset, select_subjects
    from masan.data.splits import Split
    from masan.predict import load_trained_model
    from masan.rundir import RunDir

    model, cfg, classes, _, _ = load_trained_model(run_dir, torch.device("cpu"), checkpoint, allow_unfinished=True)
    split = Split.load(RunDir(run_dir).split)
    subjects = list(split.part("train")) + list(split.part("val"))
    label = dict(zip(*select_subjects(cfg.data.store, cfg.data)[:2]))
    labels = np.array([label[s] for s in subjects])
    data = CohortDataset(cfg.data.store, subjects, list(labels), cfg.data)
    samples = [{k: v[None].float() for k, v in data[i].items() if k in ("t1", "fmri")} for i in range(len(data))]
    return model, samples, labels, classes.index(cfg.data.positive_class)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a MASAN training run (its split.json and checkpoints)")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint tag (step_N; default: the run's last checkpoint of its pretraining phase)")
    ap.add_argument("--cells", type=int, nargs="+", default=[3, 4, 5], help="model.fusion_cells values to compare")
    ap.add_argument("--keep", type=int, nargs="+", default=[40, 68, 100, 160, 300],
                    help="region features the screening keeps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.checkpoint = args.checkpoint or pretraining_end(args.run_dir)
    model, samples, labels, positive = training_part(args.run_dir, args.checkpoint)
    print(f"{args.run_dir}: {len(labels)} training-part subjects, checkpoint {args.checkpoint}; proxy: ANOVA top-k, "
          f"logistic regression C {PROXY_C}, 5-fold x 3; 4-class / AD-vs-rest accuracy\n")
    print("| cells | features | " + " | ".join(f"keep {k}" for k in args.keep) + " |")
    print("|---|---|" + "---|" * len(args.keep))
    for cells in args.cells:
        start = time.perf_counter()
        rows = region_feature_rows(model, samples, cells)
        scores = proxy_scores(rows, labels, args.keep, positive)
        print(f"| {cells} | {rows.shape[1]:,} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in scores.values())
              + f" |  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
