"""torch.distributed for one training run: environment, backend, device.

Every launcher (``launch/train_local.py``, submitit tasks on SLURM, ``torchrun``) exports
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``LOCAL_RANK``; a process
started without them is a world of one, and gets those variables filled in here (with a free
local port) because DeepSpeed otherwise tries MPI discovery. The backend is ``nccl`` on CUDA
and ``gloo`` on the CPU, where DeepSpeed must use its CPU accelerator: ``DS_ACCELERATOR=cpu``
is set before DeepSpeed is first imported (its accelerator is chosen once, at import).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from masan.config import TrainConfig

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_filled_env: list[str] = []  # variables this module set for a world of one (removed at shutdown)


class DistributedError(RuntimeError):
    """The distributed environment is inconsistent; the message says what to set."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """True when TCP ``port`` cannot be bound on every interface now, as the rendezvous server
    (rank 0's TCPStore) will bind it: another program or run listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def pick_device(train_cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """``cuda:LOCAL_RANK`` or ``cpu`` following ``train.device`` (auto: CUDA when visible)."""
    want = train_cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def select_accelerator(device: torch.device) -> None:
    """Tell DeepSpeed which accelerator to use; must run before ``import deepspeed``."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


def init_distributed(train_cfg: TrainConfig) -> DistInfo:
    """Initialise the default process group from the environment (world of one when absent).

    Idempotent: a second call returns the existing group's info.
    """
    present = [v for v in ENV_VARS if v in os.environ]
    if present and len(present) != len(ENV_VARS):
        missing = sorted(set(ENV_VARS) - set(present))
        raise DistributedError(
            f"distributed environment incomplete: {', '.join(missing)} not set (have {', '.join(present)}); "
            "set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK or none of them")
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        _filled_env[:] = ENV_VARS
    rank, world, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = pick_device(train_cfg, local_rank)
    select_accelerator(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=train_cfg.dist_timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when ``flag`` is True on at least one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Collective: each value averaged over the ranks (same keys, same order on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a picklable value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """One picklable value per rank, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Destroy the process group (lets the next run in this process start clean)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for var in _filled_env:
        os.environ.pop(var, None)
    _filled_env.clear()
