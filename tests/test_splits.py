"""Subject-level stratified splits: proportions, repeat/seed rule, persistence, clear errors."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from masan.config import SplitConfig
from masan.data.splits import Split, SplitError, make_split

PAPER_COHORT = {"AD": 72, "EMCI": 34, "LMCI": 36, "NC": 64}  # ADNI3 counts of the paper


def cohort(counts: dict[str, int]) -> tuple[list[str], list[str]]:
    subjects, labels = [], []
    for label, n in counts.items():
        subjects += [f"sub-{label}{i:03d}" for i in range(n)]
        labels += [label] * n
    return subjects, labels


def test_split_is_stratified_disjoint_and_complete():
    subjects, labels = cohort(PAPER_COHORT)
    split = make_split(subjects, labels, SplitConfig(test_fraction=0.3, repeat=0, seed=7))
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == sorted(subjects)
    assert split.train == sorted(split.train) and split.test == sorted(split.test)
    test_counts = Counter(split.labels[s] for s in split.test)
    for label, n in PAPER_COHORT.items():
        assert abs(test_counts[label] - 0.3 * n) <= 1, (label, test_counts[label], n)
    assert len(split.test) == pytest.approx(0.3 * len(subjects), abs=1)


def test_repeat_r_uses_seed_plus_r_and_nothing_else():
    subjects, labels = cohort({"NC": 10, "AD": 10})
    r0 = make_split(subjects, labels, SplitConfig(repeat=0, seed=100))
    r1 = make_split(subjects, labels, SplitConfig(repeat=1, seed=100))
    shifted = make_split(subjects, labels, SplitConfig(repeat=0, seed=101))
    assert r0.test != r1.test, "repeats must differ"
    assert (r1.train, r1.test) == (shifted.train, shifted.test)
    assert r1.random_state == 101 and r1.seed == 100 and r1.repeat == 1
    again = make_split(subjects, labels, SplitConfig(repeat=0, seed=100))
    assert (again.train, again.test) == (r0.train, r0.test)


def test_split_does_not_depend_on_subject_order():
    subjects, labels = cohort({"NC": 8, "MCI": 8, "AD": 8})
    pairs = list(zip(subjects, labels))
    random.Random(3).shuffle(pairs)
    shuffled = make_split([s for s, _ in pairs], [y for _, y in pairs], SplitConfig(repeat=2))
    plain = make_split(subjects, labels, SplitConfig(repeat=2))
    assert (shuffled.train, shuffled.test) == (plain.train, plain.test)


def test_save_load_round_trip(tmp_path):
    subjects, labels = cohort({"NC": 6, "AD": 6})
    split = make_split(subjects, [int(y == "AD") for y in labels], SplitConfig(repeat=3, seed=1))
    path = split.save(tmp_path / "run" / "split.json")
    loaded = Split.load(path)
    assert loaded == split
    assert json.loads(path.read_text())["random_state"] == 4


def test_load_refuses_foreign_json(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"train": []}))
    with pytest.raises(SplitError, match="not written by Split.save"):
        Split.load(tmp_path / "split.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SplitError, match="not valid JSON"):
        Split.load(tmp_path / "bad.json")


def test_too_small_class_is_a_clear_error():
    subjects, labels = cohort({"NC": 10, "AD": 10, "EMCI": 2})
    with pytest.raises(SplitError, match=r"'EMCI': 2.*at least 4"):
        make_split(subjects, labels, SplitConfig(test_fraction=0.3))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(SplitError, match="once"):
        make_split(["a", "a", "b", "c"], [0, 0, 1, 1], SplitConfig(test_fraction=0.5))
    with pytest.raises(SplitError, match="labels"):
        make_split(["a", "b"], [0], SplitConfig())
    with pytest.raises(SplitError, match="test_fraction"):
        make_split(["a", "b"], [0, 1], SplitConfig(test_fraction=1.0))


def test_validation_part_is_carved_from_training_stratified_and_saved(tmp_path):
    subjects = [f"s{i:03d}" for i in range(60)]
    labels = ["NC", "EMCI", "LMCI", "AD"] * 15
    split = make_split(subjects, labels, SplitConfig(val_fraction=0.15))
    plain = make_split(subjects, labels, SplitConfig())
    assert split.test == plain.test  # the test part does not depend on the validation part
    assert sorted(split.train + split.val) == plain.train and not set(split.train) & set(split.val)
    label_of = dict(zip(subjects, labels))
    assert {label_of[s] for s in split.val} == set(labels)  # every class, at least once
    assert len(split.val) == math.ceil(0.15 * len(plain.train))
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split
    assert split.part("val") == split.val
    assert make_split(subjects, labels, SplitConfig(val_fraction=0.15)) == split  # deterministic


def test_validation_part_needs_two_training_subjects_per_class():
    with pytest.raises(SplitError, match="val_fraction"):
        make_split([f"s{i}" for i in range(6)], ["NC", "AD"] * 3, SplitConfig(test_fraction=0.5, val_fraction=0.2))
    assert make_split([f"s{i}" for i in range(6)], ["NC", "AD"] * 3, SplitConfig(test_fraction=0.5)).val == []


def test_a_small_val_fraction_still_gets_one_subject_of_every_class():
    """val_fraction * n below the class count: the validation part takes one per class (as the
    config documents) instead of refusing the split."""
    subjects = [f"s{i:02d}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    split = make_split(subjects, labels, SplitConfig(test_fraction=0.3, val_fraction=0.05))
    assert sorted({split.labels[s] for s in split.val}) == [0, 1, 2]
    assert not set(split.val) & set(split.train) and not set(split.val) & set(split.test)


def test_an_imbalanced_cohort_gets_one_validation_subject_of_every_class():
    """Classes of 4, 4, 5 and 11 subjects, test 0.3, val 0.1: every class has >= 2 training
    subjects, so the promise of at least one of every class is kept: scikit-learn's proportional
    allocation alone gives a large class two and a small one none in 9 of 10 repeats."""
    sizes = [4, 4, 5, 11]
    subjects = [f"c{c}s{i}" for c, n in enumerate(sizes) for i in range(n)]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    for repeat in range(10):
        split = make_split(subjects, labels, SplitConfig(test_fraction=0.3, val_fraction=0.1, repeat=repeat))
        assert sorted({split.labels[s] for s in split.val}) == [0, 1, 2, 3]
