"""The KV cache itself: preallocated keys and values that the model attends over.

The storage only; which tokens go through the model and when the cache is refreshed is a cache
policy's business (workers/cache.py). Keys are cached post-RoPE and written in place by the
attention kernel: the fed tokens overwrite their own slots, so a step attends over the cache as
it now stands.
"""

from __future__ import annotations

from typing import Any

import torch

import dinfer_kernels as kernels


class KVCache:
    """Per-layer keys and values [layers, rows, kv_heads, length, head_dim], allocated once and
    grown only when a round needs more rows or a longer sequence than any before it."""

    def __init__(self, config: Any, device: torch.device | str, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.k = torch.empty(0, device=device, dtype=dtype)
        self.v = torch.empty(0, device=device, dtype=dtype)
        self.rows = 0
        self.length = 0

    def reserve(self, rows: int, length: int) -> None:
        if self.k.dim() < 5 or self.k.shape[1] < rows or self.k.shape[3] < length:
            c = self.config
            grown = self.k.dim() == 5
            cap_rows = max(rows, self.k.shape[1] if grown else 0)
            cap_len = max(length, self.k.shape[3] if grown else 0)
            shape = (c.n_layers, cap_rows, c.n_kv_heads, cap_len, c.head_dim)
            self.k = torch.empty(shape, device=self.device, dtype=self.dtype)
            self.v = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.rows = rows
        self.length = length

    def grow(self, rows: int, length: int, moved: int = 0) -> None:
        """Rows join a round: reserve(rows, length) keeping what the present rows hold, their
        columns moved right by `moved` (the layout widened), padding around it zeroed (hidden
        from attention, but 0 x NaN is NaN)."""
        k, v, present, held = self.k, self.v, self.rows, self.length
        self.reserve(rows, length)
        for old, store in ((k, self.k), (v, self.v)):
            if store is not old or moved:
                store[:, :present, :, moved : moved + held] = old[:, :present, :, :held].clone()
            store[:, :present, :, :moved] = 0
            store[:, :present, :, moved + held : length] = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the cache to `rows` (in that order) in place; the rest is free for reuse.
        Rows already in place (a leading run of rows[i] == i) are not copied."""
        n = len(rows)
        index = rows.tolist()
        first = next((i for i, r in enumerate(index) if r != i), n)
        if first < n:
            self.k[:, first:n] = self.k[:, rows[first:]]
            self.v[:, first:n] = self.v[:, rows[first:]]
        self.rows = n

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        key_mask: torch.Tensor | None,
        write: bool = True,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """The fed tokens (sequence offset `start`) attend over the cache with their own k, v at
        [start, start + n), written into it there by the same kernel when `write`. rows: the
        cache rows they are (default: the first `self.rows`)."""
        rows = slice(0, self.rows) if rows is None else rows
        return kernels.cached_attention(
            q,
            k,
            v,
            self.k[layer, rows, :, : self.length],
            self.v[layer, rows, :, : self.length],
            start,
            key_mask,
            write,
        )

    def row_window(self, lo: int, hi: int) -> RowWindow:
        """Rows [lo, hi) of the cache, as a cache of their own (a forward over some rows)."""
        return RowWindow(self, lo, hi)


class RowWindow:
    """Rows [lo, hi) of a KVCache: what a forward over those rows alone attends over."""

    def __init__(self, kv: KVCache, lo: int, hi: int):
        self.kv, self.lo, self.hi = kv, lo, hi

    def clear_outside(self, start: int, end: int) -> None:
        """Zero these rows' keys and values outside columns [start, end)."""
        kv = self.kv
        for store in (kv.k, kv.v):
            store[:, self.lo : self.hi, :, :start] = 0
            store[:, self.lo : self.hi, :, end : kv.length] = 0

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.kv.attention(layer, q, k, v, start, key_mask, rows=slice(self.lo, self.hi))


class Overlay:
    """The cache (its `rows`, default all) as seen with a window of fresh keys/values in
    place, leaving it untouched."""

    def __init__(self, kv: KVCache, rows: slice | None = None):
        self.kv = kv
        self.rows = rows

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.kv.attention(layer, q, k, v, start, key_mask, write=False, rows=self.rows)
