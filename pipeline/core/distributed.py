"""torch.distributed set-up shared by the stages: one code path for 1 or N processes.

A plain ``python -m stages.pretrain`` is a world of one. Under ``torchrun`` the
environment names the rank and world size; the backend is NCCL on CUDA and
gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.core.config import ParamsError

TIMEOUT_ENV = "ATTMASK_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 10.0


def collective_timeout() -> datetime.timedelta:
    """How long a collective (and the rendezvous) waits for the other ranks before failing.

    A dead or stuck rank must turn into an error on the others, not a hang: a
    dead gloo peer fails the next collective at once (connection reset), a
    stuck one after this timeout. ``ATTMASK_DIST_TIMEOUT_MIN`` (minutes, read
    when the group is created) overrides the default of 10 minutes.
    """
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_as_main_rank() -> bool:
    """True unless torchrun started this process as a rank other than 0 (read before init)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str, local_rank: int = 0, key: str = "pretrain.device") -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU is an error naming ``key``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(key, "cuda requested but torch sees no CUDA device; use auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun, else return a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=collective_timeout())
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join_job(device_name: str, key: str) -> tuple[torch.device, DistContext]:
    """A stage's device (this rank's GPU under torchrun) and its place in the job.

    ``device_name`` is the stage's ``device`` param (auto | cpu | cuda) and
    ``key`` names it in errors. A CUDA device is made current before the
    process group starts: NCCL's collectives use the current device.
    """
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")), key=key)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, init_distributed(device)


def gather_rows(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order."""
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum over ranks (in place, returned for chaining); identity for a world of one."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
