"""What one submission trains: run directories x resolved configs, and SLURM resources.

``--repeats N`` and ``--ablation key=value`` expand into one run per (variant, repeat):

    run_dir/                       one run (no ablation, one repeat)
    run_dir/repeat_R/              --repeats N
    run_dir/<variant>/repeat_R/    --ablation ... (variant ``baseline`` plus one per ablation)

Repeat R sets ``split.repeat=R`` (a different stratified split; nothing else changes). A run
directory that already holds a ``config.yaml`` (written by run_training at every start) is
resumed with that config unless ``--config`` is given, so resubmitting needs no flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from masan.config import RunConfig, load_config

BASELINE = "baseline"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a submission."""

    run_dir: Path
    variant: str
    """``baseline`` or the ablation override, e.g. ``model.fusion=add``."""
    repeat: int
    cfg: RunConfig


@dataclass(frozen=True)
class Resources:
    """SLURM resources of one job (each run of an array gets the same)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str = "masan"
    signal_delay_s: int = 120

    @property
    def tasks_per_node(self) -> int:
        """One rank per GPU; one rank per node on CPU nodes."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time_min(text: str) -> int:
    """SLURM time formats -> whole minutes, rounded up.

    ``"90"`` (minutes), ``"90:30"`` (min:s), ``"2:00:00"`` (h:min:s), ``"1-12"`` (d-h),
    ``"1-12:30"`` (d-h:min), ``"1-12:30:00"`` (d-h:min:s).
    """
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
    return max(1, -(-seconds // 60))


def variant_dir_name(variant: str) -> str:
    """``model.fusion=add`` -> ``model.fusion-add`` (safe as one path component)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", variant.replace("=", "-")).strip("-")


def _resolve(run_dir: Path, config: str | None, overrides: list[str]) -> RunConfig:
    source = config
    if source is None and (run_dir / CONFIG_FILE).is_file():
        source = str(run_dir / CONFIG_FILE)
    return load_config(source, [*overrides, f"run_dir={run_dir}"])


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
        extra = [] if variant == BASELINE else [variant]
        for r in range(repeats):
            if not ablations:
                d = base if repeats == 1 else base / f"repeat_{r}"
            else:
                d = base / variant_dir_name(variant) / f"repeat_{r}"
            rep = [] if repeats == 1 and not ablations else [f"split.repeat={r}"]
            specs.append(RunSpec(d, variant, r, _resolve(d, config, [*overrides, *extra, *rep])))
    return specs
