"""KV-cache managers: which tokens go through the model at each step of a block.

  none    every step runs the whole sequence.
  prefix  step 0 of a block runs the whole sequence and fills the cache (its logits decode that
          step); later steps run the block and everything after it over the cached prefix.
  dual    same refresh; later steps run only the block over the cached prefix and suffix.
  vicinity  dInfer's refresh: dual, but each step recomputes the block plus `prefix_look` tokens
          before and `after_look` after it, attending with that window fresh without writing it
          back (the cache keeps the refresh's values).

The cache is preallocated for the largest batch and written in place with post-RoPE keys; the
fed tokens overwrite their own slots, so a step attends over the cache as it now stands.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values [layers, rows, kv_heads, length, head_dim], used by the first
    `rows` rows of whatever batch is running (finished requests leave, the rest move up)."""

    def __init__(self, config, rows: int, length: int, device, dtype):
        shape = (config.n_layers, rows, config.n_kv_heads, length, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write the fed tokens' k, v at [start, start + len) and return the whole cache to attend over."""
        rows, end = k.shape[0], start + k.shape[2]
        self.k[layer, :rows, :, start:end] = k
        self.v[layer, :rows, :, start:end] = v
        return self.k[layer, :rows], self.v[layer, :rows]


class Overlay:
    """The cache as seen with a window of fresh keys/values in place, leaving the cache untouched."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        rows, end = k.shape[0], start + k.shape[2]
        K, V = self.kv.k[layer, :rows], self.kv.v[layer, :rows]
        return (torch.cat([K[:, :, :start], k, K[:, :, end:]], dim=2),
                torch.cat([V[:, :, :start], v, V[:, :, end:]], dim=2))


class NoCache:
    def block_logits(self, run, seq, start, end, step):
        return run(seq.ids, seq.positions, seq.real)[:, start:end]


class _RefreshingCache:
    """Step 0 of each block refreshes the whole cache; later steps feed seq[start:self._feed_end(...)]."""

    def __init__(self):
        self.kv: KVCache | None = None

    def block_logits(self, run, seq, start, end, step):
        if step == 0:
            if self.kv is None or self.kv.k.shape[1] < seq.rows or self.kv.k.shape[3] != seq.length:
                self.kv = seq.new_cache()
            return run(seq.ids, seq.positions, seq.real, self.kv, 0)[:, start:end]
        stop = self._feed_end(seq, end)
        logits = run(seq.ids[:, start:stop], seq.positions[:, start:stop], seq.real, self.kv, start)
        return logits[:, : end - start]


class PrefixCache(_RefreshingCache):
    def _feed_end(self, seq, end):
        return seq.length


class DualCache(_RefreshingCache):
    def _feed_end(self, seq, end):
        return end


class VicinityCache(_RefreshingCache):
    def __init__(self, before: int, after: int):
        super().__init__()
        self.before, self.after = before, after

    def block_logits(self, run, seq, start, end, step):
        if step == 0:
            return super().block_logits(run, seq, start, end, step)
        lo, hi = max(0, start - self.before), min(seq.length, end + self.after)
        logits = run(seq.ids[:, lo:hi], seq.positions[:, lo:hi], seq.real, Overlay(self.kv), lo)
        return logits[:, start - lo : end - lo]


def make_cache(params):
    if params.cache == "none":
        return NoCache()
    if params.cache == "prefix":
        return PrefixCache()
    if params.cache == "dual":
        return DualCache()
    if params.cache == "vicinity":
        return VicinityCache(params.prefix_look, params.after_look)
    raise ValueError(f"cache={params.cache!r}")
