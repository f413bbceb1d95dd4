"""torch.distributed setup from the standard launcher environment variables.

Contract with launchers (torchrun, accelerate, submitit's ``TorchDistributedEnvironment().export()``,
plain ``srun``): the process group is described by ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Under Slurm without ``RANK`` the task variables
``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` stand in (``MASTER_ADDR``/``MASTER_PORT``
must still be exported by the batch script). No variables, or ``WORLD_SIZE=1``: one process,
no process group. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``device`` is the one it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and metrics."""
        return self.rank == 0


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun-style variables, else Slurm's task variables."""
    if "RANK" in os.environ:
        return (
            _env_int(("RANK",), 0),
            _env_int(("WORLD_SIZE",), 1),
            _env_int(("LOCAL_RANK",), 0),
        )
    return (
        _env_int(("SLURM_PROCID",), 0),
        _env_int(("SLURM_NTASKS",), 1),
        _env_int(("SLURM_LOCALID",), 0),
    )


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistEnv:
    """Join the process group described by the environment (idempotent); return this process's place.

    ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is present, else CPU.
    """
    rank, world_size, local_rank = read_env()
    if rank < 0 or world_size < 1 or rank >= world_size:
        raise ValueError(f"RANK/SLURM_PROCID={rank} is outside WORLD_SIZE/SLURM_NTASKS={world_size}")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"distributed run (world size {world_size}) but {name} is not set in the environment")
        # The Slurm fallback leaves RANK/WORLD_SIZE unset; the env:// rendezvous and wds.split_by_node read them.
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def any_flag(env: DistEnv, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks in one collective, so every rank takes the same branch."""
    if not (env.distributed and dist.is_initialized()):
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_counters(env: DistEnv, counters: Mapping[str, int]) -> Counter:
    """Sum small per-rank count dicts (mixing statistics) over all ranks."""
    if not (env.distributed and dist.is_initialized()):
        return Counter(counters)
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, dict(counters))
    total: Counter = Counter()
    for part in gathered:
        total.update(part)
    return total
