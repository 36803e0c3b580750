"""Subjects of a store as model samples: class selection/merging and the torch Dataset.

``select_subjects`` turns the store's classes into the model's (``data.classes`` picks and
orders them, ``data.merge`` pools store classes first) and leaves out subjects lacking a
modality the run uses. ``CohortDataset`` reads one subject per item from the store; it
holds only the store path until first use in each process, so DataLoader workers, however
they start (:mod:`masan.data.workers`), each open their own Zarr handles. Train-only
transforms (augmentation, :mod:`masan.data.transforms`) hook in through
:meth:`CohortDataset.with_transform`.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from masan.config import ConfigError, DataConfig
from masan.data.temporal import fluctuations
from masan.store.cohort import CohortStore

log = logging.getLogger(__name__)


def used_modalities(cfg: DataConfig) -> list[str]:
    """The modalities a run reads (``t1``, ``fmri``); refuses a config that switches both off."""
    used = [m for m, on in (("t1", cfg.use_t1), ("fmri", cfg.use_fmri)) if on]
    if not used:
        raise ConfigError("data.use_t1 and data.use_fmri are both false; switch at least one on")
    return used


UNLABELED = -1
"""Label index of a subject without a diagnosis (``select_subjects(..., unlabeled=True)``)."""


def unserved_classes(have: Sequence[str], data_cfg: DataConfig) -> tuple[list[str], list[str]]:
    """What a store with the classes ``have`` cannot serve of ``data_cfg``: (``data.merge`` keys
    it lacks, in merge order; ``data.classes`` that are neither its classes nor merge targets)."""
    unknown = [c for c in data_cfg.merge if c not in have]
    reachable = {data_cfg.merge.get(c, c) for c in have}
    return unknown, [c for c in data_cfg.classes if c not in reachable]


@functools.cache
def _log_once(message: str) -> None:
    # a start selects its subjects more than once (the store's contract, then the preflight)
    log.info(message)


def select_subjects(store: CohortStore | str | os.PathLike, data_cfg: DataConfig, unlabeled: bool = False,
                    quiet: bool = False, every_class: bool = False) -> tuple[list[str], list[int], list[str]]:
    """-> (subjects, labels as indices into class_names, class_names = data_cfg.classes).

    A store class maps to ``data_cfg.merge.get(c, c)``; subjects whose mapped class is not
    in ``data_cfg.classes`` are left out (that is the selection: counted per class in one INFO
    line, once per process), subjects lacking a used modality are left out with one warning
    naming them. Subjects stored without a diagnosis (``to_zarr.py --allow-unlabeled``) are
    left out with a warning, or with ``unlabeled`` (prediction) kept with label :data:`UNLABELED`.
    ``quiet`` leaves out the same subjects without a word: for a caller that names them itself,
    or that selects again the subjects of a run that named them when it trained. ``every_class``
    (a training start) refuses a class of ``data.classes`` with no subject: a model would be
    trained for a class it never sees, and its metrics would look like a result.
    """
    store = store if isinstance(store, CohortStore) else CohortStore(store)
    classes = list(data_cfg.classes)
    have = store.classes
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes {classes} names a class twice")
    unknown, missing = unserved_classes(have, data_cfg)
    if unknown:
        raise ConfigError(f"data.merge maps {sorted(unknown)}, which are not classes of {store.path} (it has {have})")
    if missing:
        raise ConfigError(f"data.classes {missing} are neither classes of {store.path} ({have}) nor targets of "
                          f"data.merge {data_cfg.merge}; fix data.classes or data.merge")
    used = used_modalities(data_cfg)
    subjects, labels, lacking, unknown_dx = [], [], [], []
    other_classes: Counter[str] = Counter()
    for s in store.subjects:
        cls = data_cfg.merge.get(store.label(s), store.label(s))
        if store.label(s) is None and not unlabeled:
            unknown_dx.append(s)
            continue
        if cls not in classes and store.label(s) is not None:
            other_classes[store.label(s)] += 1
            continue
        absent = [m for m in used if not store.has(s, m)]
        if absent:
            lacking.append(f"{s} (no {'/'.join(absent)})")
            continue
        subjects.append(s)
        labels.append(UNLABELED if cls is None else classes.index(cls))
    if other_classes and not quiet:
        _log_once(f"data.classes=[{', '.join(classes)}]: {sum(other_classes.values())} subject(s) of {store.path} "
                  f"of other classes left out ({', '.join(f'{c} {n}' for c, n in sorted(other_classes.items()))}); "
                  "data.merge pools classes into one of data.classes")
    if unknown_dx and not quiet:
        warnings.warn(f"{len(unknown_dx)} subject(s) of {store.path} have no diagnosis and are left out of training: "
                      f"{', '.join(unknown_dx[:5])}{'...' if len(unknown_dx) > 5 else ''} (predict them with "
                      "python -m masan.predict RUN --store STORE)", stacklevel=2)
    if lacking and not quiet:
        warnings.warn(f"{len(lacking)} subject(s) of {store.path} left out for lacking a modality this run uses: "
                      f"{', '.join(lacking[:5])}{'...' if len(lacking) > 5 else ''}", stacklevel=2)
    if not subjects:
        raise ConfigError(f"no subject of {store.path} has classes {classes} with {' and '.join(used)}; "
                          "check data.classes, data.merge, data.use_t1/use_fmri")
    empty = [c for i, c in enumerate(classes) if i not in labels] if every_class else []
    if empty:
        raise ConfigError(f"data.classes {empty} have no subject of {store.path} with {' and '.join(used)} "
                          f"(its subjects by class: {_class_counts(store)}); leave them out of data.classes, "
                          "pool them with data.merge, or convert their subjects (to_zarr.py --label-map)")
    return subjects, labels, classes


def _class_counts(store: CohortStore) -> str:
    """``NC 16, AD 14``: the store's labelled subjects by class, in the store's class order."""
    counts = Counter(store.label(s) for s in store.subjects)
    return ", ".join(f"{c} {counts[c]}" for c in store.classes) or "none"


class CohortDataset(Dataset):
    """Item i -> {"t1": float32 (1, X, Y, Z), "fmri": float32 (T, X, Y, Z), "label": int64 (),
    "index": int64 () = i}; a modality switched off in ``data_cfg`` is absent. The fMRI is
    presented as ``data_cfg.fmri_temporal`` says (:mod:`masan.data.temporal`).

    ``data_cfg.fmri_frames`` keeps the first N frames of each run (None: all, and every run
    must then have the same length). Shapes are checked against the store's table at
    construction so that a mismatch fails before training, naming the subjects.

    Train and test subjects get the same items; only a view made by :meth:`with_transform`
    (the training loader's) passes them through a transform.
    """

    def __init__(self, store_path: str | os.PathLike, subjects: list[str], labels: list[int], data_cfg: DataConfig):
        if len(subjects) != len(labels):
            raise ValueError(f"{len(subjects)} subjects but {len(labels)} labels")
        self.store = CohortStore(store_path)
        self.source = self.store
        """Where samples are read: the store, or a :class:`masan.data.cache.CohortCache` (same values)."""
        self.subjects, self.labels, self.cfg = list(subjects), list(labels), data_cfg
        self.modalities = used_modalities(data_cfg)
        self.transform = None
        """Called as ``transform(item, index, epoch)`` on every item (:meth:`with_transform`)."""
        self.epoch = 0
        """The epoch the transform is told (it seeds its draws)."""
        for s in self.subjects:
            for m in self.modalities:
                self.store.shape(s, m)  # raises naming the subject when it is absent
        self._check_shapes()

    def _check_shapes(self) -> None:
        frames = self.cfg.fmri_frames
        for m in self.modalities:
            groups: dict[tuple, list[str]] = defaultdict(list)
            for s in self.subjects:
                shape = self.store.shape(s, m)
                groups[shape[1:] if m == "fmri" else shape].append(s)
            if len(groups) > 1:
                listing = "; ".join(f"{list(k)}: {v[:3]}{'...' if len(v) > 3 else ''}" for k, v in groups.items())
                flag = "--t1-shape" if m == "t1" else "--fmri-shape"
                raise ValueError(f"{m} volumes in {self.store.path} differ in shape ({listing}); the model needs one "
                                 f"shape: reconvert with data_tools/to_zarr.py {flag} X Y Z")
        if "fmri" in self.modalities:
            lengths = {s: self.store.shape(s, "fmri")[0] for s in self.subjects}
            if frames is not None:
                for s, t in lengths.items():
                    if t < frames:
                        self._short(s, t)
            elif len(set(lengths.values())) > 1:
                raise ValueError(f"fMRI runs in {self.store.path} differ in length ({sorted(set(lengths.values()))} "
                                 "frames); set data.fmri_frames to use the first N frames of each")

    def _short(self, subject: str, frames: int) -> None:
        raise ValueError(f"subject {subject} has {frames} fMRI frames but data.fmri_frames="
                         f"{self.cfg.fmri_frames}; lower data.fmri_frames or leave this subject out")

    def use_cache(self, cache) -> None:
        """Read from ``cache`` (a CohortCache of this dataset's subjects) instead of the store."""
        if cache.subjects != self.subjects:
            raise ValueError("the cohort cache holds other subjects than this dataset")
        self.source = cache

    def with_transform(self, transform, epoch: int) -> CohortDataset:
        """A view of this dataset whose items pass through ``transform(item, index, epoch)``
        (e.g. :class:`masan.data.transforms.Augment`): the training loader's view of one epoch.
        This dataset is left as it is, so evaluation and the standardiser fits never see it."""
        view = copy.copy(self)
        view.transform, view.epoch = transform, epoch
        return view

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.subjects[i]
        item: dict[str, torch.Tensor] = {}
        if self.cfg.use_t1:
            item["t1"] = torch.from_numpy(self.source.read_t1(s, normalize=self.cfg.normalize))[None]
        if self.cfg.use_fmri:
            n = self.cfg.fmri_frames
            temporal = self.cfg.fmri_temporal
            fmri = self.source.read_fmri(s, frames=slice(0, n) if n else None,
                                         normalize=self.cfg.normalize and temporal == "none")
            if n is not None and fmri.shape[0] < n:
                self._short(s, fmri.shape[0])
            if temporal != "none":
                fmri = fluctuations(fmri, temporal, s)
            item["fmri"] = torch.from_numpy(fmri)
        item["label"] = torch.tensor(self.labels[i], dtype=torch.int64)
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item if self.transform is None else self.transform(item, i, self.epoch)
