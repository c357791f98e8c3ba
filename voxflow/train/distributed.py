"""DDP plumbing: process-group set-up for ``--nproc N`` (``torch.multiprocessing.spawn``) and torchrun.

* ``voxflow train ... --nproc N`` spawns N local processes that rendezvous on a free localhost port.
* ``torchrun --nproc-per-node N -m voxflow.train WORK -c CFG -f 0`` (and multi-node runs with
  torchrun's usual ``--nnodes``, ``--node-rank``, ``--rdzv-backend c10d --rdzv-endpoint host:port``)
  is detected with ``torch.distributed.is_torchelastic_launched()``; the group then uses ``env://``.

The backend is NCCL when the device is CUDA and gloo otherwise; rank ``r`` uses ``cuda:<local rank>``.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from voxflow.errors import VoxflowError

__all__ = [
    "MAIN_FIRST_TIMEOUT",
    "DistInfo",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "cleanup",
    "free_port",
    "main_first",
    "setup_process_group",
]

T = TypeVar("T")
#: how long the other ranks wait for rank 0 in :func:`main_first` (the process group's own timeout is 30 min)
MAIN_FIRST_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, and its torch device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device_for(device: str, local_rank: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank)
    return dev


def setup_process_group(device: str, *, rank: int = 0, world_size: int = 1, port: int | None = None) -> DistInfo:
    """Join (or create) the process group; single-process runs create none."""
    if dist.is_torchelastic_launched():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun, documented above
        dev = _device_for(device, local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
        return DistInfo(dist.get_rank(), dist.get_world_size(), dev)
    dev = _device_for(device, rank)
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return DistInfo(rank, world_size, dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks (in place; identity in a single process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective under DDP)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def main_first(
    info: DistInfo, fn: Callable[[], T], *, what: str, timeout: datetime.timedelta = MAIN_FIRST_TIMEOUT
) -> T | None:
    """Run ``fn`` on rank 0 only while the other ranks wait; its result on rank 0, None elsewhere.

    For work with one writer (e.g. preparing files every rank then reads). The ranks meet in an
    all-reduce on a gloo group of their own whose timeout is ``timeout``: the default group's 30
    minutes may be shorter than the work, and gloo also runs beside NCCL (CPU tensors). An exception
    on rank 0 is re-raised there, and the other ranks stop with a :class:`VoxflowError` naming
    ``what``; a rank 0 that dies breaks the group's connections, which ends their wait too.
    """
    if not info.distributed:
        return fn()
    group = dist.new_group(backend="gloo", timeout=timeout)
    result: T | None = None
    error: BaseException | None = None
    try:
        if info.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
                error = e
        failed = torch.tensor([0.0 if error is None else 1.0])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise VoxflowError(f"rank 0 failed while {what}; its error message (in its log) says what to fix.")
    return result


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
