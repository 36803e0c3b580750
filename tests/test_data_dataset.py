"""select_subjects (classes, merge, missing modalities) and CohortDataset in DataLoader workers."""

import shutil
import warnings

import numpy as np
import pytest
import torch

from masan.config import ConfigError, DataConfig
from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.data.dataset import CohortDataset, select_subjects
from masan.data.workers import data_loader
from masan.store.cohort import CohortStore
from masan.synth.phantom import synthesize_cohort

T1, FMRI, FRAMES = (16, 16, 8), (8, 8, 4), 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    bids = synthesize_cohort(tmp / "bids", 2, t1_shape=T1, fmri_shape=FMRI, frames=FRAMES)
    shutil.rmtree(bids / "sub-008" / "func")  # an AD subject with T1 only
    report = convert_cohort(discover_bids(bids), tmp / "s.zarr", ConvertOptions(require=("t1",)), progress=False)
    assert not report.failed
    return CohortStore(tmp / "s.zarr")


def test_classes_pick_order_and_merge(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours, not a library's deprecations
        subjects, labels, names = select_subjects(store, DataConfig(classes=["AD", "NC"], use_fmri=False))
    assert names == ["AD", "NC"]
    assert subjects == ["sub-001", "sub-004", "sub-005", "sub-008"] and labels == [1, 0, 1, 0]
    cfg = DataConfig(classes=["NC", "MCI", "AD"], merge={"EMCI": "MCI", "LMCI": "MCI"}, use_fmri=False)
    subjects, labels, names = select_subjects(store.path, cfg)
    assert len(subjects) == 8 and labels[:4] == [0, 1, 1, 2] and names == ["NC", "MCI", "AD"]


def test_subjects_lacking_a_modality_are_left_out_with_one_warning(store):
    with pytest.warns(UserWarning, match=r"1 subject\(s\).*sub-008 \(no fmri\)") as rec:
        subjects, labels, _ = select_subjects(store, DataConfig())
    assert len([w for w in rec if "subject(s)" in str(w.message)]) == 1  # one warning for them all
    assert "sub-008" not in subjects and len(subjects) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # quiet: not a word of ours
        assert select_subjects(store, DataConfig(), quiet=True) == (subjects, labels, list(DataConfig().classes))


@pytest.mark.parametrize("cfg, fragment", [
    (DataConfig(merge={"MCI": "X"}), "data.merge maps ['MCI']"),
    (DataConfig(classes=["NC", "MCI"]), "data.classes ['MCI']"),
    (DataConfig(use_t1=False, use_fmri=False), "both false"),
])
def test_config_mistakes_are_named(store, cfg, fragment):
    with pytest.raises(ConfigError) as e:
        select_subjects(store, cfg)
    assert fragment in str(e.value)


def test_items_have_the_contract_shapes_and_dtypes(store):
    cfg = DataConfig(fmri_frames=4)
    with pytest.warns(UserWarning):
        subjects, labels, _ = select_subjects(store, cfg)
    ds = CohortDataset(store.path, subjects, labels, cfg)
    item = ds[2]
    assert set(item) == {"t1", "fmri", "label", "index"}
    assert item["t1"].shape == (1, *T1) and item["t1"].dtype == torch.float32
    assert item["fmri"].shape == (4, *FMRI) and item["fmri"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and item["label"] == labels[2]
    assert item["index"] == 2 and item["index"].dtype == torch.int64
    assert torch.equal(item["fmri"], torch.from_numpy(store.read_fmri(subjects[2])[:4]))
    t1_only = CohortDataset(store.path, ["sub-008"], [3], DataConfig(use_fmri=False, normalize=False))
    assert set(t1_only[0]) == {"t1", "label", "index"}
    assert torch.equal(t1_only[0]["t1"][0], torch.from_numpy(store.read_t1("sub-008", normalize=False)))


def test_short_runs_and_missing_modalities_fail_naming_the_subject(store):
    subjects = ["sub-001", "sub-002"]
    with pytest.raises(ValueError, match="sub-001 has 6 fMRI frames but data.fmri_frames=10"):
        CohortDataset(store.path, subjects, [0, 1], DataConfig(fmri_frames=10))
    with pytest.raises(KeyError, match="sub-008.*has only \\['t1'\\]"):
        CohortDataset(store.path, ["sub-008"], [3], DataConfig())


@pytest.mark.parametrize("start", ["forkserver", "fork", "spawn"])
def test_dataloader_workers(store, start):
    cfg = DataConfig(fmri_frames=FRAMES, num_workers=2, worker_start=start)
    with pytest.warns(UserWarning):
        subjects, labels, _ = select_subjects(store, cfg)
    ds = CohortDataset(store.path, subjects, labels, cfg)
    ds[0]  # handles opened in the parent must not leak into workers
    loader = data_loader(ds, cfg, batch_size=3)
    batches = list(loader)
    assert [b["t1"].shape[0] for b in batches] == [3, 3, 1]
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(7))
    fmri = torch.cat([b["fmri"] for b in batches])
    want = np.stack([store.read_fmri(s) for s in subjects])
    assert np.array_equal(fmri.numpy(), want)


def test_a_class_without_subjects_is_refused_for_training(tmp_path):
    """A store converted with the default classes holds none of some: data.classes naming one
    trained a model that never saw it, and its metrics looked like a result."""
    bids = synthesize_cohort(tmp_path / "bids", n_per_class=2, classes=("NC", "AD"), frames=4, t1_shape=(8, 8, 8),
                             fmri_shape=(4, 4, 4))
    store = tmp_path / "s.zarr"
    convert_cohort(discover_bids(bids), store, ConvertOptions(), classes=("NC", "LMCI", "AD"), progress=False)
    cfg = DataConfig(store=str(store), classes=["NC", "LMCI"])
    with pytest.raises(ConfigError, match=r"data.classes \['LMCI'\] have no subject .*NC 2, LMCI 0, AD 2"):
        select_subjects(store, cfg, every_class=True)
    subjects, _, _ = select_subjects(store, cfg, quiet=True)  # predicting with a trained run: allowed
    assert len(subjects) == 2
