"""The cohort cache (data.cache=host/device): samples and training batches identical to the
store path, one decode per node shared by real gloo ranks, memory refused with the numbers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from masan.config import ConfigError, DataConfig
from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.data import cache as cache_module
from masan.data.cache import CohortCache, open_cache
from masan.data.dataset import CohortDataset, select_subjects
from masan.store.cohort import CohortStore
from masan.synth.phantom import synthesize_cohort
from masan.train.loop import to_device

T1, FMRI, FRAMES = (16, 16, 12), (8, 8, 6), 5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """3 NC + 3 AD phantoms; one T1 stored with scl_slope 0.5 / scl_inter 3 (the float64 scaling path)."""
    tmp = tmp_path_factory.mktemp("cache")
    bids = synthesize_cohort(tmp / "bids", 3, classes=("NC", "AD"), t1_shape=T1, fmri_shape=FMRI, frames=FRAMES)
    t1 = next((bids / "sub-002" / "anat").glob("*_T1w.nii.gz"))
    img = nib.load(t1)
    scaled = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine, img.header)
    scaled.header.set_slope_inter(0.5, 3.0)
    nib.save(scaled, t1)
    out = tmp / "s.zarr"
    report = convert_cohort(discover_bids(bids), out, ConvertOptions(patch_grid=(2, 2, 2)), classes=("NC", "AD"),
                            progress=False)
    assert not report.failed, report.failed
    assert CohortStore(out).meta("sub-002", "t1")["nifti"]["scl_slope"] == 0.5
    return out


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(classes=["NC", "AD"], fmri_frames=4, num_workers=0, cache_dir=str(tmp_path),
                      cache_reserve_gib=0.0, **kw)


def _kept(batch: dict) -> dict:
    """A batch to keep beyond the next few (the CPU loader reuses its buffers)."""
    return {k: v.clone() for k, v in batch.items()}


def _dataset(store: Path, cfg: DataConfig) -> CohortDataset:
    subjects, labels, _ = select_subjects(store, cfg)
    return CohortDataset(store, subjects, labels, cfg)


@pytest.mark.parametrize("kind", ["host", "device"])
@pytest.mark.parametrize("normalize, temporal, dtype", [(True, "none", torch.float32), (False, "none", torch.float32),
                                                        (True, "psc", torch.bfloat16)])
def test_batches_and_items_equal_the_store_path(store, tmp_path, kind, normalize, temporal, dtype):
    cfg = _cfg(tmp_path, cache=kind, normalize=normalize, fmri_temporal=temporal)
    plain = _dataset(store, cfg)
    want = [to_device(b, torch.device("cpu"), dtype) for b in DataLoader(plain, batch_size=2, drop_last=True)]
    expected_items = [plain[i] for i in range(len(plain))]

    cached = _dataset(store, cfg)
    cache = open_cache(cached, cfg, torch.device("cpu"))
    try:
        assert cached.source is cache and cache.decoded == cached.subjects  # a world of one decodes all
        for i, item in enumerate(expected_items):  # the dataset's own reads (standardiser fits, monitoring)
            got = cached[i]
            for k in item:
                assert torch.equal(got[k], item[k]), (k, i)
        batches = [_kept(b) for b in cache.batches(range(len(plain)), 2, dtype)]
        assert len(batches) == len(want) == len(plain) // 2
        for got, ref in zip(batches, want):
            assert set(got) == set(ref)
            for k in ref:
                assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
                assert torch.equal(got[k], ref[k]), k  # bit-identical, not merely close
    finally:
        cache.close()
    assert not any(tmp_path.iterdir()), "the cache's files must be gone after close"


def test_stored_integers_are_what_is_cached(store, tmp_path):
    cfg = _cfg(tmp_path, cache="host")
    ds = _dataset(store, cfg)
    cache = open_cache(ds, cfg, torch.device("cpu"))
    s = CohortStore(store)
    files = sorted(p.name for p in cache.dir.glob("*.npy"))
    assert len(files) == 2 * len(ds.subjects)
    raw = np.load(cache.dir / files[0])
    assert raw.dtype == np.dtype(s.row(ds.subjects[0])["fmri"]["dtype"])
    assert np.array_equal(np.load(cache._file(ds.subjects[0], "fmri")), s.read_raw(ds.subjects[0], "fmri")[:4])
    assert cache.nbytes() == sum(np.load(cache.dir / f, mmap_mode="r").nbytes for f in files)
    cache.close()


def test_too_little_memory_is_refused_with_numbers_and_fix(store, tmp_path, monkeypatch):
    """A ConfigError too: launchers exit 2 and never restart a run the node cannot hold."""
    cfg = _cfg(tmp_path, cache="host")
    cfg.cache_reserve_gib = 1e6
    with pytest.raises(ConfigError,
                       match=r"needs 0\.\d+ GiB .*bytes.*data.cache_reserve_gib=1000000.0.*data.cache=none"):
        open_cache(_dataset(store, cfg), cfg, torch.device("cpu"))
    cfg.cache = "device"
    monkeypatch.setattr(cache_module, "check_host_fits", lambda *_: None)  # shared memory fits, the device does not
    with pytest.raises(ConfigError, match="data.cache=device needs .*data.cache=host"):
        open_cache(_dataset(store, cfg), cfg, torch.device("cpu"))
    assert not any(tmp_path.iterdir())


def test_early_stop_and_a_killed_runs_leftovers(store, tmp_path):
    cfg = _cfg(tmp_path, cache="host")
    ds = _dataset(store, cfg)
    stale = tmp_path / "masan-cache-dead"
    stale.mkdir()
    (stale / "owner").write_text(f"{__import__('socket').gethostname()} 999999999")
    cache = open_cache(ds, cfg, torch.device("cpu"))
    assert not stale.exists()
    batches = cache.batches(range(len(ds)), 1, torch.float32, depth=1)
    next(batches)
    batches.close()  # a run that stops mid-epoch leaves no thread blocked behind
    assert not batches.producer.thread.is_alive()
    del batches
    cache.close()


@pytest.mark.parametrize("next_order", ["as announced", "another"])
def test_the_next_epochs_first_batches_are_prepared_ahead(store, tmp_path, monkeypatch, next_order):
    """With ``then`` (the next epoch's order) the thread prepares that epoch's first ``depth``
    batches once this one's are done: the next iterator starts with them, and every batch of
    both epochs is the store path's, prepared once; if the next epoch asks for another order
    (a resume mid-epoch, a change of phase) they are dropped and its own are prepared."""
    from masan.data import batches as batches_module

    cfg = _cfg(tmp_path, cache="host")
    ds = _dataset(store, cfg)
    plain = [to_device(b, torch.device("cpu"), torch.float32) for b in DataLoader(ds, batch_size=1)]
    cache = open_cache(ds, cfg, torch.device("cpu"))
    prepared = []
    original = batches_module._Producer._prepare
    monkeypatch.setattr(batches_module._Producer, "_prepare",
                        lambda self, slot, group: prepared.append(list(group)) or original(self, slot, group))
    first, announced = [0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]
    second = announced if next_order == "as announced" else [4, 2, 0, 1, 3, 5]
    try:
        batches = cache.batches(first, 1, torch.float32, depth=2, then=announced)
        got = [_kept(next(batches)) for _ in first]
        batches.producer.thread.join(timeout=60)  # its lookahead is done
        assert [g for g, _ in batches.producer.ahead] == [[5], [3]]
        batches = cache.batches(second, 1, torch.float32, depth=2)
        got += [_kept(next(batches)) for _ in second]
    finally:
        batches.close()
        cache.close()
    for b, i in zip(got, first + second):
        assert all(torch.equal(b[k], plain[i][k]) for k in plain[i]), i
    reused = 2 if next_order == "as announced" else 0  # the announced first two, or none
    assert prepared == [[i] for i in first] + [[5], [3]] + [[i] for i in second[reused:]]


def _rank_worker(rank: int, world: int, init: str, store: str, cache_dir: str, out: str,
                 hosts: list | None = None) -> None:
    import socket

    import torch.distributed as dist

    if hosts:  # each rank on a node of its own, as SLURM places them
        socket.gethostname = lambda: hosts[rank]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = _cfg(Path(cache_dir), cache="host")
    ds = _dataset(Path(store), cfg)
    cache = open_cache(ds, cfg, torch.device("cpu"))
    order = range(rank, len(ds), world)
    got = [_kept(b) for b in cache.batches(order, 1, torch.float32)]
    plain = [to_device(b, torch.device("cpu"), torch.float32) for b in
             DataLoader(torch.utils.data.Subset(_dataset(Path(store), cfg), list(order)), batch_size=1)]
    same = all(torch.equal(a[k], b[k]) for a, b in zip(got, plain) for k in b) and len(got) == len(plain)
    files = sorted(p.name for p in cache.dir.glob("*.npy"))
    dist.barrier()  # every rank has looked before the lead deletes
    cache.close()
    Path(out, f"{rank}.json").write_text(json.dumps({"decoded": cache.decoded, "same": same, "files": files,
                                                     "dir": str(cache.dir)}))
    dist.destroy_process_group()


def test_two_ranks_decode_once_per_node_and_share_the_files(store, tmp_path):
    cache_dir, out = tmp_path / "shm", tmp_path / "out"
    cache_dir.mkdir()
    out.mkdir()
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/rendezvous", str(store), str(cache_dir), str(out)), nprocs=2)
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    assert all(r["same"] for r in ranks)
    assert ranks[0]["dir"] == ranks[1]["dir"] and ranks[0]["files"] == ranks[1]["files"]
    decoded = ranks[0]["decoded"] + ranks[1]["decoded"]
    assert ranks[0]["decoded"] and ranks[1]["decoded"], "the node's ranks share the decoding"
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 6, "each subject decoded exactly once"
    assert len(ranks[0]["files"]) == 2 * 6
    assert not any(cache_dir.iterdir()), "the node's lead deleted the cache"


def test_nodes_sharing_a_cache_dir_each_build_their_own(store, tmp_path):
    cache_dir, out = tmp_path / "shared", tmp_path / "out"
    cache_dir.mkdir()
    out.mkdir()
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/rendezvous", str(store), str(cache_dir), str(out),
                                 ["node-a", "node-b"]), nprocs=2)
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    assert all(r["same"] for r in ranks)
    assert ranks[0]["dir"] != ranks[1]["dir"], "one directory per node, though the folder is shared"
    assert sorted(ranks[0]["decoded"]) == sorted(ranks[1]["decoded"]), "each node decodes the whole cohort"
    assert not any(cache_dir.iterdir()), "each node's lead deleted its own"


def test_a_live_cache_is_private_and_holds_its_owner_lock(store, tmp_path):
    from masan.data.cache import OWNER, sweep_stale

    cfg = _cfg(tmp_path, cache="host")
    cache = open_cache(_dataset(store, cfg), cfg, torch.device("cpu"))
    try:
        assert (cache.dir / OWNER).read_text().split()[1:] == [str(os.getpid()), "flock"]
        assert cache.dir.stat().st_mode & 0o777 == 0o700, "the images in /dev/shm: for this user's ranks only"
        assert sweep_stale(tmp_path) == [], "a cache in use is never swept, whatever its pid says"
    finally:
        cache.close()
    assert not cache.dir.exists()


def test_cache_is_built_only_when_asked(store, tmp_path):
    cfg = _cfg(tmp_path)
    ds = _dataset(store, cfg)
    assert open_cache(ds, cfg, torch.device("cpu")) is None and ds.source is ds.store
    with pytest.raises(ValueError, match="data.cache=host or device"):
        CohortCache(store, ds.subjects, ds.labels, cfg, torch.device("cpu"))


def _agreeing_rank(rank: int, port: int, out: str) -> None:
    from masan.data.cache import CacheConfigError, _agree

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def fails():
        raise CacheConfigError("data.cache_dir=/nope does not exist")

    try:
        _agree(fails if rank == 1 else None)
        seen = "nothing"
    except ConfigError as e:
        seen = f"ConfigError: {e}"
    except Exception as e:  # noqa: BLE001 - what the test reports
        seen = f"{type(e).__name__}: {e}"
    Path(f"{out}{rank}").write_text(seen)
    torch.distributed.destroy_process_group()


def test_a_ranks_config_error_is_a_config_error_on_every_rank(tmp_path):
    """A launcher exits 2 (never restarted) on a ConfigError; on SLURM only rank 0 records why and
    the others exit 0, so every rank must see the same kind, not only the node lead that failed."""
    from masan.distributed import free_port

    mp.spawn(_agreeing_rank, args=(free_port(), str(tmp_path / "rank")), nprocs=2)
    assert (tmp_path / "rank1").read_text() == "ConfigError: data.cache_dir=/nope does not exist"
    assert (tmp_path / "rank0").read_text() == ("ConfigError: another rank failed to build the cohort cache: "
                                                "CacheConfigError: data.cache_dir=/nope does not exist")


def test_augmented_batches_from_the_cache_equal_the_store_loaders_in_bf16(store, tmp_path):
    """With data.augment on in a bf16 run, the cache path transforms float32 samples and casts
    after, as the store's loader does (a bf16 volume resampled differs in a sixth of its voxels)."""
    from types import SimpleNamespace

    from masan.config import AugmentConfig, RunConfig
    from masan.data.transforms import Augment
    from masan.train.loop import ResumableSampler, make_loader

    cfg = RunConfig()
    cfg.train.precision, cfg.optim.micro_batch = "bf16", 2
    cfg.data = _cfg(tmp_path, augment=AugmentConfig(flip=True, rotate_deg=8.0, shift=0.05, intensity=0.1))
    augment = Augment.from_config(cfg.data.augment, cfg.seed)
    cpu = torch.device("cpu")

    def loader_batches(dataset, cache=None):
        parts = SimpleNamespace(cfg=cfg, train_set=dataset, info=SimpleNamespace(device=cpu))
        sampler = ResumableSampler(dataset, 1, 0, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(1, start=0)
        return [to_device(_kept(b), cpu, torch.bfloat16) for b in make_loader(parts, sampler, 1, cache, augment)]

    want = loader_batches(_dataset(store, cfg.data))
    cached = _dataset(store, cfg.data)
    cache = open_cache(cached, dataclasses.replace(cfg.data, cache="host"), cpu)
    try:
        got = loader_batches(cached, cache)
    finally:
        cache.close()
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for k in ("t1", "fmri", "label", "index"):
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


def test_a_subject_reconverted_while_the_cache_is_built_is_refused(store, tmp_path, monkeypatch):
    """sub-002 reconverted (new values) while sub-001 is being decoded: its new integers must not
    be cached under the scales taken at start (they were, silently, unless it was the first decoded)."""
    import shutil

    copy, bids = tmp_path / "s.zarr", tmp_path / "bids"
    shutil.copytree(store, copy)
    shutil.copytree(store.parent / "bids", bids)
    cfg = _cfg(tmp_path / "shm", cache="host")
    (tmp_path / "shm").mkdir()
    ds = _dataset(copy, cfg)
    assert ds.subjects[:2] == ["sub-001", "sub-002"]
    decode = cache_module.CohortCache._decode

    def reconverting(self, subject):
        if subject == "sub-001":
            t1 = next((bids / "sub-002" / "anat").glob("*_T1w.nii.gz"))
            img = nib.load(t1)
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 3 + 100, img.affine, img.header), t1)
            report = convert_cohort(discover_bids(bids), copy, ConvertOptions(patch_grid=(2, 2, 2)),
                                    classes=("NC", "AD"), progress=False)
            assert not report.failed and CohortStore(copy).group_path("sub-002") != self.versions["sub-002"]
        decode(self, subject)

    monkeypatch.setattr(cache_module.CohortCache, "_decode", reconverting)
    with pytest.raises(RuntimeError, match="sub-002 was reconverted .* while data.cache was being built"):
        open_cache(ds, cfg, torch.device("cpu"))
    assert not any((tmp_path / "shm").iterdir()), "no half-built cache left"


def test_a_cache_whose_start_fails_leaves_no_folder(store, tmp_path, monkeypatch):
    """A folder without its owner file is never swept: a start that fails in between removes it."""
    cfg = _cfg(tmp_path, cache="host")

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.os, "replace", full)
    with pytest.raises(Exception, match="No space left"):
        open_cache(_dataset(store, cfg), cfg, torch.device("cpu"))
    monkeypatch.undo()
    assert not list(tmp_path.glob("masan-cache-*"))
