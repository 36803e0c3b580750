#!/usr/bin/env python
"""I/O benchmark of the cohort store against reading the .nii.gz files with nibabel.

One synthesized cohort, measured side by side in one run:
  - conversion rate of data_tools/to_zarr (subjects/s, MB/s of voxel data and of .nii.gz input);
  - bytes on disk: store vs .nii.gz;
  - one full sample (T1 + fMRI): store (float32, z-scored: what the loader returns) vs nibabel
    from .nii.gz, both as raw stored values and as float32 z-scored (like for like);
  - a random patch (one cell of the 4x4x4 grid of the T1) and a random block of fMRI frames.
Targets (issue 2): store bytes <= .nii.gz bytes; full-sample read >= 5x faster.

  python bench/io.py                 # moderate: 4 subjects, T1 120x128x88, fMRI 60x64x44 x 200
  python bench/io.py --full          # the paper's sizes: T1 240x256x176, fMRI 60x64x44 x 976
  python bench/io.py --codec lz4 --clevel 5 --keep /tmp/bench   # try another codec, keep the files
Timings are the best of --repeats passes over all subjects (contenders interleaved), with every
file in the page cache; CPU time counts all threads, a steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from masan.config import ModelConfig
from masan.data.convert import ConvertOptions, convert_cohort, discover_bids
from masan.data.store import SUBJECTS, CohortStore
from masan.data.synth import synthesize_cohort


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
    p.add_argument("--subjects", type=int, default=4, help="subjects in the cohort")
    p.add_argument("--full", action="store_true", help="paper sizes (T1 240x256x176, fMRI 60x64x44 x 976)")
    p.add_argument("--t1-shape", nargs=3, type=int, default=[120, 128, 88])
    p.add_argument("--fmri-shape", nargs=3, type=int, default=list(model.fmri_shape))
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--gzip-level", type=int, default=6, help=".nii.gz compression level (6: gzip/dcm2niix default)")
    d = ConvertOptions()
    p.add_argument("--codec", default=d.codec)
    p.add_argument("--clevel", type=int, default=d.clevel, choices=range(10), metavar="0-9")
    p.add_argument("--shuffle", default=d.shuffle)
    p.add_argument("--chunk-frames", type=int, default=d.fmri_chunk_frames)
    p.add_argument("--shard-frames", type=int, default=d.fmri_shard_frames)
    p.add_argument("--workers", type=int, default=1, help="conversion worker processes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--patches", type=int, default=20, help="random patch reads per repeat")
    p.add_argument("--keep", type=Path, default=None, help="write here and keep the files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.full:
        args.t1_shape, args.fmri_shape, args.frames = model.t1_shape, model.fmri_shape, model.fmri_frames
    work = args.keep or Path(tempfile.mkdtemp(prefix="masan-bench-io-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        table = run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ncohort: {args.subjects} subjects, T1 {args.t1_shape}, fMRI {args.fmri_shape} x {args.frames}; "
          f"store {args.codec}-{args.clevel} {args.shuffle}, fMRI chunk {args.chunk_frames} frames, "
          f"shard {args.shard_frames}; gzip level {args.gzip_level}; {os.cpu_count()} CPUs")
    w = max(len(r[0]) for r in table)
    print(f"{'':{w}}  {'store':>10}  {'nii.gz':>10}  ratio")
    for name, store_v, nii_v, ratio in table:
        print(f"{name:{w}}  {store_v:>10}  {nii_v:>10}  {ratio}")
    return 0


def run(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str, str]]:
    rng = np.random.default_rng(args.seed)
    bids = work / "bids"
    if not (bids / "participants.tsv").is_file():
        print(f"synthesizing {args.subjects} subjects in {bids} (not timed) ...")
        synthesize_cohort(bids, {"NC": args.subjects}, tuple(args.t1_shape), tuple(args.fmri_shape), args.frames,
                          classes=("NC",), compresslevel=args.gzip_level, progress=True)
    out = work / "store.zarr"
    shutil.rmtree(out, ignore_errors=True)
    opts = ConvertOptions(codec=args.codec, clevel=args.clevel, shuffle=args.shuffle,
                          fmri_chunk_frames=args.chunk_frames, fmri_shard_frames=args.shard_frames)
    sources = discover_bids(bids)
    t = time.perf_counter()
    report = convert_cohort(sources, out, opts, classes=("NC",), workers=args.workers)
    convert_s = time.perf_counter() - t
    assert not report.failed, report.failed
    store = CohortStore(out)
    subjects = store.subjects
    files = [f for s in subjects for f in _sources(bids, s)]
    nii_bytes = _bytes(files)
    store_bytes = _bytes((out / SUBJECTS).rglob("*"))
    voxel_bytes = sum(np.dtype(r[m]["dtype"]).itemsize * int(np.prod(r[m]["shape"])) for r in store.table
                      for m in ("t1", "fmri"))
    n = len(subjects)

    def store_sample() -> None:
        for s in subjects:
            store.read_t1(s)
            store.read_fmri(s)

    def store_raw() -> None:
        for s in subjects:
            store.read_raw(s, "t1")
            store.read_raw(s, "fmri")

    def nib_raw() -> None:
        for s in subjects:
            for f in _sources(bids, s):
                np.asarray(nib.load(f).dataobj)

    stats = {s: [store.meta(s, m)["stats"] for m in ("t1", "fmri")] for s in subjects}

    def nib_z() -> None:
        for s in subjects:
            for f, st in zip(_sources(bids, s), stats[s]):
                _nib_zscored(f, st["mean"], st["std"])

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

    def store_patch() -> None:
        for s, region, fr in picks():
            store.read_t1(s, region=region)
            store.read_fmri(s, frames=fr)

    def nib_patch() -> None:
        for s, region, fr in picks():
            t1, bold = _sources(bids, s)
            np.asarray(nib.load(t1).dataobj[region])
            np.asarray(nib.load(bold).dataobj[..., fr])

    fns = {"store": store_sample, "nib_z": nib_z, "store_raw": store_raw, "nib_raw": nib_raw,
           "store_patch": store_patch, "nib_patch": nib_patch}
    wall, cpu = _best_interleaved(fns, args.repeats)
    mb = 1e6

    def timing(label: str, a: str, b: str, per: int) -> list[tuple[str, str, str, str]]:
        return [(f"{label} wall (ms)", f"{wall[a] / per * 1e3:.1f}", f"{wall[b] / per * 1e3:.1f}",
                 f"{wall[b] / wall[a]:.1f}x faster"),
                (f"{label} CPU (ms)", f"{cpu[a] / per * 1e3:.1f}", f"{cpu[b] / per * 1e3:.1f}",
                 f"{cpu[b] / cpu[a]:.1f}x less")]

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
    ]


if __name__ == "__main__":
    raise SystemExit(main())
