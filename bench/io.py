#!/usr/bin/env python
"""I/O benchmark of the cohort store against reading the .nii.gz files with nibabel.

One synthesized cohort, measured side by side in one run:
  - conversion rate of data_tools/to_zarr (subjects/s, MB/s of voxel data and of .nii.gz input);
  - bytes on disk: store vs .nii.gz;
  - one full sample (T1 + fMRI): store (float32, z-scored: what the loader returns) vs nibabel
    from .nii.gz, both as raw stored values and as float32 z-scored (like for like);
  - a random patch (one cell of the 4x4x4 grid of the T1) and a random block of fMRI frames;
  - the training loader of one rank (batch 1), as the model receives it (z-scored, in the model
    dtype, on the device), for each cohort cache (``data.cache``) side by side: ``none`` (the default
    path: DataLoader workers decode the store), ``host`` (stored integers in shared memory,
    scaled on the device), ``device`` (the cohort in device memory): samples/s, GB/s into the
    model and the ratio to ``none``, in the steady state a training run sees: the first pass
    of each loader is warm-up (the DataLoader's worker start-up and the page cache; a cache's
    first touch of its memory) and not counted, the figure is the median of the passes after
    it (``--loader-passes`` 4, ``--loader-warmup`` 1); building a cache is timed apart.
Targets (docs/data-format.md, "Benchmark"): store bytes <= .nii.gz bytes; full-sample read >= 5x faster.
Target (docs/performance.md): the ``host`` cache delivers a full-resolution sample >= 10x faster than ``none``.

  python -m bench.io                 # moderate: 4 subjects, T1 120x128x88, fMRI 60x64x44 x 200
  python -m bench.io --full          # the paper's sizes: T1 240x256x176, fMRI 60x64x44 x 976
  python -m bench.io --codec lz4 --clevel 5 --keep /tmp/bench   # try another codec, keep the files
  python -m bench.io --full --loader-only --subjects 2 --frames 488   # only the loader table, fewer frames
  python -m bench.io --keep /tmp/b --against /tmp/old/store.zarr   # this layout vs a store of the same cohort
The store-vs-nibabel timings are the best of --repeats passes over all subjects (contenders
interleaved), with every file in the page cache; CPU time counts all threads, a steadier figure
on a shared machine. The loader table's are the median of the passes after the warm-up ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import signal
import statistics
import tempfile
import time
import typing
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from numcodecs.blosc import list_compressors

from masan.access import not_a_folder
from masan.argtypes import number, torch_device
from masan.config import DataConfig, ModelConfig
from masan.convert.cohort import ConvertError, ConvertOptions, convert_cohort, discover_bids
from masan.data.cache import CohortCache
from masan.data.dataset import CohortDataset
from masan.data.workers import data_loader
from masan.host import usable_cores
from masan.model.inputs import PRECISION_DTYPES
from masan.store.cohort import SUBJECTS, CohortStore, StoreError
from masan.synth.phantom import synthesize_cohort
from masan.train.loop import to_device

CACHES = ("none", "host", "device")
CODECS = tuple(sorted(list_compressors()))
"""``--codec``: the compressors of the Blosc the store is written with."""
SHUFFLES = typing.get_args(typing.get_type_hints(ConvertOptions)["shuffle"])


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _best_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall and best CPU seconds (all threads) of each function, runs interleaved so that
    the load of a shared machine hits every contender alike."""
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return wall, cpu


def _sources(bids: Path, s: str) -> tuple[Path, Path]:
    return bids / s / "anat" / f"{s}_T1w.nii.gz", bids / s / "func" / f"{s}_task-rest_bold.nii.gz"


def _nib_zscored(path: Path, mean: float, std: float) -> np.ndarray:
    a = nib.load(path).get_fdata(dtype=np.float32)
    a -= mean
    a /= std
    return a


def main(argv: list[str] | None = None) -> int:
    model = ModelConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = max(ConvertOptions().patch_grid)
    p.add_argument("--subjects", type=number(int, 1), default=4, help="subjects in the cohort")
    p.add_argument("--full", action="store_true", help="paper sizes (T1 240x256x176, fMRI 60x64x44 x 976)")
    p.add_argument("--t1-shape", nargs=3, type=number(int, grid), default=[120, 128, 88],
                   help=f"T1 voxels (each axis at least {grid}: a patch is one cell of the patch grid)")
    p.add_argument("--fmri-shape", nargs=3, type=number(int, 2), default=list(model.fmri_shape),
                   help="fMRI frame voxels (each axis at least 2: a 3D image)")
    p.add_argument("--frames", type=number(int, 1), default=None, help="fMRI frames (default 200; --full: 976)")
    p.add_argument("--gzip-level", type=number(int, 0, 9), default=6,
                   help=".nii.gz compression level 0-9 (6: gzip/dcm2niix default)")
    d = ConvertOptions()
    p.add_argument("--codec", default=d.codec, choices=CODECS)
    p.add_argument("--clevel", type=int, default=d.clevel, choices=range(10), metavar="0-9")
    p.add_argument("--shuffle", default=d.shuffle, choices=SHUFFLES)
    p.add_argument("--chunk-frames", type=number(int, 1), default=d.fmri_chunk_frames)
    p.add_argument("--shard-frames", type=number(int, 1), default=d.fmri_shard_frames,
                   help="a multiple of --chunk-frames")
    p.add_argument("--workers", type=number(int, 1), default=1, help="conversion worker processes")
    p.add_argument("--repeats", type=number(int, 1), default=3)
    p.add_argument("--patches", type=number(int, 1), default=20, help="random patch reads per repeat")
    p.add_argument("--keep", type=Path, default=None, help="write here and keep the files (default: a temp dir)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--against", type=Path, default=None, metavar="STORE",
                   help="another store of the same cohort (e.g. written by the previous layout, kept with --keep): "
                        "its reads are timed interleaved with this one's, same reader, in a second table")
    data = DataConfig()
    p.add_argument("--loader-only", action="store_true", help="only the loader table (no nibabel comparison)")
    p.add_argument("--loader-workers", type=number(int, 0), default=data.num_workers,
                   help="DataLoader workers of the 'none' loader (default: data.num_workers)")
    p.add_argument("--loader-passes", type=number(int, 1), default=4,
                   help="epochs over the cohort per loader, warm-up included (the median of those after the "
                        "warm-up counts)")
    p.add_argument("--loader-warmup", type=number(int, 0), default=1,
                   help="first epochs per loader not counted: worker start-up, page cache, a cache's first touch "
                        "of its memory (at most --loader-passes - 1)")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda, cuda:N (default: cuda when visible)")
    p.add_argument("--precision", choices=sorted(PRECISION_DTYPES), default="fp32", help="dtype the model receives")
    p.add_argument("--cache-dir", default=data.cache_dir, help="shared memory of the host cache")
    args = p.parse_args(argv)
    check_args(p, args, model)
    previous = signal.signal(signal.SIGTERM, _terminated)  # a terminated run removes its temp dir too
    work = args.keep or Path(tempfile.mkdtemp(prefix="masan-bench-io-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        store = prepare(args, work)
        table, against = ([], []) if args.loader_only else run(args, work, store)
        loader = loader_table(store, args.device, args.precision, args.frames, args.loader_workers,
                              args.loader_passes, args.cache_dir, warmup=args.loader_warmup)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"\ncohort: {args.subjects} subjects, T1 {args.t1_shape}, fMRI {args.fmri_shape} x {args.frames}; "
          f"store {args.codec}-{args.clevel} {args.shuffle}, fMRI chunk {args.chunk_frames} frames, "
          f"shard {args.shard_frames}; gzip level {args.gzip_level}; {usable_cores()} usable CPU cores")
    if table:
        print_table(["", "store", "nii.gz", "ratio"], table)
    if against:
        print(f"\nthis store ({store_format(store)}) vs --against {args.against} ({store_format(args.against)}):")
        print_table(["", "this", "against", "against / this"], against)
    warm = counted_warmup(args.loader_passes, args.loader_warmup)
    print(f"\nloader of one rank, batch 1, {args.precision} on {args.device} (none: {args.loader_workers} "
          f"DataLoader workers; median of epochs {warm + 1}-{args.loader_passes} of {args.loader_passes} per "
          f"loader, {f'the first {warm} warm-up, not counted' if warm else 'no warm-up epoch'}):")
    print_table(["", *CACHES], loader)
    return 0


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, model: ModelConfig) -> None:
    """What the argument types cannot see alone, checked before any work (``p.error``: exit 2);
    settles ``--full``'s shapes and the default ``--frames``."""
    try:  # the layout's own checks (a shard of whole chunks), before the cohort is made
        convert_options(args)
    except ConvertError as e:
        p.error(str(e))
    why = None if args.keep is None else not_a_folder(args.keep)
    if why:
        p.error(f"--keep {args.keep} {why}; give --keep a folder (new or existing)")
    if args.against is not None and not args.loader_only:
        try:
            CohortStore(args.against)
        except StoreError as e:
            p.error(f"--against: {e}")
    if args.full:
        args.t1_shape, args.fmri_shape = model.t1_shape, model.fmri_shape
    if args.frames is None:
        args.frames = model.fmri_frames if args.full else 200


def _terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    """SIGTERM as an exit, so that the ``finally`` clauses (the temp dir, the caches) still run."""
    raise SystemExit(128 + signum)


def print_table(header: list[str], rows: list[tuple]) -> None:
    """First column left-aligned to its widest cell, the others right-aligned, two spaces apart."""
    w = max(len(str(r[0])) for r in [header, *rows])
    widths = [max(10, *(len(str(r[i])) for r in [header, *rows])) for i in range(1, len(header))]
    for r in [header, *rows]:
        print(f"{r[0]:{w}}  " + "  ".join(f"{str(v):>{k}}" for v, k in zip(r[1:], widths)))


def prepare(args: argparse.Namespace, work: Path) -> Path:
    """Synthesize the cohort (once per --keep directory) and convert it; -> the store."""
    bids = work / "bids"
    if not (bids / "participants.tsv").is_file():
        print(f"synthesizing {args.subjects} subjects in {bids} (not timed) ...")
        synthesize_cohort(bids, {"NC": args.subjects}, tuple(args.t1_shape), tuple(args.fmri_shape), args.frames,
                          classes=("NC",), compresslevel=args.gzip_level, progress=True)
    out = work / "store.zarr"
    if args.loader_only and args.keep is not None and (out / "zarr.json").is_file():
        return out  # the loader table does not time the conversion: reuse the kept store
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    report = convert_cohort(discover_bids(bids), out, convert_options(args), classes=("NC",), workers=args.workers)
    args.convert_s = time.perf_counter() - t
    if report.failed:
        raise SystemExit("the conversion failed: " + "; ".join(f.error for f in report.failed))
    return out


def convert_options(args: argparse.Namespace) -> ConvertOptions:
    """The store layout of the command line (raises ConvertError)."""
    return ConvertOptions(codec=args.codec, clevel=args.clevel, shuffle=args.shuffle,
                          fmri_chunk_frames=args.chunk_frames, fmri_shard_frames=args.shard_frames)


def counted_warmup(passes: int, warmup: int) -> int:
    """Warm-up passes actually discarded: ``warmup``, but at least one of ``passes`` counts."""
    return max(0, min(warmup, passes - 1))


def loader_table(store_path: Path, device: torch.device, precision: str, frames: int, workers: int, passes: int,
                 cache_dir: str, classes: tuple[str, ...] = ("NC",), warmup: int = 1) -> list[tuple[str, ...]]:
    """Samples/s and GB/s into the model of one rank's training loader for each cache (see module
    doc and :func:`loader_speeds`). -> rows (name, none, host, device)."""
    r = loader_speeds(store_path, device, precision, frames, workers, passes, cache_dir, classes, warmup)
    base = r["none"]["seconds"]
    return [
        ("samples/s", *(f"{r[k]['samples'] / r[k]['seconds']:.2f}" for k in CACHES)),
        ("GB/s into the model", *(f"{r[k]['bytes'] / r[k]['seconds'] / 1e9:.2f}" for k in CACHES)),
        ("ms per sample", *(f"{r[k]['seconds'] / r[k]['samples'] * 1e3:.0f}" for k in CACHES)),
        ("x none (speed)", *(f"{base / r[k]['seconds']:.1f}x" for k in CACHES)),
        ("warm-up ms per sample (not counted)",
         *(f"{r[k]['warmup_s'] / r[k]['samples'] * 1e3:.0f}" if r[k]["warmup_s"] else "-" for k in CACHES)),
        ("cache build (s, once)", "", *(f"{r[k]['build_s']:.1f}" for k in CACHES[1:])),
    ]


def loader_speeds(store_path: Path, device: torch.device, precision: str, frames: int, workers: int, passes: int,
                  cache_dir: str, classes: tuple[str, ...] = ("NC",), warmup: int = 1) -> dict[str, dict[str, float]]:
    """One rank's training loader for each cache: ``passes`` epochs over the store's subjects at
    batch 1, each batch as the model receives it (``precision``, on ``device``); ``none`` uses
    ``workers`` DataLoader workers. The first ``warmup`` epochs of each loader
    (:func:`counted_warmup`: at least one epoch counts) are not counted: they start the workers,
    fill the page cache and touch a new cache's memory for the first time, which a training run
    pays once. -> cache -> {seconds (median of the counted epochs), samples, bytes (t1 + fmri
    delivered in an epoch), build_s (building the cache, 0 for none), warmup_s (mean of the
    warm-up epochs, 0 when none)}."""
    dtype = PRECISION_DTYPES[precision]
    store = CohortStore(store_path)
    subjects = store.subjects
    cfg = DataConfig(classes=list(classes), fmri_frames=frames, num_workers=workers, cache_dir=cache_dir)
    labels = [list(classes).index(store.label(s)) for s in subjects]
    dataset = CohortDataset(store_path, subjects, labels, cfg)
    caches: dict[str, CohortCache] = {}
    build: dict[str, float] = {}

    def epoch(kind: str):
        if kind == "none":
            return (to_device(b, device, dtype) for b in
                    data_loader(dataset, cfg, batch_size=1, pin_memory=device.type == "cuda"))
        return caches[kind].batches(range(len(subjects)), 1, dtype, cfg.prefetch_factor)

    times: dict[str, list[float]] = {k: [] for k in CACHES}
    moved: dict[str, int] = {}

    def timed(kind: str) -> None:
        gc.collect()  # the previous contender's buffers are gone before the clock starts
        t, nbytes = time.perf_counter(), 0
        for b in epoch(kind):
            nbytes += sum(b[k].nbytes for k in ("t1", "fmri"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[kind].append(time.perf_counter() - t)
        moved[kind] = nbytes

    # `none` first, before the caches exist: with data.worker_start=fork its workers fork this
    # process each epoch, which makes every private page copy-on-write and would charge the
    # caches' reused buffers a page fault per 4 KiB afterwards (a rank uses one or the other)
    for _ in range(passes):
        timed("none")
    try:
        for kind in CACHES[1:]:
            t = time.perf_counter()
            caches[kind] = CohortCache(store_path, subjects, labels, dataclasses.replace(cfg, cache=kind), device)
            build[kind] = time.perf_counter() - t
        for _ in range(passes):  # interleaved, so that the load of a shared machine hits both alike
            for kind in CACHES[1:]:
                timed(kind)
    finally:
        for cache in caches.values():
            cache.close()
    warm = counted_warmup(passes, warmup)
    return {k: {"seconds": statistics.median(times[k][warm:]), "samples": len(subjects), "bytes": moved[k],
                "build_s": build.get(k, 0.0), "warmup_s": statistics.mean(times[k][:warm]) if warm else 0.0}
            for k in CACHES}


def store_format(path: Path) -> str:
    """``format N`` of a store (1: bare arrays, 2: NIfTI-Zarr images)."""
    return f"format {CohortStore(path).attrs['masan_store']['version']}"


def _store_reads(store: CohortStore, picks) -> dict:
    """Timed store reads over all subjects: ``sample`` (float32 z-scored, what the loader returns),
    ``raw`` (stored values), ``patch`` (a T1 grid cell + an fMRI frame block per pick)."""
    subjects = store.subjects

    def sample() -> None:
        for s in subjects:
            store.read_t1(s)
            store.read_fmri(s)

    def raw() -> None:
        for s in subjects:
            store.read_raw(s, "t1")
            store.read_raw(s, "fmri")

    def patch() -> None:
        for s, region, fr in picks():
            store.read_t1(s, region=region)
            store.read_fmri(s, frames=fr)

    return {"sample": sample, "raw": raw, "patch": patch}


def _nib_reads(bids: Path, store: CohortStore, picks) -> dict:
    """The nibabel counterparts of :func:`_store_reads` on the cohort's .nii.gz files: ``z``
    (float32 z-scored with the store's statistics), ``raw``, ``patch``."""
    subjects = store.subjects
    stats = {s: [store.meta(s, m)["stats"] for m in ("t1", "fmri")] for s in subjects}

    def raw() -> None:
        for s in subjects:
            for f in _sources(bids, s):
                np.asarray(nib.load(f).dataobj)

    def z() -> None:
        for s in subjects:
            for f, st in zip(_sources(bids, s), stats[s]):
                _nib_zscored(f, st["mean"], st["std"])

    def patch() -> None:
        for s, region, fr in picks():
            t1, bold = _sources(bids, s)
            np.asarray(nib.load(t1).dataobj[region])
            np.asarray(nib.load(bold).dataobj[..., fr])

    return {"z": z, "raw": raw, "patch": patch}


def run(args: argparse.Namespace, work: Path, out: Path) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The store-vs-nibabel rows, and with ``--against`` the this-store-vs-other-store rows."""
    rng = np.random.default_rng(args.seed)
    bids = work / "bids"
    convert_s = args.convert_s
    store = CohortStore(out)
    subjects = store.subjects
    files = [f for s in subjects for f in _sources(bids, s)]
    nii_bytes = _bytes(files)
    store_bytes = _bytes((out / SUBJECTS).rglob("*"))
    voxel_bytes = sum(np.dtype(r[m]["dtype"]).itemsize * int(np.prod(r[m]["shape"])) for r in store.table
                      for m in ("t1", "fmri"))
    n = len(subjects)
    grid = ConvertOptions().patch_grid
    t1_shape = store.shape(subjects[0], "t1")
    cell = [n_ // g for n_, g in zip(t1_shape, grid)]
    frames = store.shape(subjects[0], "fmri")[0]
    block = min(args.chunk_frames, frames)

    def picks():
        local = np.random.default_rng(rng.integers(1 << 31))
        for _ in range(args.patches):
            s = subjects[local.integers(n)]
            c = [local.integers(g) for g in grid]
            region = tuple(slice(i * k, (i + 1) * k) for i, k in zip(c, cell))
            t0 = int(local.integers(0, frames - block + 1))
            yield s, region, slice(t0, t0 + block)

    reads, nib_reads = _store_reads(store, picks), _nib_reads(bids, store, picks)
    fns = {"store": reads["sample"], "nib_z": nib_reads["z"], "store_raw": reads["raw"], "nib_raw": nib_reads["raw"],
           "store_patch": reads["patch"], "nib_patch": nib_reads["patch"]}
    if args.against is not None:
        other = CohortStore(args.against)
        if other.subjects != subjects:
            raise SystemExit(f"--against {args.against} holds other subjects than {out}")
        fns.update({f"other_{k}": fn for k, fn in _store_reads(other, picks).items()})
    wall, cpu = _best_interleaved(fns, args.repeats)
    mb = 1e6

    def timing(label: str, a: str, b: str, per: int, ratio: str = "{:.1f}x faster|{:.1f}x less"
               ) -> list[tuple[str, str, str, str]]:
        fast, less = ratio.split("|")
        return [(f"{label} wall (ms)", f"{wall[a] / per * 1e3:.1f}", f"{wall[b] / per * 1e3:.1f}",
                 fast.format(wall[b] / wall[a])),
                (f"{label} CPU (ms)", f"{cpu[a] / per * 1e3:.1f}", f"{cpu[b] / per * 1e3:.1f}",
                 less.format(cpu[b] / cpu[a]))]

    against = [] if args.against is None else [
        ("bytes on disk (MB)", f"{store_bytes / mb:.1f}", f"{_bytes((args.against / SUBJECTS).rglob('*')) / mb:.1f}",
         ""),
        *timing("full sample float32 z-scored", "store", "other_sample", n, "{:.2f}x|{:.2f}x"),
        *timing("full sample raw values", "store_raw", "other_raw", n, "{:.2f}x|{:.2f}x"),
        *timing("T1 patch + fMRI frame block", "store_patch", "other_patch", args.patches, "{:.2f}x|{:.2f}x"),
    ]
    return [
        ("conversion (subjects/s)", f"{n / convert_s:.2f}", "", ""),
        ("conversion (MB/s voxels)", f"{voxel_bytes / mb / convert_s:.0f}", "", ""),
        ("conversion (MB/s .nii.gz in)", f"{nii_bytes / mb / convert_s:.0f}", "", ""),
        ("bytes on disk (MB)", f"{store_bytes / mb:.1f}", f"{nii_bytes / mb:.1f}", f"{store_bytes / nii_bytes:.2f}x"),
        *timing("full sample float32 z-scored", "store", "nib_z", n),
        *timing("full sample raw values", "store_raw", "nib_raw", n),
        *timing("T1 patch + fMRI frame block", "store_patch", "nib_patch", args.patches),
        ("read throughput (MB/s voxels)", f"{voxel_bytes / mb / wall['store_raw']:.0f}",
         f"{voxel_bytes / mb / wall['nib_raw']:.0f}", ""),
    ], against


if __name__ == "__main__":
    raise SystemExit(main())
