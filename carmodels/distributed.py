"""Data-parallel training across processes (``torchrun``), one GPU (or CPU process) per rank.

``carmodels train --nproc-per-node N`` re-launches itself through ``python -m
torch.distributed.run``; every process then calls :func:`carmodels.train.train`, which asks
:func:`init_from_env` whether it runs under torchrun. Each rank keeps its own slice of the
training images on its device, G and D are wrapped in ``DistributedDataParallel`` (gradients
are averaged, so the ranks stay in step), and only rank 0 writes checkpoints, samples,
history and TensorBoard events.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``world_size == 1`` means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a tensor over the ranks in place (no-op when not distributed)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor


SINGLE_PROCESS = DistContext()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_from_env(device_type: str) -> DistContext:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), else run alone."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return SINGLE_PROCESS
    context = DistContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
    )
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return context


def device_for_rank(device: torch.device, context: DistContext) -> torch.device:
    """Each rank gets its own GPU (``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc_per_node: int, module_args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m carmodels.cli <module_args>`` on N local ranks."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "carmodels.cli",
        *module_args,
    ]


def launch(nproc_per_node: int, module_args: Sequence[str]) -> int:
    """Run the CLI under torchrun and return its exit code (the ranks' output streams through)."""
    return subprocess.call(torchrun_command(nproc_per_node, module_args))
