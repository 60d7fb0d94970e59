"""KV-cache managers: which tokens go through the model at each step of a block.

  none    every step runs the whole sequence.
  prefix  step 0 of a block runs the whole sequence and fills the cache (its logits decode that
          step); later steps run the block and everything after it over the cached prefix.
  dual    same refresh; later steps run only the block over the cached prefix and suffix.
  vicinity  dInfer's refresh: dual, but each step recomputes the block plus `prefix_look` tokens
          before and `after_look` after it, attending with that window fresh without writing it
          back (the cache keeps the refresh's values).

With a model whose logits are shifted (Dream: column c predicts column c + 1), every policy
also feeds the column before the block, whose logits predict the block's first position.

The cache is preallocated for the largest batch and written in place with post-RoPE keys; the
fed tokens overwrite their own slots, so a step attends over the cache as it now stands.
"""

from __future__ import annotations

import torch

import dinfer_kernels as kernels


class KVCache:
    """Per-layer keys and values [layers, rows, kv_heads, length, head_dim], allocated once and
    grown only when a round needs more rows or a longer sequence than any before it."""

    def __init__(self, config, device, dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.k = self.v = None
        self.rows = self.length = 0

    def reserve(self, rows: int, length: int) -> None:
        if self.k is None or self.k.shape[1] < rows or self.k.shape[3] < length:
            c = self.config
            cap_rows = max(rows, 0 if self.k is None else self.k.shape[1])
            cap_len = max(length, 0 if self.k is None else self.k.shape[3])
            shape = (c.n_layers, cap_rows, c.n_kv_heads, cap_len, c.head_dim)
            self.k = torch.empty(shape, device=self.device, dtype=self.dtype)
            self.v = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.rows, self.length = rows, length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the cache to `rows` (in that order) in place; the rest is free for reuse."""
        n = len(rows)
        self.k[:, :n] = self.k[:, rows]
        self.v[:, :n] = self.v[:, rows]
        self.rows = n

    def attention(self, layer: int, q, k, v, start: int, key_mask, write: bool = True):
        """The fed tokens (sequence offset `start`) attend over the cache with their own k, v at
        [start, start + n), written into it there by the same kernel when `write`."""
        return kernels.cached_attention(
            q,
            k,
            v,
            self.k[layer, : self.rows, :, : self.length],
            self.v[layer, : self.rows, :, : self.length],
            start,
            key_mask,
            write,
        )


class Overlay:
    """The cache as seen with a window of fresh keys/values in place, leaving the cache untouched."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def attention(self, layer: int, q, k, v, start: int, key_mask):
        return self.kv.attention(layer, q, k, v, start, key_mask, write=False)


class NoCache:
    def end_block(self, batch, rows: list[int]) -> None:
        pass

    def block_logits(self, run, batch, start, end, step):
        return run(batch.ids, batch.positions, batch.real)[
            :, start - batch.shift : end - batch.shift
        ]

    def keep_rows(self, rows: torch.Tensor) -> None:
        pass


class _RefreshingCache:
    """Step 0 of each block refreshes the whole cache; later steps feed batch[start:self._feed_end(...)]."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def end_block(self, batch, rows: list[int]) -> None:
        pass

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.kv.keep_rows(rows)

    def block_logits(self, run, batch, start, end, step):
        s = batch.shift
        if step == 0:
            self.kv.reserve(batch.cache_rows, batch.length)
            return run(batch.ids, batch.positions, batch.real, self.kv, 0)[:, start - s : end - s]
        stop, lo = self._feed_end(batch, end), start - s
        logits = run(batch.ids[:, lo:stop], batch.positions[:, lo:stop], batch.real, self.kv, lo)
        return logits[:, : end - start]


class PrefixCache(_RefreshingCache):
    def _feed_end(self, batch, end):
        return batch.length


class DualCache(_RefreshingCache):
    def _feed_end(self, batch, end):
        return end


class VicinityCache(_RefreshingCache):
    def __init__(self, kv: KVCache, before: int, after: int):
        super().__init__(kv)
        self.before, self.after = before, after

    def block_logits(self, run, batch, start, end, step):
        if step == 0:
            return super().block_logits(run, batch, start, end, step)
        s = batch.shift
        lo, hi = max(0, start - max(self.before, s)), min(batch.length, end + self.after)
        logits = run(
            batch.ids[:, lo:hi], batch.positions[:, lo:hi], batch.real, Overlay(self.kv), lo
        )
        return logits[:, start - s - lo : end - s - lo]


class BlockCausalCache(DualCache):
    """Block-causal models (LLaDA2): a finished block never sees later ones, so its keys and
    values are final. Each request keeps its own copy of them across rounds (`Sequence.kv`); a
    block's first step restores that copy into the batch cache and feeds only what is not in it:
    the block just finished (its commit folded into this forward) and the new block. New
    requests feed their prompt once. Guided rows (cfg) feed everything, as their unconditional
    copies have no stored keys. Every cache policy means this one for such models."""

    def block_logits(self, run, batch, start, end, step):
        if step > 0:
            return super().block_logits(run, batch, start, end, step)
        self.kv.reserve(batch.cache_rows, batch.length)
        stored = [0 if len(batch.guided) else seq.kv_len for seq in batch.seqs]
        lo = min([start - batch.shift] + [a + n for a, n in zip(batch.row_start, stored)])
        # columns before `lo` are not fed: padding there is hidden from attention but must not
        # hold NaN left by an earlier round (0 x NaN is NaN); then each row's stored keys
        self.kv.k[:, : batch.cache_rows, :, :lo] = 0
        self.kv.v[:, : batch.cache_rows, :, :lo] = 0
        for i, (seq, a, n) in enumerate(zip(batch.seqs, batch.row_start, stored)):
            if not n:
                continue
            self.kv.k[:, i, :, a : a + n] = seq.kv[0][:, :, :n]
            self.kv.v[:, i, :, a : a + n] = seq.kv[1][:, :, :n]
        logits = run(batch.ids[:, lo:], batch.positions[:, lo:], batch.real, self.kv, lo)
        return logits[:, start - batch.shift - lo : end - batch.shift - lo]

    def end_block(self, batch, rows: list[int]) -> None:
        """Keep each row's keys and values up to the block's start (the block itself was
        computed before its last commit; the next round feeds it)."""
        for i in rows:
            seq = batch.seqs[i]
            a, n = batch.row_start[i], batch.block_start - batch.row_start[i]
            if seq.kv is None:
                shape = (
                    self.kv.k.shape[0],
                    self.kv.k.shape[2],
                    len(seq.prompt) + len(seq.window),
                    self.kv.k.shape[4],
                )
                seq.kv = (self.kv.k.new_empty(shape), self.kv.v.new_empty(shape))
            seq.kv[0][:, :, :n] = self.kv.k[:, i, :, a : a + n]
            seq.kv[1][:, :, :n] = self.kv.v[:, i, :, a : a + n]
            seq.kv_len = n


def make_cache(params, kv: KVCache, block_causal: bool = False):
    """The policy `params.cache` names, using the preallocated `kv` where it needs one."""
    if params.cache == "none":
        return NoCache()
    if block_causal:
        return BlockCausalCache(kv)
    if params.cache == "prefix":
        return PrefixCache(kv)
    if params.cache == "dual":
        return DualCache(kv)
    if params.cache == "vicinity":
        return VicinityCache(kv, params.prefix_look, params.after_look)
    raise ValueError(f"cache={params.cache!r}")
