#!/usr/bin/env python
"""Does the model learn a realistic cohort? MASAN, its ablations and the H-FCN baseline against
an oracle, on the MNI152 validation cohort with planted effects, side by side in one run.

1. Makes the cohort once in WORK (reused while the cohort arguments stay the same; a stamp file
   WORK/cohort.json records them): ``data_tools/synth_cohort.py --anatomy mni152`` then
   ``data_tools/to_zarr.py``.
2. Trains every variant on every repeat's split with ``launch/train_local.py --config
   hpc/configs/science.yaml`` (run dirs WORK/runs/<variant>/r<repeat>, log in train.log there;
   a run finished with the same arguments, resolved config and cohort is not trained again, an
   interrupted one resumes, one where any of them changed starts afresh; one benchmark at a time
   per WORK: WORK/science.lock). Variants::

       masan      the paper's model (T1 + fMRI, T1-guided attention fusion)
       masan_add  fusion by element-wise addition (model.fusion=add)
       t1_only    MASAN on T1 alone;  fmri_only: on fMRI alone
       hfcn       the T1-only H-FCN-style baseline (model.arch=hfcn)

3. Scores each run's test predictions: 4-class accuracy; AD vs rest accuracy, precision, recall
   (AD positive: arg-max class AD) and AUC of prob_AD; and where the model looks: the rank of
   the best-ranked planted region in its region ranking (mean region weight over the test
   subjects, 1 = top) and whether a planted region is in its top 3.
4. The oracle: a logistic regression on the planted features (masan.evaluate.oracle), fitted on
   the same split's training part: what finding the planted effect is worth.

Prints a line per finished run and one markdown table (mean +- std over repeats), written to
--out (default WORK/science.md), raw numbers to WORK/science.json.

  python bench/science.py                                   # 3 repeats x 5 variants (min/run: see the table)
  python bench/science.py --repeats 1 --variants masan t1_only train.joint_epochs=40
  python bench/science.py --full --jobs 1                   # GPU-sized: T1 96x112x96, fMRI 24x28x24 x 64, 4 x 24
  python bench/science.py --structures hippocampus entorhinal --strength 0.4 --work runs/science_weak
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from masan.config import ConfigError, config_hash, load_config
from masan.data import anatomy
from masan.data.synth import add_effect_arguments, add_shape_arguments
from masan.files import atomic_write_json
from masan.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

CONFIG = REPO / "hpc/configs/science.yaml"
VARIANTS = {
    "masan": [],
    "masan_add": ["model.fusion=add"],
    "t1_only": ["model.modalities=t1", "data.use_fmri=false"],
    "fmri_only": ["model.modalities=fmri", "data.use_t1=false"],
    "hfcn": ["model.arch=hfcn", "data.use_fmri=false"],
}
MINUTES = {"t1_only": 8.2, "masan": 7.6, "masan_add": 5.4, "hfcn": 2.9, "fmri_only": 0.7}
"""Minutes per run at the default size on 2 CPU cores (one thread each; the mean of the five
repeats of docs/results/science_cpu_5repeats_final.md): runs are started longest first, so the
short ones fill the end and neither core idles at the tail."""
FULL = {"per_class": 24, "t1_shape": [96, 112, 96], "fmri_shape": [24, 28, 24], "frames": 64}
"""--full: a GPU-sized cohort (and train.device=auto: the config pins the CPU)."""
ORACLE = "oracle"
CACHE_DIR = "cache"
"""WORK/cache: ``data.cache`` files of the running trainings (science.yaml: ``host``), on the work
dir's disk rather than /dev/shm, which containers often keep small; each run removes its own."""
TOP_K = 3
COHORT_STAMP = "cohort.json"
LOCK_FILE = "science.lock"
TAIL_LINES = 25
COLUMNS = (("4-class acc", "accuracy", 2), ("AD acc", "binary_accuracy", 2), ("AD precision", "precision", 2),
           ("AD recall", "recall", 2), ("AD AUC", "auc", 2), ("planted rank", "best_rank", 1))
"""Table columns: header, result key, decimals."""


# --------------------------------------------------------------------------- cohort


def cohort_args(args: argparse.Namespace, grid: list[int]) -> dict:
    """Everything the cohort depends on (its stamp)."""
    return {"anatomy": anatomy.ANATOMY, "per_class": args.per_class, "structures": args.structures,
            "strength": args.strength, "seed": args.seed, "t1_shape": args.t1_shape,
            "fmri_shape": args.fmri_shape, "frames": args.frames, "stages": args.stages, "patch_grid": grid}


def run_step(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def make_cohort(work: Path, stamp: dict) -> Path:
    """WORK/cohort.zarr made by synth_cohort + to_zarr, or reused when its stamp matches."""
    store, bids, stamp_file = work / "cohort.zarr", work / "bids", work / COHORT_STAMP
    if stamp_file.is_file() and store.is_dir() and json.loads(stamp_file.read_text()) == stamp:
        print(f"reusing the cohort {store} (same arguments: {stamp_file})")
        return store
    stamp_file.unlink(missing_ok=True)
    for old in (bids, store):  # to_zarr updates a store in place: start clean
        shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    synth = [sys.executable, "data_tools/synth_cohort.py", "--anatomy", anatomy.ANATOMY, "--out", str(bids),
             "--per-class", str(stamp["per_class"]), "--seed", str(stamp["seed"]),
             "--t1-shape", *map(str, stamp["t1_shape"]), "--fmri-shape", *map(str, stamp["fmri_shape"]),
             "--frames", str(stamp["frames"])]
    if stamp["structures"]:
        synth += ["--structures", *stamp["structures"]]
    if stamp["strength"]:
        synth += ["--strength", *map(str, stamp["strength"])]
    if stamp["stages"]:
        synth += ["--stages", *map(str, stamp["stages"])]
    run_step(synth)
    run_step([sys.executable, "data_tools/to_zarr.py", "--bids", str(bids), "--out", str(store),
              "--patch-grid", *map(str, stamp["patch_grid"]), "--no-progress"])
    atomic_write_json(stamp_file, stamp)
    return store


# --------------------------------------------------------------------------- training


def train_command(args: argparse.Namespace, run_dir: Path, store: Path, variant: str, repeat: int,
                  shape_overrides: list[str]) -> list[str]:
    return [sys.executable, "launch/train_local.py", "--config", str(args.config), f"run_dir={run_dir}",
            f"data.store={store}", f"data.cache_dir={args.work / CACHE_DIR}", f"split.repeat={repeat}",
            f"seed={repeat}", *shape_overrides,
            *VARIANTS[variant], *args.overrides]


TRAINING_CODE = ("masan/**/*.py", "launch/*.py")
"""The sources a run's result depends on beyond its config (:func:`code_fingerprint`)."""


def code_fingerprint() -> str:
    """SHA-256 of the training code (:data:`TRAINING_CODE`): a fix that leaves the config as it
    was (a gradient path, a kernel) must not be scored with runs made before it."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in TRAINING_CODE for p in REPO.glob(pattern)):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def train(cmd: list[str], run_dir: Path, cohort: dict, env: dict, cfg_hash: str, code: str) -> dict:
    """Train one run: skipped when it finished before with the same command, resolved config
    (``cfg_hash``: :func:`masan.config.config_hash`, so the config file and the code's defaults
    count), training code (``code``: :func:`code_fingerprint`) and cohort; resumed when it was
    interrupted; started afresh when one of them changed (or the run dir was not made by this
    benchmark: its checkpoints would refuse the config).

    Returns {"status": "trained" | "cached" | "failed", "minutes": training minutes so far}."""
    stamp = {"command": cmd[1:], "config_hash": cfg_hash, "code": code, "cohort": cohort}
    run = RunDir(run_dir)
    stamp_file = run.bench_stamp
    old = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    if run_dir.exists() and (old is None or {k: old.get(k) for k in stamp} != stamp):
        print(f"{run_dir}: made with other arguments, code or cohort: starting it afresh", flush=True)
        shutil.rmtree(run_dir)
        old = None
    if old is not None and old.get("done") and run.predictions.is_file():
        return {"status": "cached", "minutes": old["minutes"]}
    minutes = old.get("minutes", 0.0) if old else 0.0  # an interrupted run resumes: its time adds up
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp_file, {**stamp, "done": False, "minutes": minutes})
    log = run.train_log
    print("$", shlex.join(cmd), ">", shlex.quote(str(log)), flush=True)
    t = time.perf_counter()
    with log.open("a") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    minutes += (time.perf_counter() - t) / 60
    done = rc == 0 and run.predictions.is_file()
    atomic_write_json(stamp_file, {**stamp, "done": done, "minutes": minutes})
    if not done:
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        why = f"exit status {rc}" if rc else "no predictions.csv written (stopped before the end?)"
        print(f"FAILED ({why}): {shlex.join(cmd)}\n--- last lines of {log}:\n" + "\n".join(tail) + "\n---",
              flush=True)
    return {"status": "trained" if done else "failed", "minutes": minutes}


# --------------------------------------------------------------------------- scoring


def metric_values(labels: np.ndarray, probs: np.ndarray, names: list[str], positive: str) -> dict:
    from masan.metrics import classification_metrics

    m = classification_metrics(labels, probs.argmax(axis=1), names, positive, probs)
    return {k: m[k] for k in ("n", "accuracy", "binary_accuracy", "precision", "recall", "auc")}


def planted_regions(store, grid: list[int]) -> dict:
    """The regions holding planted T1 voxels on ``grid``: all of them (most planted voxels
    first) and per structure."""
    from masan.evaluate.oracle import planted_masks, planted_region_ranks

    effect = store.attrs["planted_effect"]
    subject = store.subjects[0]
    shape, affine = store.shape(subject, "t1"), store.affine(subject, "t1")
    per = {name: anatomy.region_ranks(mask, grid) for name, mask in planted_masks(effect, shape, affine).items()}
    return {"all": planted_region_ranks(effect, shape, affine, grid), "by_structure": per}


def region_result(region_weights: np.ndarray, labels: np.ndarray, planted: dict) -> dict:
    """Where the planted regions sit in the model's ranking (mean weight over the test subjects)."""
    from masan.evaluate.region_ranking import rank_regions

    if region_weights.size == 0 or not planted["all"]:
        return {"best_rank": None, "top3": None}
    order = [r for r, _ in rank_regions(region_weights, labels)]
    rank = {r: i + 1 for i, r in enumerate(order)}
    by_structure = {s: min((rank[r] for r in regions), default=None) for s, regions in planted["by_structure"].items()}
    best = min(rank[r] for r in planted["all"])
    return {"best_rank": best, "top3": best <= TOP_K, "rank_by_structure": by_structure,
            "model_top": order[:TOP_K]}


def score_run(run_dir: Path, planted: dict) -> dict:
    from masan.evaluate.predict import load_predictions

    cfg = load_config(RunDir(run_dir).config)
    preds, names = load_predictions(run_dir, "test")
    out = metric_values(preds.labels, preds.probs, names, cfg.data.positive_class)
    return {**out, **region_result(preds.region_weights, preds.labels, planted)}


class Oracle:
    """The planted-feature oracle on a repeat's split (features measured once per store)."""

    def __init__(self, store, data_cfg, split_cfg):
        from masan.data.dataset import select_subjects

        self.store, self.split_cfg = store, split_cfg
        subjects, labels, self.names = select_subjects(store, data_cfg)
        self.label = dict(zip(subjects, labels))
        self.positive = data_cfg.positive_class
        self._features: dict[str, np.ndarray] | None = None

    def features(self, subjects: list[str]) -> np.ndarray:
        from masan.evaluate.oracle import planted_features

        if self._features is None:
            every = sorted(self.label)
            self._features = dict(zip(every, planted_features(self.store, every)))
        return np.stack([self._features[s] for s in subjects])

    def split(self, repeat: int, run_dirs: list[Path]):
        """The split the runs of this repeat used (their split.json), else made the same way."""
        import dataclasses

        from masan.data.splits import Split, make_split

        for d in run_dirs:
            if RunDir(d).split.is_file():
                return Split.load(RunDir(d).split)
        cfg = dataclasses.replace(self.split_cfg, repeat=repeat)
        subjects = sorted(self.label)
        return make_split(subjects, [self.label[s] for s in subjects], cfg)

    def score(self, split) -> dict:
        from masan.evaluate.oracle import oracle_predict

        train_y = np.array([self.label[s] for s in split.train])
        test_y = np.array([self.label[s] for s in split.test])
        prob = oracle_predict(self.features(split.train), train_y, self.features(split.test))
        probs = np.zeros((len(test_y), len(self.names)))
        probs[:, np.unique(train_y)] = prob  # columns: the sorted training labels
        out = metric_values(test_y, probs, self.names, self.positive)
        majority = int(np.bincount(train_y, minlength=len(self.names)).argmax())
        pos = self.names.index(self.positive)
        baseline = {"majority_class": self.names[majority], "majority_accuracy": float((test_y == majority).mean()),
                    "positive_class": self.positive, "never_positive_accuracy": float((test_y != pos).mean())}
        return {**out, "best_rank": None, "top3": None, "baseline": baseline}


# --------------------------------------------------------------------------- table


def cell(values: list, digits: int = 2) -> str:
    """"mean ± std" (sample std) of the values that are not None; one value alone; "-" for none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def run_line(name: str, repeat: int, r: dict) -> str:
    if r.get("status") == "failed":
        where = f" after {r['minutes']:.1f} min (see {r['log']})" if "log" in r else ""
        return f"{name:<10} r{repeat}: FAILED{where}"
    auc = "-" if r["auc"] is None else f"{r['auc']:.2f}"
    where = ""
    if r.get("best_rank") is not None:
        ranks = ", ".join(f"{s} {k}" for s, k in r["rank_by_structure"].items())
        where = f"  planted best rank {r['best_rank']} (top{TOP_K}: {'yes' if r['top3'] else 'no'}; {ranks})"
    mins = f"  {r['minutes']:.1f} min" + (" (cached)" if r.get("status") == "cached" else "") if "minutes" in r else ""
    return (f"{name:<10} r{repeat}: acc {r['accuracy']:.2f}  AD acc {r['binary_accuracy']:.2f}  "
            f"P {r['precision']:.2f}  R {r['recall']:.2f}  AUC {auc}{where}{mins}")


def table(rows: dict[str, list[dict]], n_repeats: int, baselines: list[dict], minutes: float, header: str) -> str:
    head = ["model", *(c for c, _, _ in COLUMNS), f"top-{TOP_K} hits", "runs ok", "min/run"]
    out = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        ok = [r for r in runs if r.get("status") != "failed"]
        cells = [cell([r.get(k) for r in ok], d) for _, k, d in COLUMNS]
        hits = [r["top3"] for r in ok if r.get("top3") is not None]
        top = f"{sum(hits)}/{len(hits)}" if hits else "-"
        mins = cell([r["minutes"] for r in runs if "minutes" in r], 1)
        out.append("| " + " | ".join([name, *cells, top, f"{len(ok)}/{n_repeats}", mins]) + " |")
    if baselines:
        maj, pos = baselines[0]["majority_class"], baselines[0]["positive_class"]
        out += ["", f"Chance: always-{maj} 4-class acc {cell([b['majority_accuracy'] for b in baselines])}; "
                    f"never-{pos} {pos}-vs-rest acc {cell([b['never_positive_accuracy'] for b in baselines])} "
                    "(precision 0, recall 0, AUC 0.5)."]
    out += [f"Took {minutes:.1f} min."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Trailing KEY=VALUE overrides go to every training run "
                                        "(e.g. train.joint_epochs=40 optim.lr=3e-4).")
    ap.add_argument("--work", type=Path, default=REPO / "runs/science", help="work dir (default runs/science)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default WORK/science.md)")
    ap.add_argument("--config", type=Path, default=CONFIG, help="run config (default hpc/configs/science.yaml)")
    ap.add_argument("--repeats", type=int, default=3, help="splits (split.repeat = seed = 0..N-1)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                    help="variants to train (default all): " + ", ".join(VARIANTS))
    ap.add_argument("--per-class", type=int, default=None, help="subjects per class (default 16; --full 24)")
    add_effect_arguments(ap)  # the cohort's planted effect, as data_tools/synth_cohort.py takes it
    ap.add_argument("--seed", type=int, default=0, help="cohort seed")
    add_shape_arguments(ap, {k: f"the config's model.{v}, for the cohort and the model" for k, v in
                             (("t1-shape", "t1_shape"), ("fmri-shape", "fmri_shape"), ("frames", "fmri_frames"))})
    ap.add_argument("--full", action="store_true",
                    help=f"GPU-sized cohort: T1 {FULL['t1_shape']}, fMRI {FULL['fmri_shape']} x {FULL['frames']}, "
                         f"{FULL['per_class']} per class; runs with train.device=auto")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs trained in parallel, each on cpu_count/jobs threads (default 2: on 2 CPU cores two "
                         "one-thread runs finish sooner than one run on both; 1 for one GPU)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    argv = sys.argv[1:] if argv is None else list(argv)
    # KEY=VALUE may follow --variants/--structures (nargs="+"): take them out before parsing
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if args.repeats < 1 or args.jobs < 1:
        ap.error("--repeats and --jobs must be at least 1")
    args.variants = list(dict.fromkeys(args.variants))
    return args


def lock_work(work: Path):
    """Hold WORK/science.lock for this process's life, or None when another benchmark holds it
    (two benchmarks in one work dir would restart each other's runs)."""
    work.mkdir(parents=True, exist_ok=True)
    f = (work / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        print(f"error: another bench/science.py (pid {holder}) is using {work}; wait for it or pass --work DIR",
              file=sys.stderr)
        return None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def main(argv: list[str] | None = None) -> int:
    from masan.data.store import CohortStore

    args = parse_args(argv)
    start = time.perf_counter()
    args.work = args.work.resolve()
    lock = lock_work(args.work)
    if lock is None:
        return 2
    out = args.out or args.work / "science.md"
    full = FULL if args.full else {}
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.per_class = args.per_class or full.get("per_class", 16)
    args.t1_shape = args.t1_shape or full.get("t1_shape", base.model.t1_shape)
    args.fmri_shape = args.fmri_shape or full.get("fmri_shape", base.model.fmri_shape)
    args.frames = args.frames or full.get("frames", base.model.fmri_frames)
    shape_overrides = [f"{k}={v}" for k, v, now in (
        ("model.t1_shape", list(args.t1_shape), base.model.t1_shape),
        ("model.fmri_shape", list(args.fmri_shape), base.model.fmri_shape),
        ("model.fmri_frames", args.frames, base.model.fmri_frames),
        ("data.fmri_frames", args.frames, base.data.fmri_frames),
        ("train.device", "auto" if args.full else base.train.device, base.train.device)) if v != now]
    shape_overrides = [o.replace(" ", "") for o in shape_overrides]  # [48,56,48]: one shell word
    grid = list(base.model.patch_grid)
    stamp = cohort_args(args, grid)
    try:
        store_path = make_cohort(args.work, stamp)
    except subprocess.CalledProcessError as e:
        print(f"error: making the cohort failed (exit status {e.returncode}): {shlex.join(e.cmd)}", file=sys.stderr)
        return 1
    (args.work / CACHE_DIR).mkdir(exist_ok=True)
    store = CohortStore(store_path)
    planted = planted_regions(store, grid)
    print(f"planted regions on the {'x'.join(map(str, grid))} grid (most planted voxels first): {planted['all']}; "
          + "; ".join(f"{s}: {r}" for s, r in planted["by_structure"].items()))

    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    jobs = sorted(((r, v) for r in range(args.repeats) for v in args.variants), key=lambda j: -MINUTES.get(j[1], 0))
    run_dirs = {(r, v): args.work / "runs" / v / f"r{r}" for r, v in jobs}
    results: dict[tuple[int, str], dict] = {}
    print(f"training {len(jobs)} runs ({args.repeats} repeats x {', '.join(args.variants)}), {args.jobs} at a time; "
          f"logs in {args.work / 'runs'}/<variant>/r<repeat>/{RunDir.TRAIN_LOG_NAME}", flush=True)
    commands = {(r, v): train_command(args, run_dirs[r, v], store_path, v, r, shape_overrides) for r, v in jobs}
    try:
        hashes = {job: config_hash(load_config(args.config, cmd[cmd.index("--config") + 2:]))
                  for job, cmd in commands.items()}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = code_fingerprint()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train, commands[job], run_dirs[job], stamp, env, hashes[job], code): job
                   for job in jobs}
        for fut in as_completed(futures):
            r, v = futures[fut]
            res = fut.result()
            res["log"] = str(RunDir(run_dirs[r, v]).train_log)
            if res["status"] != "failed":
                try:
                    res.update(score_run(run_dirs[r, v], planted))
                except (ValueError, OSError) as e:
                    print(f"{v} r{r}: cannot score {run_dirs[r, v]}: {e}", flush=True)
                    res["status"] = "failed"
            results[r, v] = res
            print(run_line(v, r, res), flush=True)

    oracle = Oracle(store, base.data, base.split)
    oracle_runs, baselines = [], []
    for r in range(args.repeats):
        try:
            split = oracle.split(r, [run_dirs[r, v] for v in sorted(args.variants, key=lambda v: v != "masan")])
            res = oracle.score(split)
            baselines.append(res.pop("baseline"))
        except ValueError as e:  # no split.json and none can be made (SplitError), bad features
            print(f"{ORACLE} r{r}: {e}", flush=True)
            res = {"status": "failed", "error": str(e)}
        oracle_runs.append(res)
        print(run_line(ORACLE, r, res), flush=True)

    minutes = (time.perf_counter() - start) / 60
    rows = {ORACLE: oracle_runs, **{v: [results[r, v] for r in range(args.repeats)] for v in args.variants}}
    header = (f"Science benchmark: MNI152 cohort, {args.per_class} per class, T1 {'x'.join(map(str, args.t1_shape))}, "
              f"fMRI {'x'.join(map(str, args.fmri_shape))} x {args.frames}, planted "
              f"{', '.join(planted['by_structure'])}; {args.repeats} repeat(s); config {args.config.name}"
              + (f" + {' '.join(args.overrides)}" if args.overrides else "")
              + ". Cells: mean ± std over repeats; planted rank: best rank of a planted region in the model's "
                "region ranking (1 = top).")
    text = table(rows, args.repeats, baselines, minutes, header)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {"cohort": stamp, "config": str(args.config), "overrides": args.overrides, "planted_regions": planted,
           "runs": {name: [{"repeat": r, **res} for r, res in enumerate(runs)] for name, runs in rows.items()},
           "baselines": baselines, "minutes": minutes}
    (args.work / "science.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {args.work / 'science.json'}")
    return 0 if all(r.get("status") != "failed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
