"""Stratified subject-level train/test splits, one per repeat (the paper: 70/30, 10 repeats).

A split depends only on the set of (subject, label) pairs and on ``split_cfg``: the pairs
are sorted by subject before splitting, so the order a caller lists subjects in does not
matter. Repeat ``r`` uses the random state ``split_cfg.seed + r``; nothing else changes
between repeats. The test part is for the final evaluation only: the training loop never
selects models or stops early on it.

Example::

    split = make_split(subjects, labels, cfg.split)      # labels: class index or name per subject
    split.save(RunDir(run_dir).split)                    # run_dir/split.json
    same = Split.load(RunDir(run_dir).split)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import train_test_split

from masan.config import SplitConfig
from masan.files import atomic_write_json

PARTS = ("train", "val", "test")


class SplitError(ValueError):
    """A split cannot be made or does not match; the message says why and what to do."""


@dataclass
class Split:
    """One repeat's partition of the subjects.

    Attributes:
        train: training subjects, sorted (the model's gradient steps; without ``val``).
        test: test subjects, sorted (disjoint from ``train``).
        repeat: repeat index r.
        seed: the base seed ``split.seed`` of the config; the random state used is
            ``seed + repeat`` (see :attr:`random_state`).
        test_fraction: requested fraction of subjects in ``test``.
        labels: subject -> label (class index or name) the split was stratified on.
        val: validation subjects carved from the training part (stratified), sorted;
            for monitoring only (the final model is the last one), never trained on.
        val_fraction: requested fraction of the training part held out as ``val``.
    """

    train: list[str]
    test: list[str]
    repeat: int
    seed: int
    test_fraction: float = 0.3
    labels: dict[str, Hashable] = field(default_factory=dict)
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.0

    @property
    def random_state(self) -> int:
        return self.seed + self.repeat

    def part(self, name: str) -> list[str]:
        """Subjects of part ``"train"``, ``"val"`` or ``"test"``."""
        if name not in PARTS:
            raise SplitError(f"split part {name!r} does not exist; use one of {PARTS}")
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["random_state"] = self.random_state
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON atomically (:mod:`masan.files`)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(p, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise SplitError(f"split file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise SplitError(f"split file {p} is not valid JSON ({e}); delete it to make the split again") from None
        d.pop("random_state", None)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"train", "test", "repeat", "seed"} - set(d)
        if missing or set(d) - names:
            raise SplitError(
                f"split file {p} has keys {sorted(d)}; expected {sorted(names)} "
                f"(missing {sorted(missing)}): it was not written by Split.save"
            )
        return cls(**d)


def min_per_class(test_fraction: float) -> int:
    """Subjects a class needs so that a ``test_fraction`` split leaves some of it in both parts."""
    return math.ceil(max(2, 1 / test_fraction, 1 / (1 - test_fraction)) - 1e-9)


def _describe(counts: Counter, names: Sequence[str] | None) -> str:
    """``'NC': 5, 'AD': 2``: subjects per class, a class index shown as its name when ``names`` holds it."""
    def name(c: Hashable) -> Hashable:
        return names[c] if names is not None and isinstance(c, int) and 0 <= c < len(names) else c

    return ", ".join(f"{name(c)!r}: {n}" for c, n in sorted(counts.items(), key=lambda cn: str(name(cn[0]))))


def _check_class_sizes(counts: Counter, test_fraction: float, names: Sequence[str] | None) -> None:
    """Refuse splits that would leave a class out of the train or the test part."""
    too_small = Counter({
        c: n for c, n in counts.items() if n < 2 or n * test_fraction < 1 or n * (1 - test_fraction) < 1
    })
    if too_small:
        need = min_per_class(test_fraction)
        raise SplitError(
            f"too few subjects for a stratified split with test_fraction={test_fraction}: "
            f"class(es) {_describe(too_small, names)} subject(s); each class needs at least {need} so that both the "
            f"train and the test part get one. Add subjects, leave the class out or pool it "
            f"(data.classes / data.merge), or change split.test_fraction"
        )


def _stratified(subjects: list[str], label_of: dict, held: int | float, key: str, value: float, whole: str,
                parts: tuple[str, str], random_state: int, names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``subjects`` (``whole``'s) -> (kept, held out), each sorted, stratified by label, as
    scikit-learn's ``train_test_split(test_size=held)`` splits them (a fraction, or a count) for
    the setting ``key=value``; ``parts`` names the two parts. One that would get fewer subjects
    than there are classes (each part needs one of every class) is refused here, with the
    subjects per class, instead of in scikit-learn's words."""
    labels = [label_of[s] for s in subjects]
    counts = Counter(labels)
    n, k = len(subjects), len(counts)
    n_held = math.ceil(held * n) if isinstance(held, float) else held  # scikit-learn's count
    also = "" if key == "split.test_fraction" else " (or split.test_fraction, which sets the training part)"
    short = [(part, size) for part, size in zip(parts, (n - n_held, n_held)) if size < k]
    if short:
        part, size = short[0]
        verb = "lower" if part == parts[0] else "raise"
        raise SplitError(f"{key}={value} leaves {size} of {whole} {n} subjects ({_describe(counts, names)}) for the "
                         f"{part} part, fewer than the {k} classes: every part needs a subject of each class. Add "
                         f"subjects, pool classes (data.merge) or {verb} {key}{also}")
    try:
        kept, out = train_test_split(subjects, test_size=held, stratify=labels, random_state=random_state)
    except ValueError as e:  # scikit-learn's other refusals, in its words
        raise SplitError(f"{key}={value} cannot split {whole} {n} subjects ({_describe(counts, names)}) stratified "
                         f"by class: {e}. Add subjects, pool classes (data.merge) or change {key}{also}") from None
    return _every_class_in_both(sorted(kept), sorted(out), label_of, random_state)


def _every_class_in_both(kept: list[str], out: list[str], label_of: dict,
                         random_state: int) -> tuple[list[str], list[str]]:
    """Both parts with a subject of every class, sizes unchanged. scikit-learn allocates a part's
    count in proportion to the classes, so a part of a few subjects (a validation part of one per
    class) can miss a small class while a large one has two: a subject of the missing class
    changes places with one of the class most numerous in that part, both drawn with the split's
    seed. Needs two subjects of every class and parts of at least as many subjects as classes
    (checked before). A split scikit-learn makes whole is returned as it is."""
    rng = random.Random(random_state)
    for src, dst in ((kept, out), (out, kept)):
        for c in sorted({label_of[s] for s in kept + out}, key=str):
            if any(label_of[s] == c for s in dst):
                continue
            there = Counter(label_of[s] for s in dst)
            donor = max(sorted(there, key=str), key=lambda d: there[d])  # >= 2 there: the part has room
            give = rng.choice(sorted(s for s in src if label_of[s] == c))
            take = rng.choice(sorted(s for s in dst if label_of[s] == donor))
            src.remove(give)
            dst.remove(take)
            src.append(take)
            dst.append(give)
    return sorted(kept), sorted(out)


def make_split(subjects: Sequence[str], labels: Sequence[Hashable], split_cfg: SplitConfig,
               class_names: Sequence[str] | None = None) -> Split:
    """Stratified subject-level split for repeat ``split_cfg.repeat``.

    Args:
        subjects: subject ids, unique.
        labels: one label per subject (class index or class name), same order.
        split_cfg: test fraction, repeat index and base seed.
        class_names: the name of each class index, for the messages (labels stay as given).

    Returns:
        A :class:`Split` with sorted ``train``/``test`` lists; every class appears in both.

    Raises:
        SplitError: duplicate subjects, length mismatch, a bad fraction, or a class too small
            for the fractions; the message gives the subjects per class and what to change.
    """
    subjects = [str(s) for s in subjects]
    labels = [lab.item() if hasattr(lab, "item") else lab for lab in labels]  # numpy scalars -> JSON-able
    if len(subjects) != len(labels):
        raise SplitError(f"{len(subjects)} subjects but {len(labels)} labels; give one label per subject")
    dup = sorted(s for s, n in Counter(subjects).items() if n > 1)
    if dup:
        raise SplitError(f"subject(s) listed more than once: {dup[:10]}; each subject must appear once")
    f = split_cfg.test_fraction
    if not 0 < f < 1:
        raise SplitError(f"split.test_fraction={f} must lie strictly between 0 and 1 (the paper uses 0.3)")
    if split_cfg.repeat < 0:
        raise SplitError(f"split.repeat={split_cfg.repeat} must be >= 0")
    counts = Counter(labels)
    _check_class_sizes(counts, f, class_names)

    label_of = dict(sorted(zip(subjects, labels)))  # sorted by subject: the caller's order does not matter
    seed = split_cfg.seed + split_cfg.repeat
    train, test = _stratified(list(label_of), label_of, f, "split.test_fraction", f, "the cohort's",
                              ("training", "test"), seed, class_names)
    train, val = _carve_val(train, label_of, split_cfg, class_names)
    for part_name, part in (("train", train), ("test", test)) + ((("val", val),) if val else ()):
        absent = Counter({c: n for c, n in counts.items() if c not in {label_of[s] for s in part}})
        if absent:  # guarded above; kept so a silent sklearn change cannot slip through
            raise SplitError(
                f"the {part_name} part of repeat {split_cfg.repeat} has none of the cohort's "
                f"{_describe(absent, class_names)} subjects; add subjects or change split.test_fraction / "
                "split.val_fraction"
            )
    return Split(
        train=train, test=test, repeat=split_cfg.repeat, seed=split_cfg.seed,
        test_fraction=f, labels=label_of, val=val, val_fraction=split_cfg.val_fraction,
    )


def _carve_val(train: list[str], label_of: dict, split_cfg: SplitConfig,
               names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Stratified ``split.val_fraction`` of the training subjects -> (train, val): ``ceil(v * n)``
    subjects, and at least one of every class."""
    v = split_cfg.val_fraction
    if v == 0:
        return train, []
    if not 0 < v < 1:
        raise SplitError(f"split.val_fraction={v} must lie in [0, 1) (0: no validation part)")
    counts = Counter(label_of[s] for s in train)
    small = Counter({c: n for c, n in counts.items() if n < 2})
    if small:
        raise SplitError(
            f"split.val_fraction={v} needs at least 2 training subjects of every class (one for validation), "
            f"but the training part has {_describe(small, names)}. Add subjects or set split.val_fraction=0"
        )
    n_val = max(math.ceil(v * len(train) - 1e-9), len(counts))
    return _stratified(train, label_of, n_val, "split.val_fraction", v, "the training part's",
                       ("training", "validation"), split_cfg.seed + split_cfg.repeat, names)
