"""The tensor-parallel layers: each holds its rank's slice of a full layer's weight.

A column-parallel linear is a plain nn.Linear over some output features (no communication);
a row-parallel linear takes the matching input features and sums the ranks' partial outputs;
the vocabulary-parallel embedding looks up the ids in its rank's rows (zero elsewhere) and sums.
The LM head is a column-parallel linear over the vocabulary whose logits stay sharded: the
sampler merges per-shard results (workers/sampling.py).

Expert parallel has two dispatches. "all_reduce" (ExpertParallel): every rank already holds every
token, computes its experts' share for all of them, and one all-reduce sums the shares.
"all_to_all" (ExpertParallelAllToAll with DispatchedExperts): each rank routes its 1/T slice of
the tokens, sends each (token, expert) pair to the expert's owner and gets the output back, then
an all-gather restores the replicated hidden states.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dinfer_kernels as kernels
from dinfer_kernels.moe import combine
from workers.models.layers import RoutedExperts
from workers.parallel.group import TensorParallel


def split(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous part [lo, hi) of range(n) in `size` near-equal parts (the first
    n % size parts one longer)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] and `bias` themselves (a column-parallel linear:
    the rank's output features, sliced by workers/parallel/shard.py; no communication)."""
    with torch.device("meta"):  # no throw-away initialisation
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


class RowParallelLinear(nn.Module):
    """A full linear's input features this rank holds (`weight` [out, in / T]) and its whole
    bias; forward sums the ranks' partial products, then adds the bias once. With reduce=False
    the partial product is returned (and the bias left to rank 0) for a caller that sums it with
    other partial outputs in one all-reduce."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tp: TensorParallel,
        reduce: bool = True,
    ):
        super().__init__()
        self.tp, self.reduce = tp, reduce
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

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


class LocalExperts(nn.Module):
    """Stands in for an MoE block's routed experts under the all-reduce dispatch (same call:
    h [n, d], ids and weights [n, k] -> [n, d] in weights' dtype): the sum over this rank's
    experts only, the other pairs' rows zero. Where kernels.routed_experts would take its loop
    (host-side counts anyway) only this rank's pairs are computed; the no-host-read paths
    (dense, grouped) run on every pair with the absent experts' zero weights, as before, so
    they keep reading nothing on the host at T times the expert work."""

    def __init__(self, routed: RoutedExperts, tp: TensorParallel):
        super().__init__()
        self.routed = routed
        self.lo, self.hi = split(len(routed), tp.size, tp.rank)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.routed.expert_weights()
        if kernels.moe_path(h, ids, experts) != "loop":
            return kernels.routed_experts(h, ids, weights, experts)
        n, k = ids.shape
        flat = ids.reshape(-1)
        mine = ((flat >= self.lo) & (flat < self.hi)).nonzero().squeeze(1)
        slots = h.new_zeros(n * k, h.shape[-1])
        if mine.numel():
            ones = torch.ones(mine.numel(), 1, dtype=h.dtype, device=h.device)
            out = kernels.routed_experts(h[mine // k], flat[mine, None], ones, experts)
            slots[mine] = out.to(h.dtype)
        return combine(slots.view(n, k, -1), weights)


class ExpertParallel(nn.Module):
    """An MoE block whose experts are split over the ranks (its routed experts a LocalExperts):
    each rank's output holds the contributions of its own experts (and its part of a shared
    expert); one all-reduce sums them. Tokens are not moved: every rank already holds all of
    them (one collective per block: the choice at small batch, see ExpertParallelAllToAll)."""

    def __init__(self, moe: nn.Module, tp: TensorParallel):
        super().__init__()
        self.moe, self.tp = moe, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.moe(x).contiguous())


class DispatchedExperts(nn.Module):
    """Stands in for an MoE block's routed experts (same call: h [n, d], ids and weights [n, k]
    -> [n, d] in weights' dtype) when the block sees only this rank's tokens: each (token,
    choice) pair's row goes to the rank owning its expert (all-to-all), the owner runs its
    experts on what it received (kernels.routed_experts, any path), and the outputs come back by
    the reverse all-to-all. The pairs are then summed per token in choice order
    (kernels.moe.combine), the same sum as one process's, so only the rows' matmuls could
    differ (in rounding, never in order of the weighted sum)."""

    def __init__(self, routed: RoutedExperts, tp: TensorParallel):
        super().__init__()
        self.routed, self.tp = routed, tp
        self.shares = [split(len(routed), tp.size, r) for r in range(tp.size)]  # [lo, hi) each
        self.lo, self.hi = self.shares[tp.rank]

    def forward(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = ids.shape
        T, d, group = self.tp.size, h.shape[-1], self.tp.group
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # pairs by expert, so by owner (contiguous shares)
        E, width = len(self.routed), self.hi - self.lo
        counts = torch.bincount(flat, minlength=E)  # pairs per expert
        got = counts.new_empty(T * width)  # got[r * width + e]: rank r's pairs for expert lo + e
        sizes = [hi - lo for lo, hi in self.shares]
        dist.all_to_all_single(got, counts, [width] * T, sizes, group=group)
        host = torch.cat([counts, got]).tolist()  # the split sizes: one host read
        sent = [sum(host[lo:hi]) for lo, hi in self.shares]
        received = [sum(host[E + r * width : E + (r + 1) * width]) for r in range(T)]
        rows = h.new_empty(sum(received), d)
        dist.all_to_all_single(rows, h[order // k].contiguous(), received, sent, group=group)
        local = torch.arange(self.lo, self.hi, device=h.device).repeat(T)
        experts = local.repeat_interleave(got, output_size=rows.shape[0])
        if rows.shape[0]:
            ones = torch.ones(rows.shape[0], 1, dtype=h.dtype, device=h.device)
            out = kernels.routed_experts(rows, experts[:, None], ones, self.routed.expert_weights())
            out = out.to(h.dtype)
        else:
            out = rows
        back = h.new_empty(n * k, d)
        dist.all_to_all_single(back, out.contiguous(), sent, received, group=group)
        slots = torch.empty_like(back)
        slots[order] = back
        return combine(slots.view(n, k, d), weights)


class ExpertParallelAllToAll(nn.Module):
    """An MoE block under all-to-all dispatch: it runs on this rank's contiguous slice of the
    tokens (its router replicated, its routed experts a DispatchedExperts, a shared expert inside
    the block whole on every rank), and one all-gather gives every rank all the tokens' outputs
    again. Every rank calls it with the same replicated x, so the collectives line up even where
    a slice is empty (fewer tokens than ranks)."""

    def __init__(self, moe: nn.Module, tp: TensorParallel):
        super().__init__()
        self.moe, self.tp = moe, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, d = x.shape, x.shape[-1]
        flat = x.reshape(-1, d)
        N, T = flat.shape[0], self.tp.size
        bounds = [split(N, T, r) for r in range(T)]
        lo, hi = bounds[self.tp.rank]
        y = self.moe(flat[lo:hi][None]).reshape(-1, d)
        width = -(-N // T)
        if hi - lo < width:  # all_gather takes equal shapes: pad, then drop the padding
            y = torch.cat([y, y.new_zeros(width - (hi - lo), d)])
        parts = self.tp.all_gather(y)  # [T, width, d]
        if N % T:
            return torch.cat([parts[r, : b - a] for r, (a, b) in enumerate(bounds)]).view(shape)
        return parts.view(shape)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of an embedding table (`rows`, already sliced); ids outside them give
    zeros, and the sum over the ranks is the full lookup, exactly (one rank contributes each
    row, the others add 0)."""

    def __init__(self, rows: torch.Tensor, start: int, stop: int, tp: TensorParallel):
        super().__init__()
        if rows.shape[0] != stop - start:
            raise ValueError(f"embedding rows {tuple(rows.shape)} for ids [{start}, {stop})")
        self.tp, self.start, self.stop = tp, start, stop
        self.weight = nn.Parameter(rows, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        local = torch.where(inside, ids - self.start, 0)
        rows = F.embedding(local, self.weight)
        return self.tp.all_reduce(torch.where(inside[..., None], rows, 0.0))
