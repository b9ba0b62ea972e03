"""Data-parallel training across processes (``torchrun``), one GPU (or CPU process) per rank.

``carmodels train --nproc-per-node N`` re-launches itself through ``python -m
torch.distributed.run``; every process then calls :func:`carmodels.train.train`, which asks
:func:`init_from_env` whether it runs under torchrun. Each rank trains on its own part of the
training images (``carmodels.train.data``), G and D are wrapped in ``DistributedDataParallel``
(gradients are averaged, so the ranks stay in step), and only rank 0 writes checkpoints,
samples, history and TensorBoard events.

One machine uses torchrun's ``--standalone`` rendezvous. Several machines (``--nnodes``) meet
through a c10d rendezvous at ``--rdzv-endpoint HOST:PORT``: the same command runs on every
node, the torchrun agent on the endpoint's host serves the rendezvous store, and the nodes'
ranks are assigned as they join (torchrun's ``--node-rank`` applies to its static rendezvous
only). Which node gets which ranks does not matter: each rank's data and noise follow from
its rank alone. So on CPUs (gloo, the same thread count per process) two nodes of one rank
train bit-identically to one node of two ranks (tests/test_train_ddp.py); NCCL picks its
reduction order by topology, so on GPUs the results agree to rounding.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from carmodels.errors import InputError


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

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' ``value`` (``device``: this rank's, as NCCL needs)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

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
        _import_before_init_process_group()
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return context


def _import_before_init_process_group() -> None:
    """Import ``torch.distributed.nn.functional`` while there is no process group yet.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated once, at import,
    and ``DistributedDataParallel`` imports it on first use. Imported after
    ``init_process_group``, ten defaults hold the group for good (torch 2.14): no
    ``destroy_process_group`` frees it, and gloo's threads run on into the interpreter's
    shutdown. A gloo worker that then drops a finished collective's tensor must take the GIL
    to free it, and the process aborts ("terminate called without an active exception", as
    rank 1 of a two-rank test did once in CI). Imported first, the defaults hold ``None``.
    """
    import torch.distributed.nn.functional  # noqa: F401


def no_buffer_sync_each_forward() -> dict[str, bool]:
    """``DistributedDataParallel`` keywords that stop it broadcasting buffers before every
    forward: ``forward_sync_buffers=False`` where torch has it (2.14), else the older
    ``broadcast_buffers=False`` (torch 2.11 on the lent GPU machines), which 2.14 deprecates
    with a warning on every rank. The new keyword still syncs buffers once, at wrapping; the
    ranks' models are built from one seed, so their buffers are equal then anyway."""
    from torch.nn.parallel import DistributedDataParallel

    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def device_for_rank(device: torch.device, context: DistContext) -> torch.device:
    """Each rank gets its own GPU (``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def shutdown(context: DistContext) -> None:
    """Destroy the process group. Its threads stop once nothing else holds it: release the
    ``DistributedDataParallel`` wrappers before the interpreter exits (``train`` returns)."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


#: The c10d rendezvous id when none is given: the nodes of one job must agree on it, and one
#: endpoint serves one job at a time.
DEFAULT_RDZV_ID = "carmodels-train"


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node job meet: torchrun's c10d rendezvous."""

    #: ``HOST:PORT`` of the node that serves the rendezvous store; every node must reach it.
    endpoint: str
    #: Nodes in the job; torchrun waits for all of them.
    nnodes: int
    run_id: str = DEFAULT_RDZV_ID
    #: This node's address as the other nodes reach it, when its hostname does not resolve
    #: there (torchrun's default is the machine's FQDN).
    local_addr: str | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise InputError(f"--nnodes must be >= 1, got {self.nnodes}.")
        host, colon, port = self.endpoint.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(
                f"--rdzv-endpoint {self.endpoint!r} is not HOST:PORT; pass the address and a "
                "free port of the first node, e.g. --rdzv-endpoint node0.example:29400."
            )
        if not self.run_id:
            raise InputError("--rdzv-id is empty; pass the same id on every node, or leave it out.")

    def torchrun_args(self) -> list[str]:
        args = [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
        ]
        if self.local_addr:
            args.append(f"--local-addr={self.local_addr}")
        return args


def rendezvous_from_flags(
    nnodes: int | None,
    rdzv_endpoint: str | None,
    rdzv_id: str | None,
    local_addr: str | None,
) -> Rendezvous | None:
    """The rendezvous the command line's multi-node flags ask for, None for one machine.

    Raises InputError, naming the flag and the fix, for a combination that cannot work."""
    if rdzv_endpoint is None:
        if nnodes is not None and nnodes > 1:
            raise InputError(
                f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address of a node every "
                "node can reach and a free port there (the same on every node), e.g. "
                "--rdzv-endpoint node0.example:29400."
            )
        if nnodes is not None and nnodes < 1:
            raise InputError(f"--nnodes must be >= 1, got {nnodes}.")
        for flag, value in (("--rdzv-id", rdzv_id), ("--local-addr", local_addr)):
            if value is not None:
                raise InputError(
                    f"{flag} applies to a multi-node job only: add --nnodes N and "
                    "--rdzv-endpoint HOST:PORT, or leave it out."
                )
        return None
    return Rendezvous(
        endpoint=rdzv_endpoint,
        nnodes=1 if nnodes is None else nnodes,
        run_id=DEFAULT_RDZV_ID if rdzv_id is None else rdzv_id,
        local_addr=local_addr,
    )


def torchrun_command(
    nproc_per_node: int, module_args: Sequence[str], rendezvous: Rendezvous | None = None
) -> list[str]:
    """The command that runs ``python -m carmodels.cli <module_args>`` on N ranks of this
    machine: alone (``--standalone``), or as one node of a multi-node job."""
    if nproc_per_node < 1:
        raise InputError(f"--nproc-per-node must be >= 1, got {nproc_per_node}.")
    meet = ["--standalone"] if rendezvous is None else rendezvous.torchrun_args()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *meet,
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "carmodels.cli",
        *module_args,
    ]


def launch(
    nproc_per_node: int, module_args: Sequence[str], rendezvous: Rendezvous | None = None
) -> int:
    """Run the CLI under torchrun and return its exit code (the ranks' output streams through)."""
    return subprocess.call(torchrun_command(nproc_per_node, module_args, rendezvous))
