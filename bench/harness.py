"""What the model benches share (bench/model.py, bench/gpu_check.py, bench/profile_step.py):
the command line of a device bench, one synthetic batch, one timer of a training step, and the
guarded, budgeted rows of a table printed a line at a time.

Run the benches from the repository root as modules (``python -m bench.gpu_check``), so that
``bench`` and ``masan`` import with the repository as the only path entry.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from masan.argtypes import number, torch_device
from masan.config import LossConfig, ModelConfig, RunConfig
from masan.host import rss_bytes
from masan.model import FastPaths, build_model, compile_modality_modules, masan_loss
from masan.model.inputs import PRECISION_DTYPES
from masan.train.logging import peak_memory

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "hpc/configs/paper.yaml"


def section_names(*known: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated section names, each one of ``known`` (a misspelt name
    would skip its section and spend a GPU call measuring nothing)."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or text!r}; choose from {','.join(known)}")
        return names
    return parse


def config_overrides(path: Path) -> list[str]:
    """A config file as ``section.key=value`` overrides (applied on top of ``--config``)."""
    return [f"{section}.{key}={json.dumps(value)}" for section, keys in yaml.safe_load(path.read_text()).items()
            for key, value in keys.items()]


TINY = config_overrides(REPO / "hpc/configs/tiny.yaml")
"""CPU-sized model and data with every structural feature of the paper's (the tests' tiny config)."""
COLUMNS = (("section", 10), ("variant", 34), ("ms/sample", 10), ("peak GiB", 9), ("GiB/sample", 10), ("note", 0))


# --------------------------------------------------------------------------- one training step


def synthetic_batch(m: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype, num_classes: int,
                    channels_last: bool = False) -> dict[str, torch.Tensor]:
    """``batch`` full-size random samples of model config ``m`` on ``device``: ``label (B,)`` int64
    (``i % num_classes``), and for the modalities the model uses ``t1 (B, 1, *t1_shape)`` and
    ``fmri (B, T, *fmri_shape)`` in ``dtype`` (with ``channels_last``: channels_last_3d)."""
    data = {"label": torch.arange(batch, device=device) % num_classes}
    if m.arch == "hfcn" or m.modalities != "fmri":
        data["t1"] = torch.randn(batch, 1, *m.t1_shape, device=device, dtype=dtype)
    if m.arch == "masan" and m.modalities != "t1":
        data["fmri"] = torch.randn(batch, m.fmri_frames, *m.fmri_shape, device=device, dtype=dtype)
    if channels_last:
        data = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.dim() == 5 else v for k, v in data.items()}
    return data


@dataclass(frozen=True)
class StepCost:
    """What :func:`time_training_step` measured."""

    ms_per_sample: float
    peak_gib: float
    """Peak memory during the timed steps: max allocated on CUDA, the process's peak resident set on the CPU."""
    start_gib: float
    """Memory held when the timed steps began (allocated / resident set; no gradients)."""

    @property
    def step_gib(self) -> float:
        """What the steps added on top of what they started with (activations, gradients, ...)."""
        return max(self.peak_gib - self.start_gib, 0.0)


def _held_gib(device: torch.device) -> float:
    return (torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()) / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(model: torch.nn.Module, data: dict[str, torch.Tensor], loss_cfg: LossConfig,
                       device: torch.device, warmup: int, steps: int, optimizer: torch.optim.Optimizer | None = None,
                       autocast: torch.dtype | None = None) -> StepCost:
    """Wall time and memory of one training step on ``data``: forward, loss (eq. 8, joint phase),
    backward, and ``optimizer``'s step where given. The model computes in its parameters' dtype
    (as DeepSpeed's bf16 mode runs it), under autocast to ``autocast`` where given (fp32
    parameters, as torch.amp runs them). ``warmup`` untimed steps, then ``steps`` timed ones."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            out = model(t1=data.get("t1"), fmri=data.get("fmri"))
            loss = masan_loss(out, data, loss_cfg, "joint")["total"]
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    for _ in range(warmup):
        step()
    model.zero_grad(set_to_none=True)
    sync(device)
    start = _held_gib(device)
    peak_memory(device)  # reset the peaks
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t) / steps
    mem = peak_memory(device)
    batch = len(data["label"])
    return StepCost(1e3 * seconds / batch, mem.get("gpu_mem_gib", mem["peak_rss_gib"]), start)


@dataclass(frozen=True)
class Row:
    """One model measurement: architecture, micro-batch, checkpointing, channels_last, torch.compile."""

    arch: str
    batch: int
    ckpt: bool = False
    channels_last: bool = False
    compiled: bool = False

    @property
    def name(self) -> str:
        flags = [f"mb{self.batch}", "ckpt" if self.ckpt else "no-ckpt"]
        flags += ["channels_last"] if self.channels_last else []
        flags += ["compile"] if self.compiled else []
        return " ".join(flags)


def measure_model(cfg: RunConfig, row: Row, device: torch.device, dtype: torch.dtype, warmup: int, steps: int,
                  compile_backend: str, num_classes: int = 2, fast_paths: FastPaths | None = None) -> StepCost:
    """:func:`time_training_step` with an Adam step of the model of ``cfg`` set as ``row`` says
    (``cfg.model`` is changed), its weights and inputs in ``dtype`` (:func:`synthetic_batch`),
    its blocks on ``fast_paths`` (None: the device's defaults)."""
    m = cfg.model
    m.arch, m.activation_checkpointing, m.channels_last = row.arch, row.ckpt, row.channels_last
    torch.manual_seed(0)
    model = build_model(m, num_classes, fast_paths).to(device=device, dtype=dtype).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if row.compiled:  # as training compiles it (model.compile)
        compile_modality_modules(model, compile_backend, m.compile_mode)
    data = synthetic_batch(m, row.batch, device, dtype, num_classes, row.channels_last)
    return time_training_step(model, data, cfg.loss, device, warmup, steps, opt)  # the caller frees the model


# --------------------------------------------------------------------------- the table


class Budget:
    """The global time budget: ``left()`` seconds remain; ``alarm()`` interrupts a row that overruns."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        signal.signal(signal.SIGALRM, _on_alarm)

    def left(self) -> float:
        return self.end - time.monotonic()

    def alarm(self) -> None:
        signal.alarm(max(1, int(self.left())))


class OutOfTime(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise OutOfTime("the check's time budget ran out during this row")


def emit(*cells) -> None:
    """One table line (:data:`COLUMNS`), flushed at once (a killed check still leaves what it measured)."""
    line = "  ".join(f"{str(c):<{w}}" if w else str(c) for c, (_, w) in zip(cells, COLUMNS))
    print(line.rstrip(), flush=True)


def note(section: str, variant: str, text: str) -> None:
    emit(section, variant, "-", "-", "-", text)


def emit_cost(section: str, variant: str, cost: StepCost, batch: int, extra: str = "") -> None:
    """A model row: ms per sample, peak GiB, peak GiB per sample, ``extra``."""
    emit(section, variant, f"{cost.ms_per_sample:.1f}", f"{cost.peak_gib:.2f}", f"{cost.peak_gib / batch:.2f}", extra)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(section: str, name: str, budget: Budget, min_left: float, device: torch.device,
            fn: Callable[[], None], compiled: bool = False) -> None:
    """One row: ``fn()`` (which emits it) under the budget's alarm. A spent budget or a failure
    becomes one noted row (a failure's traceback after it), so no row ends the check; then the
    device memory ``fn`` held is freed, and with ``compiled`` dynamo's compiled graphs too."""
    if budget.left() < min_left:
        note(section, name, f"skipped: {budget.left():.0f} s left of the budget")
        return
    try:
        budget.alarm()
        fn()
    except torch.cuda.OutOfMemoryError:
        note(section, name, "out of memory")
    except Exception as e:  # noqa: BLE001 - one failing row must not end the check
        note(section, name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        traceback.print_exc()
    finally:
        signal.alarm(0)
        _free(device)  # the model and optimiser went with fn's frame
        if compiled:
            torch._dynamo.reset()


# --------------------------------------------------------------------------- the command line


def device_parser(doc: str, budget_s: float) -> argparse.ArgumentParser:
    """The arguments every device bench shares (bench/gpu_check.py, bench/profile_step.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized shapes (and --device cpu unless given)")
    ap.add_argument("--device", type=torch_device, default=None,
                    help="cpu, cuda or cuda:N (default: cuda when visible)")
    ap.add_argument("--config", type=Path, default=PAPER, help="model/loss/data settings (default paper.yaml)")
    ap.add_argument("--precision", choices=sorted(PRECISION_DTYPES), default=None,
                    help="default bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--budget-s", type=number(float, above=0), default=budget_s,
                    help=f"global time budget (default {budget_s:.0f} s)")
    ap.add_argument("--warmup", type=number(int, 0), default=2)
    ap.add_argument("--steps", type=number(int, 1), default=3, help="timed steps per model row")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (--tiny: eager)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides for every section, e.g. model.compile=true (repeatable)")
    return ap


def resolve_device(args: argparse.Namespace) -> None:
    """``args.device`` (a torch.device: cuda when visible unless --tiny) and ``args.precision``."""
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    if args.tiny and args.compile_backend == "inductor":  # the same code paths, no inductor build
        args.compile_backend = "eager"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
