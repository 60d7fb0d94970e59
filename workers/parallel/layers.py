"""The tensor-parallel layers: each holds its rank's slice of a full layer's weight.

A column-parallel linear is a plain nn.Linear over some output features (no communication);
a row-parallel linear takes the matching input features and sums the ranks' partial outputs;
the vocabulary-parallel embedding looks up the ids in its rank's rows (zero elsewhere) and sums.
The LM head is a column-parallel linear over the vocabulary whose logits stay sharded: the
sampler merges per-shard results (workers/sampling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.parallel.group import TensorParallel


def split(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous part [lo, hi) of range(n) in `size` near-equal parts (the first
    n % size parts one longer)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def column_linear(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """The output features `rows` (indices) of `linear`, as an nn.Linear of its own."""
    out = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out.requires_grad_(False)


class RowParallelLinear(nn.Module):
    """The input features `columns` of a full linear; forward sums the ranks' partial products,
    then adds the bias once. With reduce=False the partial product is returned (and the bias
    left to rank 0) for a caller that sums it with other partial outputs in one all-reduce."""

    def __init__(
        self, linear: nn.Linear, columns: torch.Tensor, tp: TensorParallel, reduce: bool = True
    ):
        super().__init__()
        self.tp, self.reduce = tp, reduce
        self.weight = nn.Parameter(linear.weight[:, columns].clone(), requires_grad=False)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce:
            y = self.tp.all_reduce(y)
        elif self.tp.rank:
            return y
        return y if self.bias is None else y + self.bias


class AbsentExpert(nn.Module):
    """A routed expert held by another rank (expert parallel): it adds nothing here; its owner's
    output arrives through the MoE's all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class ExpertParallel(nn.Module):
    """An MoE block whose experts are split over the ranks: each rank's output holds the
    contributions of its own experts (and its part of a shared expert); one all-reduce sums
    them. Tokens are not moved: every rank already holds all of them (no dispatch, the choice
    for small batches; all-to-all dispatch would pay at large ones)."""

    def __init__(self, moe: nn.Module, tp: TensorParallel):
        super().__init__()
        self.moe, self.tp = moe, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.moe(x).contiguous())


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of an embedding table; ids outside them give zeros, and the sum over
    the ranks is the full lookup, exactly (one rank contributes each row, the others add 0)."""

    def __init__(self, weight: torch.Tensor, start: int, stop: int, tp: TensorParallel):
        super().__init__()
        self.tp, self.start, self.stop = tp, start, stop
        self.weight = nn.Parameter(weight[start:stop].detach().clone(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, 0)
        rows = F.embedding(local, self.weight)
        return self.tp.all_reduce(torch.where(inside[..., None], rows, 0.0))
