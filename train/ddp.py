"""Data-parallel pretraining under torchrun.

When the environment names more than one process (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR/PORT, as torchrun sets them), every process joins a ``torch.distributed`` group
(``pretrain.backend``: auto = nccl on CUDA, gloo on the CPU), takes its slice of every batch
(global batch b is the same ``batch_size`` frames for any process count; rank r reads B / W of
them) and runs the method's loss inside DistributedDataParallel, which averages the gradients
over the ranks before clipping and the optimiser step, so every rank holds the same weights.
Rank 0 alone takes the run's lock and writes the run folder; every rank resumes from the same
checkpoint. MinkowskiEngine's batch norm is not synchronised: each rank normalises with the
statistics of its own frames, and the running statistics saved are rank 0's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from lift3d.core.device import resolve_device

log = logging.getLogger("lift3d")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the data-parallel group (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def dist_backend(cfg: dict) -> str:
    """``pretrain.backend``: auto = nccl when the trainer runs on CUDA, gloo otherwise."""
    b = cfg["pretrain"].get("backend", "auto") or "auto"
    if b == "auto":
        return "nccl" if resolve_device(cfg["pretrain"].get("device"), "pretrain.device").type == "cuda" else "gloo"
    return str(b)


def init_distributed(cfg: dict) -> bool:
    """Join the process group that torchrun's environment describes (WORLD_SIZE > 1); True when
    this call created it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return False
    backend = dist_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend=backend)
    info = dist_info()
    log.info("pretrain: rank %d of %d (backend %s, local rank %d)", info.rank, info.world, backend, info.local_rank)
    return True


class LossModule(torch.nn.Module):
    """A model's loss as a module's forward, so that DistributedDataParallel sees the forward
    pass (its gradient all-reduce hooks are armed there): ``loss_fn(model, *args)``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args) -> torch.Tensor:
        return self.loss_fn(self.model, *args)


def wrap_ddp(model: torch.nn.Module, loss_fn: Callable) -> DistributedDataParallel:
    """DistributedDataParallel around ``loss_fn(model, ...)``: gradients are averaged over the ranks
    in backward; rank 0's weights and buffers are broadcast at construction. Inputs are not moved
    by DDP (device_ids None): the loss moves what it needs."""
    return DistributedDataParallel(LossModule(model, loss_fn), device_ids=None, find_unused_parameters=False)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        tdist.barrier()


def mean_over_ranks(x: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    x = x.detach().float().reshape(1).clone()
    if info.world > 1:
        if tdist.get_backend() == "nccl":
            x = x.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(x)
        x = x / info.world
    return float(x.cpu()[0])


def rank0_decides(info: DistInfo, fn):
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
    if info.world == 1:
        return fn()
    box = [None]
    if info.main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank raises it
            box[0] = ("error", exc)
    tdist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
