"""The tensor-parallel process group: joining it, the process-wide handle, launching ranks.

Why process-wide: a process serves one model in one group (as in Megatron or vLLM), and the
sampler, which sees logits but never the model, must know which vocabulary shard it holds.
Outside a group `current()` is None and nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.parallel.ranks import free_port


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its group, and the vocabulary shard its logits hold."""

    group: dist.ProcessGroup
    rank: int
    size: int
    vocab_start: int = 0  # the global token id of the local logits' first column
    vocab_stop: int = 0

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM):
        """Sum (or `op`) over the ranks, in place; every rank gets the same bits (the
        reduction's result is broadcast), so they stay in lockstep."""
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's x, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts)

    def broadcast(self, objects: list[Any]) -> list[Any]:
        """Rank 0's picklable `objects` on every rank (a list of the same length everywhere)."""
        dist.broadcast_object_list(objects, src=0, group=self.group)
        return objects


_CURRENT: TensorParallel | None = None


def current() -> TensorParallel | None:
    """The group this process's model is sharded over, or None (a single process)."""
    return _CURRENT


def set_current(tp: TensorParallel | None) -> None:
    global _CURRENT
    _CURRENT = tp


def join(size: int) -> TensorParallel:
    """This process's handle in the default torch.distributed group, which must have `size`
    ranks (init_process_group, torchrun, or `launch`)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"tensor_parallel_size={size} needs torch.distributed initialised with {size} ranks "
            "in every process: start them with workers.parallel.group.launch, torchrun, or "
            "call torch.distributed.init_process_group first"
        )
    if dist.get_world_size() != size:
        raise RuntimeError(
            f"tensor_parallel_size={size} but torch.distributed has {dist.get_world_size()} "
            "ranks: make them equal"
        )
    group = dist.group.WORLD
    assert group is not None
    return TensorParallel(group, dist.get_rank(), size)


# A serving group's followers wait for rank 0 inside a collective between requests (an idle
# rank 0 sends a keepalive every few seconds, see workers.parallel.spmd), and the first forward
# of a large model can be slow: the timeout only has to catch a rank that hangs for good.
SERVING_TIMEOUT = timedelta(hours=24)


def init_group(
    rank: int,
    size: int,
    master_addr: str,
    master_port: int,
    backend: str,
    timeout: timedelta = SERVING_TIMEOUT,
) -> None:
    """Join (rank 0: host) the default process group of `size` ranks at master_addr:port."""
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    dist.init_process_group(
        backend,
        init_method=f"tcp://{host}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=timeout,
    )


def gather_names(name: str) -> list[str]:
    """Every rank's `name` (its device, say), in rank order, on every rank."""
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return [str(n) for n in names]


def _rank_main(
    rank: int, size: int, port: int, backend: str, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    try:
        fn(rank, size, *args)
    finally:
        set_current(None)
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], size: int, *args: Any, backend: str = "gloo") -> None:
    """Run fn(rank, size, *args) in `size` fresh processes joined in one group on this machine
    (tcp on 127.0.0.1); returns when all have ended, raising if any failed. `fn` must be
    importable (a module-level function)."""
    mp.start_processes(
        _rank_main,
        args=(size, free_port(), backend, fn, args),
        nprocs=size,
        join=True,
        start_method="spawn",
    )
