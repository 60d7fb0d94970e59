"""Cache policies: which tokens go through the model at each step of a block.

  none      every step runs the whole sequence.
  prefix    step 0 of a block runs the whole sequence and fills the cache (its logits decode
            that step); later steps run the block and everything after it over the cached prefix.
  dual      same refresh; later steps run only the block over the cached prefix and suffix.
  vicinity  dInfer's refresh: dual, but each step recomputes the block plus `prefix_look` tokens
            before and `after_look` after it, attending with that window fresh without writing
            it back (the cache keeps the refresh's values).

With a model whose logits are shifted (Dream: column c predicts column c + 1), every policy
also feeds the column before the block, whose logits predict the block's first position.

A policy is made from the SamplingParams of the requests it serves and the KV cache storage
(workers/kv_cache.py), lives as long as its group of requests in the scheduler (across rounds),
and owns whatever it keeps per request. Adding one: a class here following `CachePolicy`, one
line in `CACHE_POLICIES`, its name in dinfer_async/params.py's CACHES (the test in
tests/test_engine_contracts.py checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from dinfer_async.params import SamplingParams
from workers.kv_cache import KVCache, Overlay

if TYPE_CHECKING:
    from workers.iteration import Batch, Sequence

__all__ = ["CACHE_POLICIES", "CachePolicy", "KVCache", "policy_class"]


class CachePolicy(Protocol):
    """What the iteration manager asks of a cache policy."""

    # True: right as it is for block-causal models (LLaDA2); False: `policy_class` resolves it
    # to BlockCausalCache for them
    block_causal: ClassVar[bool] = False
    # rows may join a running round (BlockRound.join), starting their block there
    joins: ClassVar[bool] = True

    def __init__(self, params: SamplingParams, kv: KVCache) -> None: ...

    @classmethod
    def group_key(cls, params: SamplingParams) -> tuple[Hashable, ...]:
        """The policy's own parameters in `params`: only requests that agree on them share a
        policy (and a round)."""
        return ()

    def block_logits(self, batch: Batch, fresh: int) -> torch.Tensor:
        """The logits [B, K, V] of the block's positions at this step: rows [fresh, B) are at
        their block's first step (fresh 0: every row; B: none), the others at a later one."""
        ...

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Rows left mid-block: only the KV-cache rows `rows` stay, in that order."""
        return None

    def add_rows(self, batch: Batch, moved: int) -> None:
        """Rows joined `batch` after the present ones, whose columns moved right by `moved`."""
        return None

    def step_width(self, block_start: int, length: int, block_length: int) -> int:
        """Token slots per row a step after the first feeds (the scheduler's cost model)."""
        return block_length

    def end_block(self, batch: Batch, rows: list[int]) -> None:
        """Batch rows `rows` finished their block (their tokens are in their requests)."""
        return None

    def leave(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: forget whatever is kept for it."""
        return None


class NoCache(CachePolicy):
    block_causal = True  # the batch builds the block-causal mask of every forward

    def __init__(self, params: SamplingParams, kv: KVCache) -> None:
        pass

    def block_logits(self, batch: Batch, fresh: int) -> torch.Tensor:
        return batch.run_full()

    def step_width(self, block_start: int, length: int, block_length: int) -> int:
        return length


class PrefixCache(CachePolicy):
    """Step 0 of each block refreshes the whole cache; later steps feed the block (with the
    column before it) through `_feed_end`."""

    def __init__(self, params: SamplingParams, kv: KVCache) -> None:
        self.kv = kv

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.kv.keep_rows(rows)

    def add_rows(self, batch: Batch, moved: int) -> None:
        self.kv.grow(batch.cache_rows, batch.length, moved)

    def block_logits(self, batch: Batch, fresh: int) -> torch.Tensor:
        """Rows at their block's first step refresh their cache rows (all of them: the
        cache is laid out for this batch first); the others step over their cache."""
        if fresh == 0:
            self.kv.reserve(batch.cache_rows, batch.length)
            return batch.run_full(self.kv)
        later = self._step(batch, fresh)
        if fresh == batch.rows:
            return later
        return torch.cat([later, batch.run_full(self.kv, first_row=fresh)])

    def _step(self, batch: Batch, rows: int) -> torch.Tensor:
        """The block's logits of rows [0, rows) at a step after their first."""
        kv = self.kv if rows == batch.rows else self.kv.row_window(0, rows)
        lo = batch.block_start - batch.shift
        return batch.run(lo, self._feed_end(batch), kv, rows=rows)

    def _feed_end(self, batch: Batch) -> int:
        return batch.length  # the block and everything after it

    def step_width(self, block_start: int, length: int, block_length: int) -> int:
        return length - block_start


class DualCache(PrefixCache):
    def _feed_end(self, batch: Batch) -> int:
        return batch.block_end  # the block only

    def step_width(self, block_start: int, length: int, block_length: int) -> int:
        return block_length


class VicinityCache(PrefixCache):
    def __init__(self, params: SamplingParams, kv: KVCache) -> None:
        super().__init__(params, kv)
        self.before = params.prefix_look
        self.after = params.after_look

    @classmethod
    def group_key(cls, params: SamplingParams) -> tuple[Hashable, ...]:
        return (params.prefix_look, params.after_look)

    def step_width(self, block_start: int, length: int, block_length: int) -> int:
        return min(length, block_length + self.before + self.after)

    def _step(self, batch: Batch, rows: int) -> torch.Tensor:
        lo = max(0, batch.block_start - max(self.before, batch.shift))
        hi = min(batch.length, batch.block_end + self.after)
        some = None if rows == batch.rows else slice(0, rows)
        return batch.run(lo, hi, Overlay(self.kv, some), rows=rows)


@dataclass
class _Stored:
    """One request's final keys and values [layers, kv_heads, length, head_dim], valid for
    its first `length` tokens (prompt head + finished blocks)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class BlockCausalCache(DualCache):
    """Block-causal models (LLaDA2): a finished block never sees later ones, so its keys and
    values are final. The policy keeps each request's copy of them across rounds; a block's
    first step restores that copy into the batch cache and feeds only what is not in it: the
    block just finished (its commit folded into this forward) and the new block. New requests
    feed their prompt once. Guided rows (cfg) feed everything, as their unconditional copies
    have no stored keys. The same tokens as no cache (tests/test_engine_families.py)."""

    block_causal = True
    joins = False  # a round's first step restores and feeds what each row has not stored

    def __init__(self, params: SamplingParams, kv: KVCache) -> None:
        super().__init__(params, kv)
        self.stored: dict[Sequence, _Stored] = {}

    def leave(self, seq: Sequence) -> None:
        self.stored.pop(seq, None)

    def block_logits(self, batch: Batch, fresh: int) -> torch.Tensor:
        if fresh > 0:  # rows do not join its rounds (`joins`): no row is at its first step
            return super().block_logits(batch, fresh)
        kv = self.kv
        kv.reserve(batch.cache_rows, batch.length)
        if len(batch.guidance):
            lengths = [0] * batch.rows
        else:
            lengths = [self.stored[s].length if s in self.stored else 0 for s in batch.seqs]
        stored_ends = [a + n for a, n in zip(batch.row_start, lengths)]
        lo = min([batch.block_start - batch.shift, *stored_ends])
        # columns before `lo` are not fed: padding there is hidden from attention but must not
        # hold NaN left by an earlier round (0 x NaN is NaN); then each row's stored keys
        kv.k[:, : batch.cache_rows, :, :lo] = 0
        kv.v[:, : batch.cache_rows, :, :lo] = 0
        for i, (seq, a, n) in enumerate(zip(batch.seqs, batch.row_start, lengths)):
            if n:
                kv.k[:, i, :, a : a + n] = self.stored[seq].k[:, :, :n]
                kv.v[:, i, :, a : a + n] = self.stored[seq].v[:, :, :n]
        return batch.run(lo, batch.length, kv)

    def end_block(self, batch: Batch, rows: list[int]) -> None:
        """Keep each row's keys and values up to the block's start (the block itself was
        computed before its last commit; the next round feeds it)."""
        kv = self.kv
        for i in rows:
            seq = batch.seqs[i]
            a = batch.row_start[i]
            n = batch.block_start - a
            if seq not in self.stored:
                layers, _, heads, _, dim = kv.k.shape
                shape = (layers, heads, len(seq.prompt) + len(seq.window), dim)
                self.stored[seq] = _Stored(kv.k.new_empty(shape), kv.v.new_empty(shape))
            stored = self.stored[seq]
            stored.k[:, :, :n] = kv.k[:, i, :, a : a + n]
            stored.v[:, :, :n] = kv.v[:, i, :, a : a + n]
            stored.length = n


# name (SamplingParams.cache, listed in dinfer_async.params.CACHES) -> class
CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "none": NoCache,
    "prefix": PrefixCache,
    "dual": DualCache,
    "vicinity": VicinityCache,
}


def policy_class(name: str, block_causal: bool) -> type[CachePolicy]:
    """The class for SamplingParams.cache == `name` on a model that is `block_causal` or not.

    For a block-causal model, the finished blocks' keys and values are final, so every caching
    policy gives the same tokens as no cache; one that does not handle such models itself
    (`block_causal = False`: prefix, dual, vicinity) is resolved to BlockCausalCache, which
    gives those tokens feeding each token once per block."""
    cls = CACHE_POLICIES[name]
    return BlockCausalCache if block_causal and not cls.block_causal else cls
