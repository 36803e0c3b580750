"""What one submission trains: run directories x resolved configs, and SLURM resources.

``--repeats N`` and ``--ablation key=value`` (or several overrides in one quoted variant) expand
into one run per (variant, repeat):

    run_dir/                       one run (no ablation, one repeat)
    run_dir/repeat_R/              --repeats N
    run_dir/<variant>/repeat_R/    --ablation ... (variant ``baseline`` plus one per ablation)

Repeat R sets ``split.repeat=R`` (a different stratified split; nothing else changes). A run
directory that already holds a ``config.yaml`` (written by run_training at every start) is
resumed with that config unless ``--config`` is given, so resubmitting needs no flags.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from masan.config import ConfigError, RunConfig, load_config
from masan.rundir import RunDir

BASELINE = "baseline"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a submission."""

    run_dir: Path
    variant: str
    """``baseline`` or the ablation override, e.g. ``model.fusion=add``."""
    repeat: int
    cfg: RunConfig

    def done(self) -> dict | None:
        """The run's DONE record for this config's epoch target, or None (a stale DONE of a
        shorter target does not count: the same check run_training makes before training).
        Null input shapes are the store's, as the run resolved them before it wrote DONE."""
        rd = RunDir(self.run_dir)
        done = rd.finished(self.cfg)
        m = self.cfg.model
        if done is not None or not rd.done.exists() or None not in (m.t1_shape, m.fmri_shape, m.fmri_frames,
                                                                      self.cfg.data.fmri_frames):
            return done  # a run that never finished reads no store here: its start check does
        from masan.train.run import USER_ERRORS, resolve_from_store  # torch: only for such a config

        resolved = copy.deepcopy(self.cfg)
        try:
            resolve_from_store(resolved)
        except USER_ERRORS:  # no store to resolve from: the run's start says why
            return None
        return rd.finished(resolved)


SUBMITIT = "submitit"
"""Field metadata key: the ``submitit.SlurmExecutor`` parameter a :class:`Resources` field sets."""


def sbatch(parameter: str, default=None, omit: tuple = (None,)):
    """A :class:`Resources` field that becomes submitit's executor parameter ``parameter``
    (:meth:`Resources.executor_parameters`); values in ``omit`` are left to SLURM's default."""
    return field(default=default, metadata={SUBMITIT: parameter, "omit": omit})


@dataclass(frozen=True)
class Resources:
    """SLURM resources of one job (each run of an array gets the same).

    A new SLURM flag is one field here (``sbatch("<submitit parameter>")``) and one
    ``add_argument`` in ``launch/submit.py``'s ``build_parser`` whose ``dest`` is the field's
    name: :meth:`from_args` and :meth:`executor_parameters` find it by its metadata.
    """

    nodes: int = sbatch("nodes", 1)
    gpus_per_node: int = sbatch("gpus_per_node", 0, omit=(None, 0))
    cpus_per_task: int | None = sbatch("cpus_per_task")
    mem: str | None = sbatch("mem")
    time_min: int = sbatch("time", 240)
    partition: str | None = sbatch("partition")
    account: str | None = sbatch("account")
    qos: str | None = sbatch("qos")
    constraint: str | None = sbatch("constraint")
    exclude: str | None = sbatch("exclude")
    job_name: str = sbatch("job_name", "masan")
    signal_delay_s: int = sbatch("signal_delay_s", 120)

    def __post_init__(self):
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"--signal-delay {self.signal_delay_s} s is not shorter than --time {self.time_min} "
                             f"min ({self.time_min * 60} s): the stop signal would come before training does; "
                             "lower --signal-delay or raise --time")

    @classmethod
    def from_args(cls, args, **given) -> "Resources":
        """Resources from parsed arguments: every field whose name is an attribute of ``args``
        (``given`` wins, e.g. a GPU count detected with sinfo); ValueError for nonsense."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **given})

    @property
    def tasks_per_node(self) -> int:
        """One rank per GPU; one rank per node on CPU nodes."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def executor_parameters(self) -> dict:
        """``submitit.SlurmExecutor.update_parameters`` keywords of these resources: one per
        field (by its :func:`sbatch` metadata) plus the task layout, one task per rank."""
        params = {f.metadata[SUBMITIT]: getattr(self, f.name) for f in fields(self)
                  if getattr(self, f.name) not in f.metadata["omit"]}
        return {**params, "ntasks_per_node": self.tasks_per_node}


def time_text(minutes: int) -> str:
    """Minutes in --time's D-HH:MM:SS form (what :func:`parse_time_min` reads)."""
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60}:{rest % 60:02d}:00"


def slurm_time(text: str) -> int:
    """argparse type of ``--time``: :func:`parse_time_min`, its message as argparse's error.
    Refuses a limit of 0, which SLURM reads as none: the job is told when to save (USR2,
    --signal-delay before its limit) only when it has one."""
    try:
        if parse_time_s(text) == 0:
            raise ValueError(f"--time {text}: give a limit, e.g. --time {time_text(Resources.time_min)}; SLURM's 0 "
                             "(no limit) is not supported: a run needs its limit to save before it")
        return parse_time_min(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_time_min(text: str) -> int:
    """SLURM time formats -> whole minutes, rounded up (at least 1).

    ``"90"`` (minutes), ``"90:30"`` (min:s), ``"2:00:00"`` (h:min:s), ``"1-12"`` (d-h),
    ``"1-12:30"`` (d-h:min), ``"1-12:30:00"`` (d-h:min:s).
    """
    return max(1, -(-parse_time_s(text) // 60))


def parse_time_s(text: str) -> int:
    """A SLURM time (the formats of :func:`parse_time_min`) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise ValueError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mi, s = (parts + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return seconds


_NEXT_OVERRIDE = re.compile(r"\s+(?=[A-Za-z_][\w.]*=)")
"""Whitespace that starts another ``key=value`` (a value may hold spaces: ``[4, 8]``)."""


def variant_overrides(variant: str) -> list[str]:
    """An --ablation variant's overrides: ``"model.arch=hfcn data.use_fmri=false"`` -> both."""
    return _NEXT_OVERRIDE.split(variant.strip())


def variant_dir_name(variant: str) -> str:
    """``model.fusion=add`` -> ``model.fusion-add`` (safe as one path component)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", variant.replace("=", "-")).strip("-")


DEFAULT_RUN_DIR = RunConfig().run_dir
"""submit.py's run directory when neither --run-dir, a ``run_dir=`` override nor --config names
one: the config's own default, which launch/train_local.py trains in too."""


def run_dir_override(overrides: list[str]) -> str | None:
    """The run directory a ``run_dir=...`` override names (the last one), or None."""
    named = [value for key, sep, value in (o.partition("=") for o in overrides) if sep and key.strip() == "run_dir"]
    return named[-1] if named else None


def base_run_dir(flag: str | None, config: str | None, overrides: list[str]) -> str:
    """The run directory a submission trains in (or under, with repeats and ablations): --run-dir,
    else a ``run_dir=`` override, else the --config file's ``run_dir``, else :data:`DEFAULT_RUN_DIR`.
    launch/train_local.py takes the same override and file key, so both commands train in one place.
    Raises ConfigError when --run-dir and an override name different folders."""
    named = run_dir_override(overrides)
    if flag is not None and named is not None and Path(named).resolve() != Path(flag).resolve():
        raise ConfigError(f"--run-dir {flag} and the override run_dir={named} name different run directories; "
                          "give one of them")
    if flag is not None:
        return flag
    if named is not None:
        return named
    if config is not None:
        load_config(config)  # a missing, invalid or misspelled file is refused by its own message
        in_file = (yaml.safe_load(Path(config).read_text()) or {}).get("run_dir")
        if in_file:
            return str(in_file)
    return DEFAULT_RUN_DIR


def _resolve(run_dir: Path, config: str | None, overrides: list[str], repeat: int | None) -> RunConfig:
    """The run's config: run_dir and the repeat set by the planner, not as overrides (an error
    names only the user's)."""
    cfg = load_config(RunDir(run_dir).start_config(config), overrides)
    cfg.run_dir = str(run_dir)
    if repeat is not None:
        cfg.split.repeat = repeat
    cfg.data.store = os.path.abspath(cfg.data.store)  # the job and later commands may start elsewhere
    return cfg


def plan_runs(run_dir: str | Path, config: str | None, overrides: list[str],
              repeats: int = 1, ablations: list[str] | tuple[str, ...] = (),
              baseline: bool = True) -> list[RunSpec]:
    """Expand a submission into its runs (see the module docstring for the layout)."""
    base = Path(run_dir).resolve()
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    variants = ([BASELINE] if baseline or not ablations else []) + list(ablations)
    specs = []
    for variant in variants:
        extra = [] if variant == BASELINE else variant_overrides(variant)
        for r in range(repeats):
            if not ablations:
                d = base if repeats == 1 else base / f"repeat_{r}"
            else:
                d = base / variant_dir_name(variant) / f"repeat_{r}"
            rep = None if repeats == 1 and not ablations else r
            specs.append(RunSpec(d, variant, r, _resolve(d, config, [*overrides, *extra], rep)))
    return specs
