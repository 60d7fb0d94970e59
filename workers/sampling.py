"""From a block's logits to predictions: token and confidence per position.

Shared by every decoder so they all sample the same way as the reference sampler
(workers/reference.py): Gumbel-max with counter-based noise (kernels.reference.gumbel; the same
numbers inside the Triton confidence kernel). A request's noise at a step is keyed by
`step_seeds(block_seed(seed, block), step)` (workers/shared.py), so it never depends on its
batch-mates, and the keys are derived on the device: no per-step upload.

Under tensor parallel (workers/parallel) each rank holds the logits of its vocabulary shard
only. The noise is a pure function of (seed, position, token id), so a rank draws it for its
own global ids; each rank reduces its shard to four numbers per position (best score, its global
token id, that token's logit, log-sum-exp), and the ranks all-gather those: never the logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import dinfer_kernels as kernels
from dinfer_kernels.reference import exponential, uniform
from workers.parallel.group import TensorParallel, current


def predict(
    logits: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, V] -> (token [B, K], probability of that token [B, K] float64).

    `temperature` [B] (None when every row is greedy; 0 rows take the argmax), `seeds` [B] the
    rows' step keys."""
    tp = current()
    if tp is None:
        token, prob = kernels.confidence(
            logits, temperature, seeds if temperature is not None else None
        )
    else:
        token, prob = sharded_confidence(logits, temperature, seeds, tp)
    # a NaN confidence (a broken model or checkpoint) would never pass "the best one commits"
    # and a block would step forever; as 0 it still lets every step commit something
    return token, torch.nan_to_num(prob, nan=0.0)


def sharded_confidence(
    logits: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor, tp: TensorParallel
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.confidence over the vocabulary shards of a group: `logits` [B, K, V_local] are
    the columns [tp.vocab_start, tp.vocab_stop). The same token on every rank (ties go to the
    lowest token id, as argmax's), the same probability up to the rounding of the log-sum-exp
    merge."""
    B, K, _ = logits.shape
    if temperature is None:
        h = logits.double()
        score = h
    else:
        compute = torch.promote_types(logits.dtype, torch.float32)
        h = logits.to(compute)
        ids = torch.arange(tp.vocab_start, tp.vocab_stop, device=logits.device)
        noise = -torch.log(exponential(uniform(seeds, K, ids).to(compute)))
        score = h + temperature.to(compute)[:, None, None] * noise
    best, local = score.max(dim=-1)
    part = torch.stack(
        [
            best.double(),
            (local + tp.vocab_start).double(),
            h.gather(-1, local[..., None])[..., 0].double(),
            torch.logsumexp(h, dim=-1).double(),
        ]
    )  # [4, B, K]
    parts = tp.all_gather(part)  # [T, 4, B, K]
    winner = parts[:, 0].argmax(dim=0, keepdim=True)  # the first (lowest ids) of equal bests
    token = parts[:, 1].gather(0, winner)[0].long()
    chosen = parts[:, 2].gather(0, winner)[0]
    lse = torch.logsumexp(parts[:, 3].to(h.dtype), dim=0)
    return token, torch.exp(chosen.to(h.dtype) - lse).double()


def local_ids(token: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global token ids -> (their column in this rank's logits [0, width), whether this rank
    holds them); a single process holds every id."""
    tp = current()
    if tp is None:
        return token, torch.ones_like(token, dtype=torch.bool)
    local = token - tp.vocab_start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside


def expected_embedding(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sum_v softmax(logits)_v table[v]: logits [B, K, V] (a rank's vocabulary shard under
    tensor parallel, `table` then its rows from vocab_start) -> [B, K, d] in table's dtype.
    Across shards: the softmax from the global max and sum, the partial products summed."""
    x = logits.to(table.dtype)
    rows = table[: x.shape[-1]]
    tp = current()
    if tp is None:
        return torch.softmax(x, dim=-1) @ rows
    top = tp.all_reduce(x.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX)
    e = torch.exp(x - top)
    total = tp.all_reduce(e.sum(dim=-1, keepdim=True))
    return tp.all_reduce(e @ rows) / total
