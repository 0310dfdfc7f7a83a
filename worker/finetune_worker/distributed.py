"""This process's place in a torchrun world, and the few collectives the worker itself needs.

transformers' Trainer and accelerate do the distributed training (DDP or FSDP under torchrun,
from the environment torchrun sets). The worker adds only what they leave to it: refusing a
world that does not match the plan, making per-process decisions agree (a SIGTERM or a
time-based checkpoint seen by one rank must become a save on every rank, or the collective
save hangs), choosing one checkpoint to resume for all ranks, and gathering each rank's
measured memory to global rank 0, the only rank that writes outputs and reports.

Every helper here is a no-op in a world of one process, so a single-GPU run is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import InvalidConfigError

if TYPE_CHECKING:
    from finetune_api import TrainingPlan

log = logging.getLogger(__name__)

T = TypeVar("T")

COLLECTIVE_TIMEOUT_ENV = "FINETUNE_WORKER_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """Ranks as torchrun exports them (RANK, LOCAL_RANK, WORLD_SIZE, ...); one process
    without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    under_torchrun: bool = False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> World:
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return cls()
        world_size = int(env["WORLD_SIZE"])
        return cls(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world_size,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
            node_rank=int(env.get("GROUP_RANK", 0)),
            under_torchrun=True,
        )

    @property
    def is_main(self) -> bool:
        """Global rank 0: writes the adapter, checkpoint markers, status and summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"rank {self.rank} (node {self.node_rank}, local rank {self.local_rank}) "
            f"of {self.world_size}"
        )


def check_world(plan: TrainingPlan, world: World) -> None:
    """Refuse to train when the processes that started are not the ones the plan is for.

    A plan for several processes run as one would train with a fraction of the planned batch
    (and, under FSDP, a base that does not fit) while looking successful; the reverse trains
    a batch several times larger. Both are configuration errors, exit code 10.
    """
    how = (
        "one process without torchrun"
        if not world.under_torchrun
        else f"{world.world_size} processes under torchrun (WORLD_SIZE={world.world_size})"
    )
    if plan.world_size != plan.nodes * plan.processes_per_node:
        raise InvalidConfigError(
            f"plan.worldSize is {plan.world_size} but plan.nodes x plan.processesPerNode is "
            f"{plan.nodes} x {plan.processes_per_node}; the operator's plan is inconsistent"
        )
    if plan.world_size != world.world_size:
        launch = (
            f"finetune-worker launch --nnodes {plan.nodes} --nproc-per-node "
            f"{plan.processes_per_node} -- train --config ..."
        )
        raise InvalidConfigError(
            f"plan.worldSize is {plan.world_size} (strategy {plan.strategy!r}) but the worker "
            f"runs as {how}; start it with `{launch}` as the operator does, or re-plan the job"
        )
    if world.under_torchrun and world.local_world_size != plan.processes_per_node:
        raise InvalidConfigError(
            f"plan.processesPerNode is {plan.processes_per_node} but torchrun started "
            f"{world.local_world_size} processes on this node (LOCAL_WORLD_SIZE)"
        )


def collective_timeout_seconds() -> int:
    """How long a collective may wait for a peer before the rank fails (a dead or hung peer
    must end the job, not hold its GPUs forever). FINETUNE_WORKER_COLLECTIVE_TIMEOUT_SECONDS."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, str(DEFAULT_COLLECTIVE_TIMEOUT_S))
    try:
        seconds = int(raw)
    except ValueError:
        raise InvalidConfigError(
            f"{COLLECTIVE_TIMEOUT_ENV} is {raw!r}; expected whole seconds"
        ) from None
    if seconds < 1:
        raise InvalidConfigError(f"{COLLECTIVE_TIMEOUT_ENV} is {seconds}; expected >= 1")
    return seconds


def process_device(device: str, world: World) -> str:
    """Where this process trains: its own GPU (cuda:LOCAL_RANK), one GPU per process."""
    if device != "cuda":
        return device
    import torch

    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tensor_device():
    import torch
    import torch.distributed as dist

    # NCCL reduces only tensors on the process's GPU; gloo only CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any (one all_reduce MAX for all)."""
    if not _active():
        return tuple(flags)
    import torch
    import torch.distributed as dist

    values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_tensor_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Destroy the process group before the interpreter exits. Left to the exit, gloo's
    threads can be torn down while a peer is still finishing and abort the process
    ("terminate called without an active exception", exit -6): a rank that had checkpointed
    on SIGTERM then exits as a crash instead of 143, which the Job counts as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decided_by_main(decide: Callable[[], T], world: World) -> T:
    """`decide()` on global rank 0, the same value on every rank."""
    if not _active():
        return decide()
    import torch.distributed as dist

    box: list[Any] = [decide() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: T) -> list[T]:
    """Every rank's `value`, by global rank."""
    if not _active():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
