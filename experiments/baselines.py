"""The rows of the science experiment (experiments/science.py) that train no network, each
fitted on a repeat's training part and scored on its test part, the split the repeat's runs used
(their split.json):

- :class:`Oracle`: a logistic regression on the planted features (masan.evaluate.oracle): it
  knows where the effect was planted, so it says what finding it is worth;
- :class:`LinearBaseline`: a linear model that knows nothing of the planted effect, on the
  stored voxels: ``linear`` on the T1, ``linear_both`` on the T1 plus fMRI features. A network
  that does not beat it has learnt nothing a voxelwise ANOVA and a logistic regression would
  not find. ``linear_ordinal``: ``linear`` with the ordinal head MASAN has (one disease axis and
  cut-points, experiments/ordinal.py), so MASAN's margin over it is not its head's.

Both read only the cohort store; the oracle also its truth record (``planted_effect``). Each
calls a subject's class by the decision rule (arg-max or expected stage) that is more accurate in
cross-validation inside the repeat's training part (:func:`nested_decision`), the trained runs'
``data.decision`` on a tie; or, given one (``rule``), by that rule.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from experiments.ordinal import OrdinalLogistic
from masan.rundir import RunDir

K_CHOICES = (5, 10, 20, 50, 200, 2000)
"""Voxels kept by the ANOVA screening (SelectKBest), chosen by cross-validation. Reaching down
to a few voxels because a planted effect (or an atrophy) may sit in a small structure: a grid
whose smallest k the cross-validation keeps choosing holds the baseline back by its grid, not by
its model (docs/validation-cohort.md)."""
C_CHOICES = (0.01, 0.1, 1.0, 10.0)
"""Inverse L2 strengths of the logistic regression, chosen by cross-validation (10: weak
enough a penalty for the few voxels of a small k)."""
DEFAULT_K, DEFAULT_C = 200, 1.0
"""The setting used when the training part is too small to cross-validate (a class of one)."""
CV_FOLDS = 5
"""Stratified folds of the training part (fewer when a class has fewer subjects)."""


def cv_folds(y: np.ndarray) -> int:
    """Stratified folds a training part's labels ``y`` allow: :data:`CV_FOLDS`, fewer when a class
    has fewer subjects (below 2: no cross-validation)."""
    counts = np.bincount(y)
    return min(CV_FOLDS, int(counts[counts > 0].min()))


def nested_decision(model, X: np.ndarray, y: np.ndarray, seed: int, preferred: str) -> str:
    """The decision rule (masan.predictions.DECISIONS) whose calls are the most accurate over the
    classes in stratified cross-validation of the unfitted sklearn ``model`` on a training part
    (``X`` (N, F), ``y`` (N,)) alone: a row's probabilities need not be ordered by stage as the
    expected stage assumes (a multinomial model may split a subject between NC and AD), so each
    fitted row picks its own. Ties, and a class too small to fold, keep ``preferred``."""
    from masan.predictions import DECISIONS, decide

    folds = cv_folds(y)
    if folds < 2:
        return preferred
    with np.errstate(invalid="ignore", divide="ignore"):  # f_classif: a feature constant within every class
        prob = cross_val_predict(model, X, y, method="predict_proba",
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    classes = np.unique(y)
    accuracy = {rule: float((classes[decide(prob, rule)] == y).mean()) for rule in DECISIONS}
    best = max(accuracy.values())
    return preferred if accuracy[preferred] == best else max(accuracy, key=accuracy.get)


def metric_values(labels: np.ndarray, probs: np.ndarray, names: list[str], positive: str,
                  decision: str = "argmax") -> dict:
    """The table's numbers for test ``labels`` (N,) and class ``probs`` (N, C), each subject's
    class called by the rule ``decision`` (masan.predictions.decide): 4-class accuracy, and AD vs
    rest (called AD) accuracy, precision, recall and the AUC of P(AD); and the rule itself."""
    from masan.metrics import classification_metrics
    from masan.predictions import decide

    m = classification_metrics(labels, decide(probs, decision), names, positive, probs)
    return {**{k: m[k] for k in ("n", "accuracy", "binary_accuracy", "precision", "recall", "auc")},
            "decision": decision}


class SplitRow:
    """A row fitted on a repeat's split of the subjects the benchmark's config selects
    (``data_cfg``: classes, modalities; its ``decision`` is the rule a row keeps unless
    :func:`nested_decision` finds the other more accurate inside the training part; ``rule``, one
    of masan.predictions.DECISIONS, calls every split by that rule instead). Subclasses
    give :meth:`measure`, one feature vector per subject, measured once per store for all
    subjects."""

    def __init__(self, store, data_cfg, split_cfg, rule: str | None = None):
        from masan.data.dataset import select_subjects

        self.store, self.split_cfg, self.rule = store, split_cfg, rule
        subjects, labels, self.names = select_subjects(store, data_cfg)
        self.label = dict(zip(subjects, labels))
        self.positive, self.preferred = data_cfg.positive_class, data_cfg.decision
        self._features: dict[str, np.ndarray] | None = None

    def measure(self, subjects: list[str]) -> np.ndarray:
        """(N, F) features of ``subjects``."""
        raise NotImplementedError

    def features(self, subjects: list[str]) -> np.ndarray:
        if self._features is None:
            every = sorted(self.label)
            self._features = dict(zip(every, self.measure(every)))
        return np.stack([self._features[s] for s in subjects])

    def labels(self, subjects: list[str]) -> np.ndarray:
        return np.array([self.label[s] for s in subjects])

    def split(self, repeat: int, run_dirs: list[Path]):
        """The split the runs of this repeat used (the first split.json of ``run_dirs``), else
        made the same way the training makes it."""
        from masan.data.splits import Split, make_split

        for d in run_dirs:
            if RunDir(d).split.is_file():
                return Split.load(RunDir(d).split)
        cfg = dataclasses.replace(self.split_cfg, repeat=repeat)
        subjects = sorted(self.label)
        return make_split(subjects, [self.label[s] for s in subjects], cfg)

    def decision(self, model, X: np.ndarray, y: np.ndarray, seed: int) -> str:
        """The rule this row calls a split's test subjects by: its fixed ``rule``, else the one
        :func:`nested_decision` picks for the unfitted ``model`` on the training part ``X``, ``y``."""
        return self.rule or nested_decision(model, X, y, seed, self.preferred)

    def metrics(self, train_y: np.ndarray, test_y: np.ndarray, prob: np.ndarray, decision: str) -> dict:
        """:func:`metric_values` of ``prob`` (n_test, training classes in sorted order), classes
        called by ``decision``."""
        probs = np.zeros((len(test_y), len(self.names)))
        probs[:, np.unique(train_y)] = prob
        return metric_values(test_y, probs, self.names, self.positive, decision)


class Oracle(SplitRow):
    """The planted-feature oracle (:func:`masan.evaluate.oracle.planted_features`), with the
    chance baselines of the split's test part."""

    def measure(self, subjects: list[str]) -> np.ndarray:
        from masan.evaluate.oracle import planted_features

        return planted_features(self.store, subjects)

    def score(self, split) -> dict:
        from masan.evaluate.oracle import oracle_model, oracle_predict

        train_y, test_y = self.labels(split.train), self.labels(split.test)
        train_X = self.features(split.train)
        decision = self.decision(oracle_model(), train_X, train_y, split.random_state)
        out = self.metrics(train_y, test_y, oracle_predict(train_X, train_y, self.features(split.test)), decision)
        majority = int(np.bincount(train_y, minlength=len(self.names)).argmax())
        pos = self.names.index(self.positive)
        baseline = {"majority_class": self.names[majority], "majority_accuracy": float((test_y == majority).mean()),
                    "positive_class": self.positive, "never_positive_accuracy": float((test_y != pos).mean())}
        return {**out, "best_rank": None, "top3": None, "baseline": baseline}


# --------------------------------------------------------------------------- linear baseline


def region_ids(shape: tuple[int, ...], grid: list[int]) -> np.ndarray:
    """(X*Y*Z,) int: the flat C-order region of each voxel of a ``shape`` volume on ``grid``."""
    from masan.model.regions import num_regions, regions_to_voxels

    return regions_to_voxels(np.arange(num_regions(grid)), grid, shape).ravel().astype(np.int64)


def fmri_features(series: np.ndarray, grid: list[int]) -> np.ndarray:
    """Location-agnostic fMRI features of one run ``series`` (T, X, Y, Z) in scanner units:
    each voxel's temporal std as a fraction of its temporal mean (0 where the mean is not
    positive; X*Y*Z values), then the upper triangle of the Pearson correlations between the
    mean series of the ``grid``'s regions (R*(R-1)/2 values; 0 for a flat region). float32."""
    flat = series.reshape(series.shape[0], -1).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    amplitude = np.divide(std, mean, out=np.zeros_like(std), where=mean > 0)
    ids = region_ids(series.shape[1:], grid)
    regions = np.stack([flat[:, ids == r].mean(axis=1) for r in range(int(ids.max()) + 1)], axis=1)  # (T, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(regions, rowvar=False))
    return np.concatenate([amplitude, corr[np.triu_indices(corr.shape[0], 1)]]).astype(np.float32)


def linear_pipeline(blocks: dict[str, np.ndarray], ordinal: bool = False) -> Pipeline:
    """Features (N, F) -> class probabilities. In each block (name -> its column indices: one per
    modality, so the T1's many voxels do not crowd the fMRI's features out): constant features
    dropped, each feature standardised, the ``k`` of largest ANOVA F kept; then an L2 logistic
    regression on the kept features of all blocks: multinomial, or with ``ordinal`` the
    proportional-odds model of :class:`experiments.ordinal.OrdinalLogistic`."""
    per_block = [(name, Pipeline([("informative", VarianceThreshold()), ("scale", StandardScaler()),
                                  ("select", SelectKBest(f_classif, k=DEFAULT_K))]), cols)
                 for name, cols in blocks.items()]
    head = OrdinalLogistic if ordinal else LogisticRegression
    return Pipeline([("blocks", ColumnTransformer(per_block)), ("classify", head(C=DEFAULT_C, max_iter=5000))])


def fit_linear(X: np.ndarray, y: np.ndarray, seed: int, blocks: dict[str, np.ndarray] | None = None,
               ordinal: bool = False, jobs: int = 1) -> tuple[Pipeline, dict]:
    """:func:`linear_pipeline` (``ordinal``: its ordinal head) fitted on (``X`` (N, F), ``y``
    (N,)), ``blocks`` default one of all columns, with k (the same in every block, at most the
    block's non-constant features) and C chosen by stratified ``CV_FOLDS``-fold cross-validation
    (log loss) on these subjects alone, then refitted on all of them; the defaults when a class
    has a single subject. ``jobs``: processes fitting the grid's candidates (the choice is the
    same for any count).
    Returns (pipeline, chosen: {"k": {block: k}, "C": C, "cv_folds": folds})."""
    blocks = blocks if blocks is not None else {"all": np.arange(X.shape[1])}
    folds = cv_folds(y)
    informative = {n: int(VarianceThreshold().fit(X[:, cols]).get_support().sum()) for n, cols in blocks.items()}

    def ks(k: int) -> dict[str, int]:
        return {f"blocks__{n}__select__k": min(k, informative[n]) for n in blocks}

    pipe = linear_pipeline(blocks, ordinal)
    if folds < 2:
        c = DEFAULT_C
        pipe.set_params(**ks(DEFAULT_K), classify__C=c).fit(X, y)
    else:
        distinct = {tuple(ks(k).items()): ks(k) for k in K_CHOICES}.values()  # blocks smaller than k: all, once
        grid = [{**{key: [v] for key, v in each.items()}, "classify__C": list(C_CHOICES)} for each in distinct]
        search = GridSearchCV(pipe, grid, scoring="neg_log_loss", n_jobs=jobs, error_score="raise",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        with np.errstate(invalid="ignore", divide="ignore"):  # f_classif: a feature constant within every class
            search.fit(X, y)
        pipe, c = search.best_estimator_, search.best_params_["classify__C"]
    k = {n: pipe.get_params()[f"blocks__{n}__select__k"] for n in blocks}
    return pipe, {"k": k, "C": c, "cv_folds": folds if folds >= 2 else 0}


def region_weights(pipe: Pipeline, blocks: dict[str, np.ndarray], feature_region: np.ndarray,
                   regions: int) -> np.ndarray:
    """(R,) where a fitted :func:`linear_pipeline` looks: the summed |coefficient| (over the
    classes, on standardised features) of the kept features of each region, normalised to sum
    1; features of no region (``feature_region`` -1: correlations) do not count."""
    steps = pipe["blocks"].named_transformers_
    kept = np.concatenate([cols[np.flatnonzero(steps[n]["informative"].get_support())[steps[n]["select"].get_support()]]
                           for n, cols in blocks.items()])
    weight = np.abs(pipe["classify"].coef_).sum(axis=0)
    region = feature_region[kept]
    w = np.bincount(region[region >= 0], weights=weight[region >= 0], minlength=regions)
    return w / w.sum() if w.sum() > 0 else w


class LinearBaseline(SplitRow):
    """``linear`` (``fmri=False``): the z-scored T1 voxels of the store (``read_t1``, flattened,
    X*Y*Z features); ``linear_both`` (``fmri=True``): those plus :func:`fmri_features` of the
    stored run, screened as a block of their own; ``ordinal``: the ordinal head
    (``linear_ordinal``). Fitted by :func:`fit_linear` on the split's training part (its grid
    on ``jobs`` processes); ``region_weights`` in its result, one row per test subject, for the
    region ranking of the other rows."""

    def __init__(self, store, data_cfg, split_cfg, grid: list[int], fmri: bool, rule: str | None = None,
                 ordinal: bool = False, jobs: int = 1):
        super().__init__(store, data_cfg, split_cfg, rule)
        self.grid, self.fmri, self.ordinal, self.jobs = list(grid), fmri, ordinal, jobs
        self.blocks: dict[str, np.ndarray] = {}
        """Modality -> its feature columns (set by :meth:`measure`)."""
        self.feature_region: np.ndarray | None = None
        """(F,) the grid region of each feature, -1 for none (set by :meth:`measure`)."""

    def measure(self, subjects: list[str]) -> np.ndarray:
        rows = []
        for s in subjects:
            parts = [self.store.read_t1(s, normalize=True).ravel()]
            if self.fmri:
                parts.append(fmri_features(self.store.read_fmri(s, normalize=False), self.grid))
            rows.append(np.concatenate(parts))
        if len({r.size for r in rows}) > 1:
            raise ValueError(f"{self.store.path}: the subjects' volumes differ in shape; the linear baseline "
                             "needs one voxel grid (convert with to_zarr.py --t1-shape/--fmri-shape)")
        first = subjects[0]
        ids = [region_ids(self.store.shape(first, "t1"), self.grid)]
        if self.fmri:
            voxels = region_ids(self.store.shape(first, "fmri")[1:], self.grid)
            ids += [voxels, np.full(rows[0].size - ids[0].size - voxels.size, -1)]
        self.feature_region = np.concatenate(ids)
        columns = np.arange(rows[0].size)
        self.blocks = {"t1": columns[:ids[0].size]}
        if self.fmri:
            self.blocks["fmri"] = columns[ids[0].size:]
        return np.stack(rows)

    def score(self, split) -> dict:
        t = time.perf_counter()
        train_y, test_y = self.labels(split.train), self.labels(split.test)
        train_X = self.features(split.train)  # measures every subject once: blocks and regions set
        pipe, chosen = fit_linear(train_X, train_y, split.random_state, self.blocks, self.ordinal, self.jobs)
        decision = self.decision(clone(pipe), train_X, train_y, split.random_state)
        out = self.metrics(train_y, test_y, pipe.predict_proba(self.features(split.test)), decision)
        weights = region_weights(pipe, self.blocks, self.feature_region, math.prod(self.grid))
        return {**out, "chosen": chosen, "region_weights": np.tile(weights, (len(test_y), 1)),
                "minutes": (time.perf_counter() - t) / 60}
