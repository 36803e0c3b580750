"""The science experiment's training runs: the trained variants, one run's ``launch/train_local.py``
command line, and training it once. A run's stamp (its arguments, resolved config, training code
and cohort: RunDir.bench_stamp) says whether a finished run is reused, an interrupted one resumed
or a changed one started afresh."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments import REPO
from masan.config import RunConfig, load_config
from masan.files import atomic_write_json
from masan.rundir import RunDir
from masan.train.runlock import LAUNCHER_PID_ENV, RunLock, RunLockedError

PAPER_EXACT = REPO / "hpc/configs/paper-exact.yaml"
MAIN = "masan"
"""The variant every repeat trains (--ablation-repeats may train the others on fewer)."""
VARIANTS = {
    MAIN: [],
    "masan_add": ["model.fusion=add"],
    "no_conn": ["model.connectivity_cells=0", "model.connectivity_keep=0"],
    "t1_only": ["model.modalities=t1", "data.use_fmri=false"],
    "fmri_only": ["model.modalities=fmri", "data.use_t1=false"],
    "hfcn": ["model.arch=hfcn", "data.use_fmri=false"],
    "paper_exact": [],
}
"""Trained variants: their overrides of the run config."""
PRESET_MODEL = {"easy": [], "adni-like": ["model.connectivity_cells=3", "model.connectivity_keep=5",
                                         "model.fusion_cells=5", "model.screen_fraction=0.0001",
                                         "train.joint_epochs=24", "model.head=ordinal",
                                         "data.decision=expected_stage", "loss.label_smoothing=0.1"]}
"""The run settings for each cohort preset, given to every variant trained from --config (before
the variant's own overrides; not to :data:`OWN_CONFIG`'s): adni-like's fMRI effect is a coupling
change, which the connectivity pairs see (masan/model/connectivity.py), and its T1 effect is of
realistic size in small structures, which finer region cells keep. The pairs' cells and count, the
region cells and the screened fraction were chosen by cross-validation inside the training part of
the benchmark cohort's split 0 (and confirmed inside those of splits 1 and 2): most test subjects
of every repeat of that cohort were seen by one of those training parts, so none of its splits is
held out (:data:`CHOSEN_ON`), and the cohorts of other seeds (never used to choose anything) are
the held-out check. The longer joint
phase, the ordinal head, the expected-stage decision (the classes are ordered stages) and the
label smoothing were chosen on development cohorts of other seeds (docs/validation-cohort.md)."""
CHOSEN_ON = {"adni-like": 0}
"""The cohort seed each preset's settings were chosen on: its splits are not a held-out result."""
OWN_CONFIG = {"paper_exact": PAPER_EXACT}
"""Variants trained from their own config instead of --config, at the bench's scale (:data:`BENCH_SCALE`)."""
BENCH_SCALE = ("model.t1_shape", "model.fmri_shape", "model.fmri_frames", "model.patch_grid", "model.channels",
               "model.fmri_channels", "model.groups", "model.attn_dim", "model.value_dim", "model.mlp_hidden",
               "data.fmri_frames", "data.num_workers", "data.cache", "data.cache_reserve_gib", "optim.micro_batch",
               "train.pretrain_epochs", "train.joint_epochs", "train.norm_refresh_epochs", "train.precision",
               "train.device", "checkpoint", "log")
"""What a variant of :data:`OWN_CONFIG` takes from the bench's config: input sizes, widths, epochs,
batch and how a run runs, so it costs what the other variants cost (the config's own epochs, not a
preset's longer joint phase: the paper's exact model called everyone one class with either,
docs/validation-cohort.md). The paper's widths (Table 1's
32/64/128/128) shrink with its inputs as the bench's MASAN's do; nothing of the method changes."""
CACHE_DIR = "cache"
"""WORK/cache: ``data.cache`` files of the running trainings (science.yaml: ``host``), on the work
dir's disk rather than /dev/shm, which containers often keep small; each run removes its own."""
TAIL_LINES = 25


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
    """``launch/train_local.py`` for one run: --config with the preset's model settings (or the
    variant's own config at the bench's scale), the run's place and split, the cohort's shapes, the
    variant's and the user's overrides."""
    config, scale = args.config, PRESET_MODEL[args.preset]
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


def portable(cmd: list[str], work: Path | None) -> list[str]:
    """``cmd`` as a run's stamp compares it: the work folder written ``<work>`` and the repository
    ``<repo>``, so a work folder moved (copied to another node) or trained from another clone is
    the same command, as its config hash already says (it leaves paths out)."""
    places = [(str(REPO), "<repo>")] + ([(str(work.absolute()), "<work>"), (str(work.resolve()), "<work>")]
                                          if work else [])
    places.sort(key=lambda place: -len(place[0]))  # the work folder may lie inside the repository
    out = []
    for arg in cmd:
        for path, name in places:  # whole path components only: /x/w is not the start of /x/w2
            arg = re.sub(re.escape(path) + r"(?=/|$)", name, arg)
        out.append(arg)
    return out


def train(cmd: list[str], run_dir: Path, cohort: dict, env: dict, cfg_hash: str, code: str,
          work: Path | None = None) -> dict:
    """Train one run: skipped when it finished before with the same command (:func:`portable`
    under ``work``: paths do not count), resolved config
    (``cfg_hash``: :func:`masan.config.config_hash`, so the config file and the code's defaults
    count), training code (``code``: :func:`code_fingerprint`) and cohort; resumed when it was
    interrupted; started afresh when one of them changed (or the run dir was not made by this
    benchmark: its checkpoints would refuse the config).

    Returns {"status": "trained" | "cached" | "failed", "minutes": training minutes so far}."""
    stamp = {"command": portable(cmd[1:], work), "config_hash": cfg_hash, "code": code, "cohort": cohort}
    run = RunDir(run_dir)
    stamp_file = run.bench_stamp
    old = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    if old is not None and isinstance(old.get("command"), list):  # a stamp of before paths were written portably
        old["command"] = portable([str(a) for a in old["command"]], work)
    if run_dir.exists() and (old is None or {k: old.get(k) for k in stamp} != stamp):
        lock = RunLock(run_dir)
        try:
            lock.take_existing()  # a training still at work there (an earlier benchmark's) keeps its folder
        except RunLockedError as e:
            print(f"FAILED: {run_dir} was made with other arguments, code or cohort, but {e}", flush=True)
            return {"status": "failed", "minutes": 0.0}
        print(f"{run_dir}: made with other arguments, code or cohort: starting it afresh", flush=True)
        shutil.rmtree(run_dir)
        lock.release()
        old = None
    if old is not None and old.get("done") and run.predictions.is_file():
        return {"status": "cached", "minutes": old["minutes"]}
    minutes = old.get("minutes", 0.0) if old else 0.0  # an interrupted run resumes: its time adds up
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp_file, {**stamp, "done": False, "minutes": minutes})
    log = run.train_log
    print("$", shlex.join(cmd), ">", shlex.quote(str(log)), flush=True)
    t = time.perf_counter()
    env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}  # the training ends with the benchmark, kill -9 included
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
