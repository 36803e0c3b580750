#!/usr/bin/env python
"""Does the model learn a realistic cohort? MASAN, its ablations, the H-FCN baseline and the
paper's exact MASAN against an oracle and a linear baseline, on the MNI152 validation cohort
with planted effects, side by side in one run.

1. Makes the cohort once in WORK (reused while the cohort arguments stay the same; a stamp file
   WORK/cohort.json records them): ``data_tools/synth_cohort.py --anatomy mni152 --preset P``
   then ``data_tools/to_zarr.py --register R --template mni152``. ``--preset easy`` (default,
   WORK runs/science): 4 classes x ``--per-class``, no registration; ``--preset adni-like``
   (WORK runs/science-adni-like): ``--subjects`` in ADNI-like proportions, registered to the
   template with ``--register`` (default syn).
2. Trains every variant on every repeat's split with ``launch/train_local.py --config
   hpc/configs/science.yaml`` (run dirs WORK/runs/<variant>/r<repeat>, log in train.log there;
   a run finished with the same arguments, resolved config and cohort is not trained again, an
   interrupted one resumes, one where any of them changed starts afresh; one benchmark at a time
   per WORK: WORK/science.lock). Variants::

       masan        our MASAN (T1 + fMRI, T1-guided attention fusion; science.yaml)
       masan_add    fusion by element-wise addition (model.fusion=add)
       t1_only      MASAN on T1 alone;  fmri_only: on fMRI alone
       hfcn         the T1-only H-FCN baseline (model.arch=hfcn: sPM's patch features, MASAN's
                    region options, a patch -> region -> subject head)
       paper_exact  MASAN as the paper states it (hpc/configs/paper-exact.yaml), at the bench's
                    sizes and budget (:data:`BENCH_SCALE` taken from the bench's config)

   ``--ablation-repeats K`` trains the variants other than masan on the first K repeats only.
3. Scores each run's test predictions: 4-class accuracy; AD vs rest accuracy, precision, recall
   (AD positive: arg-max class AD) and AUC of prob_AD; and where the model looks: the rank of
   the best-ranked planted region in its region ranking (mean region weight over the test
   subjects, 1 = top) and whether a planted region is in its top 3.
4. Rows that train no network (bench/baselines.py), on the split the repeat's runs used, every
   repeat: the oracle, a logistic regression on the planted features (what finding the planted
   effect is worth); ``linear`` and ``linear_both``, which know nothing of it: ANOVA screening and
   a logistic regression on the stored T1 voxels (and fMRI features), k and C chosen by
   cross-validation on the training part.

Prints a line per finished run and one markdown table (mean +- std over repeats), written to
--out (default WORK/science.md), raw numbers to WORK/science.json.

  python bench/science.py                                   # 3 repeats x every variant (min/run: see the table)
  python bench/science.py --repeats 1 --variants masan t1_only linear train.joint_epochs=40
  python bench/science.py --repeats 5 --ablation-repeats 2  # MASAN on 5 splits, the others on the first 2
  python bench/science.py --preset adni-like --register affine   # 96 subjects, ADNI-like, registered
  python bench/science.py --full --jobs 1                   # GPU-sized: T1 96x112x96, fMRI 24x28x24 x 64, 4 x 24
  python bench/science.py --structures hippocampus entorhinal --strength 0.4 --work runs/science_weak
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench.baselines and masan import with the repository as the only path entry
    sys.path.insert(0, str(REPO))

from bench.baselines import LinearBaseline, Oracle, metric_values  # noqa: E402
from masan.config import ConfigError, RunConfig, config_hash, load_config  # noqa: E402
from masan.files import atomic_write_json  # noqa: E402
from masan.rundir import RunDir  # noqa: E402
from masan.synth import anatomy  # noqa: E402
from masan.synth.options import add_effect_arguments, add_shape_arguments  # noqa: E402
from masan.synth.presets import PRESETS  # noqa: E402

CONFIG = REPO / "hpc/configs/science.yaml"
PAPER_EXACT = REPO / "hpc/configs/paper-exact.yaml"
MAIN = "masan"
VARIANTS = {
    MAIN: [],
    "masan_add": ["model.fusion=add"],
    "t1_only": ["model.modalities=t1", "data.use_fmri=false"],
    "fmri_only": ["model.modalities=fmri", "data.use_t1=false"],
    "hfcn": ["model.arch=hfcn", "data.use_fmri=false"],
    "paper_exact": [],
}
"""Trained variants: their overrides of the run config."""
OWN_CONFIG = {"paper_exact": PAPER_EXACT}
"""Variants trained from their own config instead of --config, at the bench's scale (:data:`BENCH_SCALE`)."""
BENCH_SCALE = ("model.t1_shape", "model.fmri_shape", "model.fmri_frames", "model.patch_grid", "model.channels",
               "model.fmri_channels", "model.groups", "model.attn_dim", "model.value_dim", "model.mlp_hidden",
               "data.fmri_frames", "data.num_workers", "data.cache", "data.cache_reserve_gib", "optim.micro_batch",
               "train.pretrain_epochs", "train.joint_epochs", "train.norm_refresh_epochs", "train.precision",
               "train.device", "checkpoint", "log")
"""What a variant of :data:`OWN_CONFIG` takes from the bench's config: input sizes, widths, epochs,
batch and how a run runs, so it costs what the other variants cost. The paper's widths (Table 1's
32/64/128/128) shrink with its inputs as the bench's MASAN's do; nothing of the method changes."""
LINEAR = {"linear": False, "linear_both": True}
"""Rows fitted without training (bench/baselines.py): name -> with fMRI features."""
MINUTES = {"t1_only": 8.2, "hfcn": 8.2, "masan": 7.6, "paper_exact": 7.6, "masan_add": 5.4, "fmri_only": 0.7}
"""Minutes per run at the default size on 2 CPU cores (one thread each; the mean of the five
repeats of docs/results/science_cpu_5repeats_final.md; hfcn and paper_exact not yet measured:
those of t1_only and masan, whose autoencoders they train): runs are started longest first, so
the short ones fill the end and neither core idles at the tail."""
FULL = {"per_class": 24, "t1_shape": [96, 112, 96], "fmri_shape": [24, 28, 24], "frames": 64}
"""--full: a GPU-sized cohort (and train.device=auto: the config pins the CPU)."""
REGISTRATIONS = ("none", "rigid", "affine", "syn")
"""to_zarr.py --register: spatial normalisation of every subject to the template."""
DEFAULT_REGISTER = {"easy": "none", "adni-like": "syn"}
TEMPLATE = "mni152"
"""to_zarr.py --template: the space subjects are registered to (the cohort's own anatomy)."""
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


def balanced(preset: str) -> bool:
    """Is the cohort of ``preset`` sized per class (``--per-class``), not in all (``--subjects``)?"""
    return PRESETS[preset].proportions is None


def cohort_args(args: argparse.Namespace, grid: list[int]) -> dict:
    """Everything the cohort depends on (its stamp); its size is ``per_class`` (a balanced preset)
    or ``subjects``, the other None."""
    per_class = balanced(args.preset)
    return {"anatomy": anatomy.ANATOMY, "preset": args.preset, "register": args.register, "template": TEMPLATE,
            "per_class": args.per_class if per_class else None, "subjects": None if per_class else args.subjects,
            "structures": args.structures, "strength": args.strength, "seed": args.seed, "t1_shape": args.t1_shape,
            "fmri_shape": args.fmri_shape, "frames": args.frames, "stages": args.stages, "patch_grid": grid}


def cohort_commands(stamp: dict, bids: Path, store: Path) -> list[list[str]]:
    """The synth_cohort.py and to_zarr.py command lines that make the cohort of ``stamp``."""
    size = ["--per-class", str(stamp["per_class"])] if stamp["per_class"] is not None else \
        ["--subjects", str(stamp["subjects"])]
    synth = [sys.executable, "data_tools/synth_cohort.py", "--anatomy", stamp["anatomy"], "--preset", stamp["preset"],
             "--out", str(bids), *size, "--seed", str(stamp["seed"]),
             "--t1-shape", *map(str, stamp["t1_shape"]), "--fmri-shape", *map(str, stamp["fmri_shape"]),
             "--frames", str(stamp["frames"])]
    for flag in ("structures", "strength", "stages"):
        if stamp[flag]:
            synth += [f"--{flag}", *map(str, stamp[flag])]
    convert = [sys.executable, "data_tools/to_zarr.py", "--bids", str(bids), "--out", str(store),
               "--patch-grid", *map(str, stamp["patch_grid"]), "--register", stamp["register"],
               "--template", stamp["template"], "--no-progress"]
    if stamp["register"] != "none":  # registration resamples onto the template's grid: the model's shapes
        convert += ["--t1-shape", *map(str, stamp["t1_shape"]), "--fmri-shape", *map(str, stamp["fmri_shape"])]
    return [synth, convert]


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
    for cmd in cohort_commands(stamp, bids, store):
        run_step(cmd)
    atomic_write_json(stamp_file, stamp)
    return store


# --------------------------------------------------------------------------- training


def scale_overrides(base: RunConfig) -> list[str]:
    """``KEY=VALUE`` of every :data:`BENCH_SCALE` key as the bench's config ``base`` has it (values
    as JSON, which the config's YAML parser reads; a section as a mapping)."""
    out = []
    for key in BENCH_SCALE:
        value = functools.reduce(getattr, key.split("."), base)
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        out.append(f"{key}={json.dumps(value, separators=(',', ':'))}")
    return out


def train_command(args: argparse.Namespace, run_dir: Path, store: Path, variant: str, repeat: int,
                  shape_overrides: list[str], base: RunConfig) -> list[str]:
    """``launch/train_local.py`` for one run: --config (or the variant's own config at the bench's
    scale), the run's place and split, the cohort's shapes, the variant's and the user's overrides."""
    config, scale = args.config, []
    if variant in OWN_CONFIG:
        config, scale = OWN_CONFIG[variant], scale_overrides(base)
    return [sys.executable, "launch/train_local.py", "--config", str(config), f"run_dir={run_dir}",
            f"data.store={store}", f"data.cache_dir={args.work / CACHE_DIR}", f"split.repeat={repeat}",
            f"seed={repeat}", *scale, *shape_overrides, *VARIANTS[variant], *args.overrides]


def command_config(cmd: list[str]) -> RunConfig:
    """The resolved config a :func:`train_command` trains with (raises ConfigError)."""
    at = cmd.index("--config")
    return load_config(cmd[at + 1], cmd[at + 2:])


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


def planted_regions(store, grid: list[int]) -> dict:
    """The regions holding planted T1 voxels on ``grid``: all of them (most planted voxels
    first) and per structure."""
    from masan.evaluate.oracle import planted_masks, planted_region_ranks
    from masan.synth.structures import region_ranks

    effect = store.attrs["planted_effect"]
    subject = store.subjects[0]
    shape, affine = store.shape(subject, "t1"), store.affine(subject, "t1")
    per = {name: region_ranks(mask, grid) for name, mask in planted_masks(effect, shape, affine).items()}
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
    from masan.predictions import load_predictions

    cfg = load_config(RunDir(run_dir).config)
    preds, names = load_predictions(run_dir, "test")
    out = metric_values(preds.labels, preds.probs, names, cfg.data.positive_class)
    return {**out, **region_result(preds.region_weights, preds.labels, planted)}


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
        return f"{name:<11} r{repeat}: FAILED{where}"
    auc = "-" if r["auc"] is None else f"{r['auc']:.2f}"
    where = ""
    if r.get("best_rank") is not None:
        ranks = ", ".join(f"{s} {k}" for s, k in r["rank_by_structure"].items())
        where = f"  planted best rank {r['best_rank']} (top{TOP_K}: {'yes' if r['top3'] else 'no'}; {ranks})"
    chosen = ""
    if "chosen" in r:
        ks = ", ".join(f"{block} {k}" for block, k in r["chosen"]["k"].items())
        chosen = f"  (k {ks}; C {r['chosen']['C']})"
    mins = f"  {r['minutes']:.1f} min" + (" (cached)" if r.get("status") == "cached" else "") if "minutes" in r else ""
    return (f"{name:<11} r{repeat}: acc {r['accuracy']:.2f}  AD acc {r['binary_accuracy']:.2f}  "
            f"P {r['precision']:.2f}  R {r['recall']:.2f}  AUC {auc}{where}{chosen}{mins}")


def table(rows: dict[str, list[dict]], baselines: list[dict], minutes: float, header: str) -> str:
    """The markdown table: one line per row of ``rows`` (name -> its repeats' results, repeat
    0 first), the chance baselines under it."""
    head = ["model", *(c for c, _, _ in COLUMNS), f"top-{TOP_K} hits", "runs ok", "min/run"]
    out = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        ok = [r for r in runs if r.get("status") != "failed"]
        cells = [cell([r.get(k) for r in ok], d) for _, k, d in COLUMNS]
        hits = [r["top3"] for r in ok if r.get("top3") is not None]
        top = f"{sum(hits)}/{len(hits)}" if hits else "-"
        mins = cell([r["minutes"] for r in runs if "minutes" in r], 1)
        out.append("| " + " | ".join([name, *cells, top, f"{len(ok)}/{len(runs)}", mins]) + " |")
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
    ap.add_argument("--work", type=Path, default=None,
                    help="work dir (default runs/science; runs/science-adni-like for --preset adni-like)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default WORK/science.md)")
    ap.add_argument("--config", type=Path, default=CONFIG, help="run config (default hpc/configs/science.yaml)")
    ap.add_argument("--repeats", type=int, default=3, help="splits (split.repeat = seed = 0..N-1)")
    ap.add_argument("--ablation-repeats", type=int, default=None, metavar="K",
                    help=f"train the variants other than {MAIN} on the first K repeats only (default: all)")
    rows = [*VARIANTS, *LINEAR]
    ap.add_argument("--variants", nargs="+", default=rows, choices=rows, metavar="NAME",
                    help="rows beside the oracle (default all): trained " + ", ".join(VARIANTS)
                         + "; fitted without training " + ", ".join(LINEAR))
    ap.add_argument("--preset", choices=list(PRESETS), default="easy",
                    help="how hard the cohort is, synth_cohort.py --preset (default easy: 4 balanced classes, a "
                         "strong effect; adni-like: the paper's class proportions, ADNI-like effects, warps)")
    ap.add_argument("--register", choices=REGISTRATIONS, default=None,
                    help=f"to_zarr.py --register, to the {TEMPLATE} template (default: "
                         + ", ".join(f"{r} for {p}" for p, r in DEFAULT_REGISTER.items()) + ")")
    ap.add_argument("--per-class", type=int, default=None,
                    help=f"--preset easy: subjects per class (default {PRESETS['easy'].per_class}; "
                         f"--full {FULL['per_class']})")
    ap.add_argument("--subjects", type=int, default=None,
                    help=f"--preset adni-like: subjects in all (default {PRESETS['adni-like'].subjects})")
    add_effect_arguments(ap)  # the cohort's planted effect, as data_tools/synth_cohort.py takes it
    ap.add_argument("--seed", type=int, default=0, help="cohort seed")
    add_shape_arguments(ap, {**{k: f"the config's model.{v}, for the cohort and the model" for k, v in
                                (("t1-shape", "t1_shape"), ("fmri-shape", "fmri_shape"))},
                             "frames": "the preset's (easy 16, adni-like 48), for the cohort and the model"})
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
    args.ablation_repeats = args.repeats if args.ablation_repeats is None else args.ablation_repeats
    if min(args.repeats, args.jobs, args.ablation_repeats) < 1:
        ap.error("--repeats, --ablation-repeats and --jobs must be at least 1")
    args.ablation_repeats = min(args.ablation_repeats, args.repeats)
    size, other = ("--per-class", "--subjects") if balanced(args.preset) else ("--subjects", "--per-class")
    if getattr(args, other[2:].replace("-", "_")) is not None:
        ap.error(f"{other} does not apply to --preset {args.preset}: {size} sizes that cohort")
    args.register = args.register or DEFAULT_REGISTER[args.preset]
    args.subjects = args.subjects or PRESETS[args.preset].subjects
    args.work = args.work or REPO / ("runs/science" if args.preset == "easy" else f"runs/science-{args.preset}")
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


def train_runs(args: argparse.Namespace, jobs: list[tuple[int, str]], run_dirs: dict, commands: dict,
               cohort: dict, planted: dict) -> dict[tuple[int, str], dict] | None:
    """Train (or reuse) and score every (repeat, variant) of ``jobs``, ``args.jobs`` at a time,
    longest first; None when a run's config does not load."""
    try:
        hashes = {job: config_hash(command_config(cmd)) for job, cmd in commands.items()}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    code = code_fingerprint()
    results: dict[tuple[int, str], dict] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train, commands[job], run_dirs[job], cohort, env, hashes[job], code): job
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
    return results


def fitted_rows(args: argparse.Namespace, store, base: RunConfig, run_dirs: dict, planted: dict
                ) -> tuple[dict[str, list[dict]], list[dict]]:
    """The oracle and the ``linear`` rows of ``args.variants`` on every repeat's split (the one its
    runs used, MASAN's first): {row: results per repeat}, and the chance baselines per repeat."""
    oracle = Oracle(store, base.data, base.split)
    linear = {name: LinearBaseline(store, base.data, base.split, base.model.patch_grid, fmri)
              for name, fmri in LINEAR.items() if name in args.variants}
    rows: dict[str, list[dict]] = {ORACLE: [], **{name: [] for name in linear}}
    baselines = []
    for r in range(args.repeats):
        mine = sorted((v for rr, v in run_dirs if rr == r), key=lambda v: v != MAIN)
        try:
            split = oracle.split(r, [run_dirs[r, v] for v in mine])
        except ValueError as e:  # no split.json and none can be made (SplitError)
            for name in rows:
                rows[name].append({"status": "failed", "error": str(e)})
                print(f"{name} r{r}: {e}", flush=True)
            continue
        for name, row in [(ORACLE, oracle), *linear.items()]:
            try:
                res = row.score(split)
                if name == ORACLE:
                    baselines.append(res.pop("baseline"))
                else:
                    res.update(region_result(res.pop("region_weights"), row.labels(split.test), planted))
            except ValueError as e:  # bad features, a class missing from the training part
                print(f"{name} r{r}: {e}", flush=True)
                res = {"status": "failed", "error": str(e)}
            rows[name].append(res)
            print(run_line(name, r, res), flush=True)
    return rows, baselines


def main(argv: list[str] | None = None) -> int:
    from masan.store.cohort import CohortStore

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
    args.per_class = args.per_class or full.get("per_class", PRESETS[args.preset].per_class)
    args.t1_shape = args.t1_shape or full.get("t1_shape", base.model.t1_shape)
    args.fmri_shape = args.fmri_shape or full.get("fmri_shape", base.model.fmri_shape)
    args.frames = args.frames or full.get("frames", PRESETS[args.preset].frames)
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

    trained = [v for v in args.variants if v in VARIANTS]
    repeats = {v: args.repeats if v == MAIN else args.ablation_repeats for v in trained}
    jobs = sorted(((r, v) for v in trained for r in range(repeats[v])), key=lambda j: -MINUTES.get(j[1], 0))
    run_dirs = {(r, v): args.work / "runs" / v / f"r{r}" for r, v in jobs}
    print(f"training {len(jobs)} runs ({', '.join(f'{v} x {repeats[v]}' for v in trained) or 'none'}), "
          f"{args.jobs} at a time; logs in {args.work / 'runs'}/<variant>/r<repeat>/{RunDir.TRAIN_LOG_NAME}",
          flush=True)
    commands = {job: train_command(args, run_dirs[job], store_path, job[1], job[0], shape_overrides, base)
                for job in jobs}
    results = train_runs(args, jobs, run_dirs, commands, stamp, planted)
    if results is None:
        return 2
    fitted, baselines = fitted_rows(args, store, base, run_dirs, planted)

    minutes = (time.perf_counter() - start) / 60
    rows = {**fitted, **{v: [results[r, v] for r in range(repeats[v])] for v in trained}}
    fewer = args.ablation_repeats < args.repeats and any(repeats[v] < args.repeats for v in trained)
    if fewer and MAIN in trained:
        rows[f"{MAIN} (first {args.ablation_repeats})"] = rows[MAIN][:args.ablation_repeats]
    size = (f"{args.per_class} per class" if balanced(args.preset) else f"{args.subjects} subjects") + \
        f" ({args.preset}, registration {args.register})"
    header = (f"Science benchmark: MNI152 cohort, {size}, T1 {'x'.join(map(str, args.t1_shape))}, "
              f"fMRI {'x'.join(map(str, args.fmri_shape))} x {args.frames}, planted "
              f"{', '.join(planted['by_structure'])}; {args.repeats} repeat(s)"
              + (f" ({', '.join(v for v in trained if repeats[v] < args.repeats)}: the first "
                 f"{args.ablation_repeats}, --ablation-repeats)" if fewer else "")
              + f"; config {args.config.name}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
              + (f"; paper_exact: {PAPER_EXACT.name} at the bench's sizes" if "paper_exact" in trained else "")
              + ". Cells: mean ± std over repeats; planted rank: best rank of a planted region in the model's "
                "region ranking (1 = top).")
    text = table(rows, baselines, minutes, header)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {"cohort": stamp, "config": str(args.config), "overrides": args.overrides, "planted_regions": planted,
           "repeats": args.repeats, "ablation_repeats": args.ablation_repeats,
           "runs": {name: [{"repeat": r, **res} for r, res in enumerate(runs)] for name, runs in rows.items()},
           "baselines": baselines, "minutes": minutes}
    (args.work / "science.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {out} and {args.work / 'science.json'}")
    failed = [r for r in results.values() if r.get("status") == "failed"]
    failed += [r for name, runs in fitted.items() if name != ORACLE for r in runs if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
