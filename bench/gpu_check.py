#!/usr/bin/env python
"""The GPU check: one table of full-resolution figures on one CUDA GPU in <= 8 minutes.

Prints one table, a line per result as soon as it is measured (flushed, so a timeout still
leaves figures), in order of value:

1. ``masan``: forward + loss (eq. 8, joint phase) + backward + Adam step of the paper's model
   (hpc/configs/paper.yaml: T1 240x256x176 in 4x4x4 patches, fMRI 976 x 60x64x44) in bf16
   (weights and activations, as DeepSpeed's bf16 mode runs the module), micro-batch 1/2/4,
   activation checkpointing on/off, channels_last; ms per sample and peak GiB of the timed steps (max allocated,
   total and per sample); each row 2 warm-up steps, then 3 timed ones (``--warmup``, ``--steps``).
2. ``hfcn``: the same for the H-FCN baseline (T1 only).
3. ``loader``: one rank's training loader at full resolution from each cohort cache
   (``data.cache`` none/host/device; bench/io.py :func:`loader_speeds`: the first epoch is
   warm-up, not counted), on a synthetic full-size cohort prepared in a background process
   while sections 1-2 run.
4. ``deepspeed``: 30 optimizer steps of the real training entry point (launch/train_local.py,
   DeepSpeed with torch.optim Adam: nothing is JIT-compiled) on that cohort with
   ``data.cache=host``, and the data-wait fraction it logs (``train/data_wait_frac``).
5. ``compile``: the micro-batch-1 rows again with ``model.compile`` (sPM and fPM compiled as
   training compiles them; compile time excluded, as warm-up), last because compiling costs
   minutes per row.

``--set model.compile=true`` (any ``key=value``) changes the config of every section, the
DeepSpeed run's included.

Every row and section is guarded: an out-of-memory or any error prints as that row and the
check goes on. A global budget (``--budget-s``, default 420 s) skips what would not finish in
time. Targets: those of docs/performance.md, printed in the check's first line.

    python -m bench.gpu_check                 # on the GPU machine (see bench/gpu_check.sh)
    python -m bench.gpu_check --tiny          # CPU-sized shapes, the same code paths (tests)
"""

from __future__ import annotations

import concurrent.futures as futures
import copy
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.harness import (
    COLUMNS,
    REPO,
    TINY,
    Budget,
    Row,
    device_name,
    device_parser,
    emit,
    emit_cost,
    guarded,
    measure_model,
    note,
    resolve_device,
    section_names,
)
from masan.argtypes import number
from masan.config import RunConfig, config_or_exit, config_to_dict
from masan.data.splits import min_per_class
from masan.host import usable_cores
from masan.model.inputs import PRECISION_DTYPES
from masan.rundir import RunDir

STEP_TARGET = "<= 60 ms and <= 12 GiB per sample"
"""The training step's target on one GPU (bf16), as docs/performance.md states it; shown beside
the measured rows here and by bench/model.py, never computed with."""
DATA_WAIT_TARGET = "data wait < 5 % of the step"
"""The DeepSpeed run's data-wait target, as docs/performance.md states it."""
CLASSES = ("NC", "AD")
TEST_FRACTION = 0.25
"""The DeepSpeed run's test part (the run needs a split; its subjects are never scored here)."""
MIN_SUBJECTS = len(CLASSES) * min_per_class(TEST_FRACTION)
MASAN_ROWS = [Row("masan", 1), Row("masan", 1, ckpt=True), Row("masan", 1, ckpt=True, channels_last=True),
              Row("masan", 2, ckpt=True), Row("masan", 4, ckpt=True), Row("masan", 2)]
HFCN_ROWS = [Row("hfcn", 1), Row("hfcn", 4)]
COMPILE_ROWS = [Row("masan", 1, compiled=True), Row("masan", 1, channels_last=True, compiled=True)]
"""Bounded so that the whole check fits 8 minutes on the target GPU (compile rows last, skipped when late)."""
TINY_ROWS = [Row("masan", 2, ckpt=True, channels_last=True)]
"""--tiny: every model option of the rows above in one row."""


def model_section(section: str, rows: list[Row], args, cfg: RunConfig, budget: Budget, min_left: float) -> None:
    device, dtype = args.device, PRECISION_DTYPES[args.precision]
    for row in rows:
        def measure(row: Row = row) -> None:
            cost = measure_model(copy.deepcopy(cfg), row, device, dtype, args.warmup, args.steps,  # each row its flags
                                 args.compile_backend, len(CLASSES))
            emit_cost(section, row.name, cost, row.batch)

        guarded(section, row.name, budget, min_left, device, measure, compiled=row.compiled)


# --------------------------------------------------------------------------- the synthetic cohort


def prepare_cohort(root: str, cfg_dict: dict, subjects: int, workers: int) -> str:
    """A full-size cohort store of ``subjects`` subjects (half NC, half AD) under ``root``: one
    phantom subject is synthesized, the others are its voxels with one voxel changed (the
    converter refuses one scan listed for two subjects), written as uncompressed .nii (fast);
    the loader's and the step's cost do not depend on the voxels. -> the store."""
    import nibabel as nib

    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    m = cfg_dict["model"]
    bids = Path(root) / "bids"
    frames = cfg_dict["data"]["fmri_frames"] or m["fmri_frames"]
    synthesize_cohort(bids, {"NC": 1}, tuple(m["t1_shape"]), tuple(m["fmri_shape"]), frames, classes=("NC",),
                      compresslevel=1)
    lines = ["participant_id\tdiagnosis"]
    for i in range(subjects):
        name = f"sub-{i + 1:03d}"
        for kind in ("anat", "func") if i else ():
            (bids / name / kind).mkdir(parents=True)
            for f in (bids / "sub-001" / kind).glob("*.nii.gz"):
                img = nib.load(f)
                data = np.asarray(img.dataobj)
                data.flat[0] += i
                nib.save(nib.Nifti1Image(data, img.affine, img.header),
                         bids / name / kind / f.name.replace("sub-001", name).replace(".nii.gz", ".nii"))
        lines.append(f"{name}\t{CLASSES[i % 2]}")
    (bids / "participants.tsv").write_text("\n".join(lines) + "\n")
    store = Path(root) / "cohort.zarr"
    report = convert_cohort(discover_bids(bids), store, ConvertOptions(patch_grid=tuple(m["patch_grid"])),
                            classes=CLASSES, workers=workers, progress=False)
    if report.failed:
        raise RuntimeError(f"converting the synthetic cohort failed: {report.failed}")
    shutil.rmtree(bids)
    return str(store)


def cache_dir_for(need_bytes: int, preferred: str, fallback: str) -> str:
    """``preferred`` (/dev/shm) when it has room for twice the cohort, else ``fallback`` (a container's
    /dev/shm is often 64 MB; the page cache then plays its part)."""
    try:
        if shutil.disk_usage(preferred).free > 2 * need_bytes:
            return preferred
    except OSError:
        pass
    return fallback


def loader_section(store: str, args, cfg: RunConfig, work: Path, budget: Budget) -> str:
    from bench.io import CACHES, loader_speeds
    from masan.store.cohort import CohortStore

    s = CohortStore(store)
    need = sum(np.dtype(s.row(x)[m]["dtype"]).itemsize * int(np.prod(s.shape(x, m))) for x in s.subjects
               for m in ("t1", "fmri"))
    cache_dir = cache_dir_for(need, cfg.data.cache_dir, str(work))

    def measure() -> None:
        r = loader_speeds(Path(store), args.device, args.precision, cfg.data.fmri_frames, args.workers,
                          args.loader_passes, cache_dir, CLASSES)
        base = r["none"]["seconds"]
        for k in CACHES:
            x = r[k]
            emit("loader", f"cache={k} ({x['samples']} subjects)", f"{x['seconds'] / x['samples'] * 1e3:.1f}", "-", "-",
                 f"{x['bytes'] / x['seconds'] / 1e9:.2f} GB/s into the model, {base / x['seconds']:.1f}x none"
                 + (f", built in {x['build_s']:.1f} s in {cache_dir}" if k != "none" else
                    f", {args.workers} DataLoader workers"))

    guarded("loader", "none/host/device", budget, args.min_left_loader, args.device, measure)
    return cache_dir


# --------------------------------------------------------------------------- the DeepSpeed run


def deepspeed_section(store: str, cache_dir: str, args, config: Path, work: Path, budget: Budget) -> None:
    """The real entry point for ``--ds-steps`` steps with data.cache=host; prints step time and data wait."""
    variant = f"{args.ds_steps} steps, cache=host, mb1"
    if budget.left() < args.min_left_ds:
        note("deepspeed", variant, f"skipped: {budget.left():.0f} s left of the budget")
        return
    run_dir = work / "ds_run"
    every = max(1, args.ds_steps // 6)
    cmd = [sys.executable, str(REPO / "launch/train_local.py"), "--config", str(config), "--nproc", "1",
           f"run_dir={run_dir}", f"data.store={store}", f"data.classes=[{','.join(CLASSES)}]", "data.cache=host",
           f"data.cache_dir={cache_dir}", f"data.num_workers={args.workers}", f"train.max_steps={args.ds_steps}",
           "train.pretrain_epochs=1000",
           f"train.precision={args.precision}", f"train.device={args.device.type}", f"log.every_steps={every}",
           "log.eval_every_epochs=0", "log.grad_norm_every_steps=0", "checkpoint.every_steps=0",
           "checkpoint.every_minutes=0", "checkpoint.at_epoch_end=false", "split.val_fraction=0",
           f"split.test_fraction={TEST_FRACTION}", "optim.micro_batch=1", "optim.grad_accum=1", "optim.warmup_steps=0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget.left() - 5), env=env,
                             cwd=REPO, check=False)
    except subprocess.TimeoutExpired as e:
        note("deepspeed", variant, f"timed out after {e.timeout:.0f} s (budget)")
        _tail((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
        _report_ds(run_dir, variant)
        return
    if res.returncode != 0:
        note("deepspeed", variant, f"exit {res.returncode}")
    _tail(res.stdout + res.stderr, 25 if res.returncode else 8)  # the run's own last lines: its work dir goes
    _report_ds(run_dir, variant)


def _tail(text: str, lines: int = 25) -> None:
    for line in text.strip().splitlines()[-lines:]:
        print(f"    | {line}", flush=True)


def _report_ds(run_dir: Path, variant: str) -> None:
    """The run's logged intervals (the first holds start-up): step time from samples/s, data wait, peak."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(RunDir(run_dir).tb), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        series = {t.split("/", 1)[1]: [e.value for e in acc.Scalars(t)] for t in tags}
    except Exception as e:  # noqa: BLE001
        note("deepspeed", variant, f"no TensorBoard scalars ({type(e).__name__}: {e})")
        return
    rates, waits = series.get("samples_per_s", []), series.get("data_wait_frac", [])
    if not rates or not waits:
        note("deepspeed", variant, f"no logged intervals (tags: {sorted(series)})")
        return
    steady = slice(1, None) if len(rates) > 1 else slice(None)
    peak = max(series.get("gpu_mem_gib", series.get("peak_rss_gib", [float("nan")])))
    emit("deepspeed", variant, f"{1e3 / statistics.median(rates[steady]):.1f}", f"{peak:.2f}", f"{peak:.2f}",
         f"data wait {100 * statistics.median(waits[steady]):.1f}% median, {100 * max(waits[steady]):.1f}% max "
         f"of each interval (first interval: {100 * waits[0]:.1f}%, start-up)")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None):
    ap = device_parser(__doc__, 420.0)
    ap.add_argument("--subjects", type=number(int, MIN_SUBJECTS), default=MIN_SUBJECTS,
                    help=f"subjects of the synthetic cohort (half NC, half AD; {TEST_FRACTION:g} of each class is "
                         f"the test part, so at least {MIN_SUBJECTS}; default %(default)s)")
    ap.add_argument("--loader-passes", type=number(int, 1), default=2,
                    help="epochs per loader: the first is warm-up, the median of the rest counts (bench/io.py)")
    ap.add_argument("--ds-steps", type=number(int, 1), default=30)
    ap.add_argument("--sections", default="masan,hfcn,loader,deepspeed,compile",
                    type=section_names("masan", "hfcn", "loader", "deepspeed", "compile"),
                    help="comma-separated sections to run")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    resolve_device(args)
    if args.tiny:  # the same code paths in seconds: no inductor build, one timed step, one loader pass
        args.warmup, args.steps, args.loader_passes = min(args.warmup, 1), min(args.steps, 1), 1
        args.ds_steps = min(args.ds_steps, 4)
    # seconds a section needs at least to be worth starting
    args.min_left_model, args.min_left_loader, args.min_left_ds = (5, 5, 30) if args.tiny else (20, 30, 90)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    cfg = config_or_exit(args.config, args.set, TINY if args.tiny else (), "the --tiny settings")
    sections = set(args.sections)
    work = args.work or Path(tempfile.mkdtemp(prefix="masan-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("cohort", "config"):  # the store must not sit inside a directory holding a run config
        (work / sub).mkdir(exist_ok=True)
    config = work / "config" / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    m = cfg.model
    gpu = device_name(args.device)
    # DataLoader workers hand samples over through /dev/shm: a container's is often 64 MB
    sample = 4 * (int(np.prod(m.t1_shape)) + m.fmri_frames * int(np.prod(m.fmri_shape)))
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    args.workers = cfg.data.num_workers if shm_free > 4 * (cfg.data.prefetch_factor + 1) * sample else 0
    if args.workers != cfg.data.num_workers:
        print(f"gpu_check: /dev/shm has {shm_free / 2**30:.2f} GiB free, too little for DataLoader workers: "
              "data.num_workers=0 in the loader and DeepSpeed sections", flush=True)
    print(f"gpu_check: {gpu}, torch {torch.__version__}, {args.precision}, budget {args.budget_s:.0f} s; "
          f"T1 {m.t1_shape} in {m.patch_grid} patches, fMRI {m.fmri_frames} x {m.fmri_shape}; "
          f"targets: {STEP_TARGET}, {DATA_WAIT_TARGET}", flush=True)
    emit(*(c for c, _ in COLUMNS))
    pool = cohort = None
    try:
        if sections & {"loader", "deepspeed"}:  # synthesized and converted while the GPU measures models
            pool = futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            cohort = pool.submit(prepare_cohort, str(work / "cohort"), config_to_dict(cfg), args.subjects,
                                 min(8, usable_cores()))
        if "masan" in sections:
            model_section("masan", TINY_ROWS if args.tiny else MASAN_ROWS, args, cfg, budget,
                          args.min_left_model)
        if "hfcn" in sections:
            model_section("hfcn", HFCN_ROWS[:1] if args.tiny else HFCN_ROWS, args, cfg, budget, args.min_left_model)
        store = cache_dir = None
        if cohort is not None:
            try:
                store = cohort.result(timeout=max(1.0, budget.left()))
            except Exception as e:  # noqa: BLE001
                note("cohort", f"{args.subjects} subjects", f"error: {type(e).__name__}: {e}")
        if store and "loader" in sections:
            cache_dir = loader_section(store, args, cfg, work, budget)
        if store and "deepspeed" in sections:
            deepspeed_section(store, cache_dir or str(work), args, config, work, budget)
        if "compile" in sections:
            model_section("compile", COMPILE_ROWS[:1] if args.tiny else COMPILE_ROWS, args, cfg, budget,
                          args.min_left_model * 3)
    except Exception:  # noqa: BLE001 - print what broke, keep the figures printed so far
        traceback.print_exc()
        return 1
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check done, {args.budget_s - budget.left():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
