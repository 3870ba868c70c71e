"""One training run over several processes (DDP through ``accelerate launch`` or ``torchrun``): which process this
is, its device, and the few collective operations the rest of retain needs. In one process every function here is
a no-op or returns the trivial answer, so nothing single-process changes.

How a run splits (see ``retain.train.Trainer``): every rank builds the same optimizer step — the objective's
micro-batches are seeded by (seed, step), and GRPO's rollout batch is gathered from all ranks — then each rank
trains on its contiguous share of the micro-batches with the loss × world size, so DDP's gradient *average* is the
gradient *sum* over all micro-batches: exactly the 1-process step on the same global batch (up to float summation
order). Only the main process writes files.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch

T = TypeVar("T")


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in this run: the process group's size once it exists, else what the launcher set (WORLD_SIZE)."""
    if initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def train_device(device: str = "auto") -> torch.device:
    """Where a process trains: the CPU when asked (``device: cpu``, ``accelerate launch --cpu``) or without CUDA;
    else this process's GPU (``cuda:LOCAL_RANK`` under a multi-process launcher, plain ``cuda`` in one process)."""
    from retain.errors import RetainError

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if device == "cuda" and not torch.cuda.is_available():
        raise RetainError("device: cuda was asked for but torch sees no CUDA device")
    if device == "cpu" or use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    if world_size() > 1 or "LOCAL_RANK" in os.environ:
        return torch.device("cuda", local_rank())
    return torch.device("cuda")


def make_accelerator(device: str = "auto", mixed_precision: str = "no", find_unused_parameters: bool = False) -> Any:
    """The Trainer's Accelerator for a config's ``device`` and ``mixed_precision`` (``None``: the Trainer's default,
    which also takes ``accelerate launch --mixed_precision`` from the environment). ``mixed_precision: bf16`` keeps
    fp32 weights and optimizer state and runs the forward under bf16 autocast. ``find_unused_parameters``: DDP
    looks for parameters a forward leaves without a gradient (a model that has some fails DDP's second step
    without it)."""
    if device == "auto" and mixed_precision == "no" and not find_unused_parameters:
        return None
    from accelerate import Accelerator, DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None
    return Accelerator(
        cpu=train_device(device).type == "cpu", mixed_precision=None if mixed_precision == "no" else mixed_precision,
        kwargs_handlers=handlers,
    )


def init(device: str = "auto") -> None:
    """Start the process group now (accelerate's PartialState, as the Trainer's Accelerator would) when launched
    with several processes, so the runner can synchronise before any training."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not initialized():
        from accelerate import PartialState

        PartialState(cpu=train_device(device).type == "cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if initialized() and world_size() > 1:
        torch.distributed.barrier()


def shard(items: Sequence[T], index: int, parts: int) -> list[T]:
    """The ``index``-th of ``parts`` contiguous, near-equal slices of ``items`` (earlier slices one longer)."""
    n = len(items)
    start = index * (n // parts) + min(index, n % parts)
    return list(items[start : start + n // parts + (1 if index < n % parts else 0)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects); ``[obj]`` in one process."""
    if not initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
