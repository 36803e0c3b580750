"""CohortStore: table, patch/frame reads, normalisation, layout, errors, pickling, parallel readers."""

import json
import multiprocessing as mp
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
import zarr

from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.store.cohort import CohortStore, StoreError, scaled_float32
from masan.synth.phantom import synthesize_cohort

T1, FMRI, FRAMES = (32, 24, 16), (12, 16, 8), 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    bids = synthesize_cohort(tmp / "bids", 2, t1_shape=T1, fmri_shape=FMRI, frames=FRAMES)
    report = convert_cohort(discover_bids(bids), tmp / "s.zarr", ConvertOptions(fmri_chunk_frames=4,
                                                                                 fmri_shard_frames=8), progress=False)
    assert not report.failed
    return bids, CohortStore(tmp / "s.zarr")


def source(bids, s, modality):
    name = f"anat/{s}_T1w.nii.gz" if modality == "t1" else f"func/{s}_task-rest_bold.nii.gz"
    return nib.load(bids / s / name)


def test_table_classes_labels(cohort):
    bids, store = cohort
    assert store.subjects == [f"sub-{i:03d}" for i in range(1, 9)]
    assert store.classes == ["NC", "EMCI", "LMCI", "AD"]
    assert [store.label(s) for s in store.subjects[:4]] == ["NC", "EMCI", "LMCI", "AD"]
    row = store.table[0]
    assert row["t1"]["shape"] == list(T1) and row["fmri"]["shape"] == [FRAMES, *FMRI]
    assert row["t1"]["source"].endswith("sub-001_T1w.nii.gz") and len(row["t1"]["sha256"]) == 64
    assert store.has("sub-001", "fmri") and not store.has("sub-999", "t1")
    assert store.meta("sub-001", "fmri")["nifti"]["tr_seconds"] == 2.0
    with pytest.raises(KeyError, match="sub-999.*not in cohort store"):
        store.label("sub-999")


def test_patch_and_frame_reads_match_whole_reads(cohort):
    bids, store = cohort
    s = "sub-003"
    whole_t1, whole_f = store.read_t1(s), store.read_fmri(s)
    region = (slice(8, 16), slice(6, 12), slice(4, 8))  # one cell of the 4x4x4 grid
    assert np.array_equal(store.read_t1(s, region=region), whole_t1[region])
    frames = slice(5, 13)
    assert np.array_equal(store.read_fmri(s, frames=frames, region=region[:1] + (slice(None),) * 2),
                          whole_f[frames, 8:16])
    assert whole_t1.dtype == np.float32 and whole_f.shape == (FRAMES, *FMRI)
    assert np.array_equal(store.read_t1(s, normalize=False), np.asarray(source(bids, s, "t1").dataobj))


def test_normalisation_uses_nonzero_voxels(cohort):
    bids, store = cohort
    for modality in ("t1", "fmri"):
        raw = np.asarray(source(bids, "sub-002", modality).dataobj).astype(np.float64)
        nz = raw[raw != 0]
        stats = store.meta("sub-002", modality)["stats"]
        assert stats["mean"] == pytest.approx(nz.mean()) and stats["std"] == pytest.approx(nz.std())
        z = store.read_t1("sub-002") if modality == "t1" else store.read_fmri("sub-002")
        zz = z if modality == "t1" else np.moveaxis(z, 0, 3)
        assert np.allclose(zz, (raw - nz.mean()) / nz.std(), atol=1e-5)


def test_chunks_follow_patch_grid_and_frames_with_few_files(cohort):
    _, store = cohort
    root = zarr.open_group(store.path, mode="r")
    group = store.group_path("sub-001")  # the subject's current version folder
    t1 = root[f"{group}/t1/0"]  # level 0 of the NIfTI-Zarr image
    assert t1.chunks == (8, 6, 4) and t1.shards == (32, 24, 16)  # one 4x4x4 cell per chunk, one shard
    f = root[f"{group}/fmri/0"]
    assert f.chunks == (4, *FMRI) and f.shards == (8, *FMRI)
    codecs = json.loads((store.path / group / "t1" / "0" / "zarr.json").read_text())["codecs"]
    inner = codecs[0]["configuration"]["codecs"]
    assert {"cname": "lz4hc", "clevel": 5, "shuffle": "bitshuffle"}.items() <= inner[-1]["configuration"].items()
    files = [p for p in (store.path / group).rglob("*") if p.is_file()]
    # version group + per image (group, level-0 metadata, `nifti` header metadata and chunk) + 1 T1 shard
    # + 3 fMRI shards
    assert len(files) == 1 + 2 * 4 + 1 + 3


def test_picklable_and_reopens_per_process(cohort):
    _, store = cohort
    store.read_t1("sub-001")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._root is None  # no handle travels
    assert np.array_equal(clone.read_fmri("sub-001"), store.read_fmri("sub-001"))


def _read_all(path):
    store = CohortStore(path)
    return {s: (float(store.read_t1(s).sum()), float(store.read_fmri(s).sum())) for s in store.subjects * 3}


def test_two_readers_in_parallel(cohort):
    _, store = cohort
    want = _read_all(store.path)
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_read_all, [store.path, store.path])
    assert got == [want, want]


def test_missing_damaged_and_foreign_stores_say_how_to_fix(cohort, tmp_path):
    _, store = cohort
    with pytest.raises(StoreError, match=r"nope.zarr does not exist.*data_tools/to_zarr.py"):
        CohortStore(tmp_path / "nope.zarr")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w")
    with pytest.raises(StoreError, match="not a MASAN cohort store"):
        _ = CohortStore(foreign).subjects  # the store opens lazily: reading a property opens it
    broken = tmp_path / "broken.zarr"
    shutil.copytree(store.path, broken)
    (broken / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match=r"broken.zarr.*damaged.*to_zarr.py"):
        _ = CohortStore(broken).subjects
    shutil.rmtree(broken)
    shutil.copytree(store.path, broken)
    shutil.rmtree(broken / store.group_path("sub-001") / "t1")
    with pytest.raises(StoreError, match=r"sub-001/v\d+/t1 is missing or damaged.*to_zarr.py"):
        CohortStore(broken).read_t1("sub-001")


def test_an_intercept_is_applied_when_the_slope_is_one():
    """scl_slope 1 with scl_inter != 0 (e.g. an offset CT-like or unsigned-shifted file)."""
    raw = np.array([0, 1, 200], dtype=np.int16)
    assert scaled_float32(raw, 1.0, -3.0).tolist() == [-3.0, -2.0, 197.0]
    assert scaled_float32(raw, 1.0, 0.0).tolist() == [0.0, 1.0, 200.0]


def test_a_store_keeps_a_bounded_number_of_open_arrays(cohort, monkeypatch):
    """Each opened array holds its metadata: a process reading a large cohort must not keep all."""
    from masan.store import cohort as store_module

    monkeypatch.setattr(store_module, "OPEN_ARRAYS", 3)
    store = CohortStore(cohort[1].path)
    first = [store.read_t1(s) for s in store.subjects]
    assert len(store._arrays) == 3
    again = [store.read_t1(s) for s in store.subjects]  # evicted arrays reopen and read the same
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
