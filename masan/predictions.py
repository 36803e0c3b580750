"""Per-subject predictions: the data class and the run directory's files that keep them.

Owns :class:`Predictions` and its files, so everything that makes or reads predictions
(training's end of run, ``python -m masan.predict``, the report) imports them from here. The
predictions themselves are computed by :mod:`masan.inference` (the model over a loader); this
module needs neither torch nor the model, so the report reads a run's files without them and
training writes them without importing :mod:`masan.evaluate`.

Files written by :func:`write_predictions` (read back by :func:`load_predictions`)::

    run_dir/predictions.csv     subject, split, label, pred, prob_<class>... [, score_<class>...]
                                (class names in label/pred; the prob_ columns give the class
                                order; score_ columns only when label smoothing was undone on
                                the prob_ ones, :attr:`Predictions.scores`; rows of the
                                evaluated split first, sorted by subject)
    run_dir/region_weights.npy  (N_eval, R) float32, row i = i-th evaluated-split row of the CSV
    run_dir/metrics.json        metrics of the evaluated split (masan.metrics), plus
                                "split", "decision" (:func:`decide`'s rule that made the
                                pred column), for extra splits "by_split": {name: metrics},
                                and "written_with": the SHA-256 of the two files above (a
                                set from two writes is refused when read)

Example (end of training, rank 0)::

    preds = predict_subjects(model, test_set, cfg, device, class_names)   # masan.inference
    write_predictions(preds, run_dir, class_names, cfg.data.positive_class)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from masan.files import atomic_writer, remove_stale_temporaries
from masan.metrics import prediction_metrics
from masan.rundir import RunDir

PROB_PREFIX = "prob_"
SCORE_PREFIX = "score_"
DECISIONS = ("argmax", "expected_stage")
"""The rules of :func:`decide` (``data.decision``)."""


class PredictionsError(ValueError):
    """Prediction inputs or files are inconsistent; the message names the file or subject."""


def decide(probs: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """(N,) int64 class called for each row of ``probs`` (N, C), classes in their order.

    ``argmax``: the most probable class. ``expected_stage``: the classes are ordered stages 0..C-1
    and the call is the stage nearest sum_k k p_k (halves round up, towards the later stage), so
    probability split between neighbouring stages calls the stage between them. Both call the
    same class when C = 2 (but at exactly 0.5 / 0.5, where arg-max takes the first)."""
    probs = np.asarray(probs)
    if rule == "argmax":
        return probs.argmax(axis=1).astype(np.int64)
    if rule == "expected_stage":
        stage = probs @ np.arange(probs.shape[1], dtype=np.float64) / np.maximum(probs.sum(axis=1), 1e-12)
        return np.clip(np.floor(stage + 0.5), 0, probs.shape[1] - 1).astype(np.int64)
    raise PredictionsError(f"decision rule {rule!r} is not one of {list(DECISIONS)}; set data.decision to one")


def unsmoothed(probs: np.ndarray, smoothing: float) -> np.ndarray:
    """float32 (N, C) class probabilities with the training's label smoothing undone.

    A head trained on targets smoothed by ``smoothing`` (eps, ``loss.label_smoothing``) estimates
    ``q = (1 - eps) p + eps / C``, not ``p``: every class keeps at least ``eps / C``, and under the
    expected stage every call is pulled towards the middle stage by about eps of a stage. The
    smoothing is a training device, so predictions report ``p = (q - eps / C) / (1 - eps)``,
    clipped at 0 and renormalised. The arg-max is unchanged; the order of subjects within a
    class is not always (a row with a class clipped is scaled down), so the AUC ranks by the
    head's own ``q`` (:attr:`Predictions.scores`). ``smoothing`` 0 returns ``probs``."""
    probs = np.asarray(probs, dtype=np.float32)
    if smoothing == 0 or probs.size == 0:
        return probs
    # a row of q sums to 1, so its excesses over eps / C sum to 1 - eps > 0: never all clipped
    p = np.clip((probs - smoothing / probs.shape[1]) / (1.0 - smoothing), 0.0, None)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Predictions:
    """Per-subject model outputs of one split.

    Attributes:
        subjects: N subject ids, sorted.
        labels: (N,) int64 true class index.
        probs: (N, C) float32 class probabilities (the softmax, label smoothing undone: :func:`unsmoothed`).
        region_weights: (N, R) float32 region weights (R = 0 when the model gives none).
        decision: how :attr:`preds` calls a class from ``probs`` (:func:`decide`).
        scores: (N, C) float32 the head's own softmax when ``probs`` had label smoothing undone,
            else None. The AUC ranks subjects by them: undoing the smoothing clips and
            renormalises each row, which can reorder subjects within a class.
    """

    subjects: list[str]
    labels: np.ndarray
    probs: np.ndarray
    region_weights: np.ndarray
    decision: str = "argmax"
    scores: np.ndarray | None = None

    def take(self, rows: Sequence[int]) -> Predictions:
        """The predictions of ``rows`` (indices), in that order."""
        rows = list(rows)
        return Predictions([self.subjects[i] for i in rows], self.labels[rows], self.probs[rows],
                           self.region_weights[rows], self.decision,
                           None if self.scores is None else self.scores[rows])

    @property
    def preds(self) -> np.ndarray:
        """(N,) int64 class called by :attr:`decision`."""
        return decide(self.probs, self.decision)

    def __len__(self) -> int:
        return len(self.subjects)


def merge_predictions(parts: Iterable[Predictions]) -> Predictions:
    """Concatenate predictions, keep one row per subject (a DistributedSampler pads with
    repeats) and sort by subject."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise PredictionsError("no predictions to merge (every part is empty)")
    subjects = [s for p in parts for s in p.subjects]
    first = {}
    for i, s in enumerate(subjects):
        first.setdefault(s, i)
    scored = all(p.scores is not None for p in parts)
    whole = Predictions(
        subjects=subjects,
        labels=np.concatenate([p.labels for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        region_weights=np.concatenate([p.region_weights for p in parts]),
        decision=parts[0].decision,
        scores=np.concatenate([p.scores for p in parts]) if scored else None,
    )
    return whole.take(first[s] for s in sorted(first))


def prediction_csv_rows(preds: Predictions, split: str, class_names: Sequence[str]) -> list[dict]:
    """predictions.csv rows: subject, split, label, pred (class names), prob_<class> (and
    score_<class> when ``preds`` has :attr:`~Predictions.scores`)."""
    rows = []
    for i, (s, y, p, pr) in enumerate(zip(preds.subjects, preds.labels, preds.preds, preds.probs)):
        row = {"subject": s, "split": split, "label": class_names[y] if y >= 0 else "", "pred": class_names[p]}
        row.update({f"{PROB_PREFIX}{c}": f"{v:.6g}" for c, v in zip(class_names, pr)})
        if preds.scores is not None:
            row.update({f"{SCORE_PREFIX}{c}": f"{v:.6g}" for c, v in zip(class_names, preds.scores[i])})
        rows.append(row)
    return rows


def split_metrics(preds: Predictions, class_names: Sequence[str], positive_class: str) -> dict:
    """:func:`masan.metrics.prediction_metrics` of the subjects with a diagnosis; subjects
    without one (label -1: new patients) count in ``n_unlabeled`` and in no metric."""
    labeled = preds.labels >= 0
    out = {"n_unlabeled": int((~labeled).sum())} if not labeled.all() else {}
    if labeled.any():
        out.update(prediction_metrics(preds.take(np.flatnonzero(labeled)), class_names, positive_class))
    return out


def write_predictions(
    preds: Predictions,
    run_dir: str | os.PathLike,
    class_names: Sequence[str],
    positive_class: str,
    split: str = "test",
    extra: Mapping[str, Predictions] | None = None,
) -> dict:
    """Write predictions.csv, region_weights.npy and metrics.json into ``run_dir`` (each
    atomically).

    Args:
        preds: predictions of the evaluated split (its metrics go to metrics.json, its
            region weights to region_weights.npy).
        run_dir: the run directory.
        class_names: C class names in model output order.
        positive_class: the positive class of precision/recall (the paper: AD).
        split: name of the evaluated split.
        extra: more splits (e.g. ``{"train": ...}``) appended to the CSV, their metrics under
            ``by_split`` in metrics.json.

    Returns:
        The metrics dict written to metrics.json.
    """
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run.root)  # of a write killed before its renames
    names = list(class_names)
    if preds.probs.shape[1:] != (len(names),):
        raise PredictionsError(f"predictions have {preds.probs.shape[1:]} classes, class_names {names}")
    metrics = {"split": split, "decision": preds.decision, **split_metrics(preds, names, positive_class)}
    rows = prediction_csv_rows(preds, split, names)
    if extra:
        metrics["by_split"] = {}
        for name, p in extra.items():
            metrics["by_split"][name] = split_metrics(p, names, positive_class)
            rows += prediction_csv_rows(p, name, names)

    csv_text = io.StringIO(newline="")
    w = csv.DictWriter(csv_text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    npy = io.BytesIO()  # np.save's own writes report a full disk without its errno
    np.save(npy, preds.region_weights.astype(np.float32))
    # metrics.json names the other two files' contents: the three are put in place one after
    # another, and a kill between two renames would leave a set that looks whole but is not
    together = {run.predictions.name: _sha256(csv_text.getvalue().encode()),
                run.region_weights.name: _sha256(npy.getvalue())}
    # All three are written and flushed before any replaces its old file: a full disk leaves the
    # old set whole, never new predictions beside old metrics.
    with contextlib.ExitStack() as stack:
        table, weights, summary = (stack.enter_context(atomic_writer(path, mode, **kw)) for path, mode, kw in (
            (run.predictions, "w", {"newline": ""}), (run.region_weights, "wb", {}), (run.metrics, "w", {})))
        table.write(csv_text.getvalue())
        weights.write(npy.getvalue())
        metrics[WRITTEN_WITH] = together
        json.dump(metrics, summary, indent=1)
        for f in (table, weights, summary):
            f.flush()
            os.fsync(f.fileno())
    return metrics


WRITTEN_WITH = "written_with"
"""metrics.json's key for the SHA-256 of the predictions.csv and region_weights.npy written with it."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_written_together(run: RunDir, metrics: dict) -> None:
    """PredictionsError when predictions.csv or region_weights.npy is not the file metrics.json
    was written with (a write stopped between its renames; files copied from two runs)."""
    for path in (run.predictions, run.region_weights):
        want = (metrics.get(WRITTEN_WITH) or {}).get(path.name)
        if want is not None and path.is_file() and _sha256(path.read_bytes()) != want:
            raise PredictionsError(f"{path} is not the file {run.metrics.name} was written with (a write was stopped "
                                   "between its files, or they were copied from two writes)")


def load_predictions(run_dir: str | os.PathLike, split: str = "test") -> tuple[Predictions, list[str]]:
    """Read back one split of a run's predictions.csv (+ region_weights.npy for the evaluated
    split; an empty (N, 0) array when the file is absent or belongs to another split), deciding
    classes by the rule its metrics.json records (arg-max when it records none, as runs made
    before the rule was configurable).

    A file that a copy or write left part way (a cut last line, fewer rows than metrics.json
    counts, a region_weights.npy that does not load) is named as truncated or damaged.

    Returns:
        (predictions, class_names)
    """
    run = RunDir(run_dir)
    path = run.predictions
    if not path.is_file():
        raise PredictionsError(f"{path} does not exist: the run has not written its predictions yet")
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raise PredictionsError(f"{path} is truncated (its last line is cut off)")
    try:
        reader = csv.DictReader(io.StringIO(raw.decode(), newline=""))
        names = [c[len(PROB_PREFIX):] for c in reader.fieldnames or [] if c.startswith(PROB_PREFIX)]
        all_rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise PredictionsError(f"{path} is damaged ({e})") from None
    if not names or not {"subject", "split", "label", "pred"} <= set(reader.fieldnames or ()):
        raise PredictionsError(f"{path} lacks the columns subject, split, label, pred, prob_<class>")
    rows = [r for r in all_rows if r["split"] == split]
    eval_split = all_rows[0]["split"] if all_rows else split
    try:
        metrics = json.loads(run.metrics.read_text()) if run.metrics.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictionsError(f"{run.metrics} is damaged ({e})") from None
    if not isinstance(metrics, dict):
        raise PredictionsError(f"{run.metrics} is damaged (it holds no JSON object)")
    if metrics.get("split", "test") == split and ("n" in metrics or "n_unlabeled" in metrics):
        expected = int(metrics.get("n", 0)) + int(metrics.get("n_unlabeled", 0))
        if len(rows) != expected:
            raise PredictionsError(f"{path} is truncated or damaged: it holds {len(rows)} '{split}' subjects, "
                                   f"{run.metrics.name} counts {expected}")
    try:
        labels = np.array([names.index(r["label"]) if r["label"] else -1 for r in rows], dtype=np.int64)
        probs = np.array([[float(r[PROB_PREFIX + c]) for c in names] for r in rows], dtype=np.float32)
        scores = (np.array([[float(r[SCORE_PREFIX + c]) for c in names] for r in rows], dtype=np.float32)
                  .reshape(len(rows), len(names)) if SCORE_PREFIX + names[0] in reader.fieldnames else None)
    except ValueError as e:
        raise PredictionsError(f"{path}: a label is not one of {names} or a probability is not a number ({e})"
                               ) from None
    rw = np.zeros((len(rows), 0), np.float32)
    if split == eval_split and run.region_weights.is_file():
        try:
            rw = np.load(run.region_weights)
        except (ValueError, OSError) as e:
            raise PredictionsError(f"{run.region_weights} is damaged ({e})") from None
        if rw.shape[0] != len(rows):
            raise PredictionsError(
                f"{run.region_weights} has {rw.shape[0]} rows but {path} has {len(rows)} '{split}' rows; "
                f"the files come from different runs: rerun the evaluation of this run"
            )
    probs = probs.reshape(len(rows), len(names))
    _check_written_together(run, metrics)  # last: the checks above name what is wrong more closely
    return Predictions([r["subject"] for r in rows], labels, probs, rw, metrics.get("decision", "argmax"),
                       scores), names
