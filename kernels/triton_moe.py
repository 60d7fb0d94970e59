"""Routed experts as a Triton grouped GEMM over the (token, choice) pairs sorted by expert.

Two launches, no host read: the up kernel computes silu(h W_gate^T) * (h W_up^T) for a tile of
pairs of one expert, the down kernel multiplies that by W_down^T and writes each pair's row; the
weighted sum over a token's k choices is the torch reference's (kernels.moe.combine). Each program
learns its expert and rows from kernels.moe.expert_tiles (device tensors) and finds that expert's
weights through ExpertWeights.offsets(), a table of element offsets from gate[0]; programs of an
unused tile (expert -1) do nothing. Accumulation in float32 (float64 for float64 inputs, which
only the interpreter runs: the dispatcher keeps float64 on CUDA off this kernel); float32 inputs
multiply in full precision (no TF32), so float32 results follow torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dinfer_kernels import moe


@triton.jit
def _weight_offset(table_ptr, e, which, ALIGNED: tl.constexpr):
    off = tl.load(table_ptr + e * 3 + which)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return off


@triton.jit
def _tile(order_ptr, tile_start_ptr, tile_end_ptr, t, top_k, BLOCK_M: tl.constexpr):
    """This tile's sorted positions, which are real, and their pairs' tokens and flat slots."""
    rows = tl.load(tile_start_ptr + t) + tl.arange(0, BLOCK_M)
    keep = rows < tl.load(tile_end_ptr + t)
    slot = tl.load(order_ptr + rows, mask=keep, other=0)
    return rows, keep, slot, slot // top_k


@triton.jit
def _experts_up_kernel(
    h_ptr,
    w_ptr,
    table_ptr,
    order_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    act_ptr,
    d,
    H,
    top_k,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """act[row, n] = silu(h[token] . gate[e, n]) * (h[token] . up[e, n]) for a tile's rows and
    BLOCK_N hidden units n, in h's dtype (the gate cast to it first, as torch's two linears do)."""
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        rows, keep, _, token = _tile(order_ptr, tile_start_ptr, tile_end_ptr, t, top_k, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        gate = w_ptr + _weight_offset(table_ptr, e, 0, ALIGNED)
        up = w_ptr + _weight_offset(table_ptr, e, 1, ALIGNED)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d
            a = tl.load(
                h_ptr + token.to(tl.int64)[:, None] * d + ks[None, :],
                mask=keep[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_at = cols[None, :] * d + ks[:, None]  # [BLOCK_K, BLOCK_N] of W^T
            w_ok = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(gate + w_at, mask=w_ok, other=0.0)
            wu = tl.load(up + w_at, mask=w_ok, other=0.0)
            acc_gate = tl.dot(a, wg, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
        g = acc_gate.to(act_ptr.dtype.element_ty).to(ACC)
        act = (g * tl.sigmoid(g)).to(act_ptr.dtype.element_ty) * acc_up.to(act_ptr.dtype.element_ty)
        tl.store(
            act_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :],
            act,
            mask=keep[:, None] & col_ok[None, :],
        )


@triton.jit
def _experts_down_kernel(
    act_ptr,
    w_ptr,
    table_ptr,
    order_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    out_ptr,
    d,
    H,
    top_k,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[slot, n] = act[row] . down[e, n] for a tile's rows and BLOCK_N model dims n: each pair
    writes the row of its flat slot, so the pairs come back in token order."""
    t = tl.program_id(0)
    e = tl.load(tile_expert_ptr + t)
    if e >= 0:
        rows, keep, slot, _ = _tile(order_ptr, tile_start_ptr, tile_end_ptr, t, top_k, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d
        down = w_ptr + _weight_offset(table_ptr, e, 2, ALIGNED)
        acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            a = tl.load(
                act_ptr + rows.to(tl.int64)[:, None] * H + ks[None, :],
                mask=keep[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                down + cols[None, :] * H + ks[:, None],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        tl.store(
            out_ptr + slot.to(tl.int64)[:, None] * d + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=keep[:, None] & col_ok[None, :],
        )


def routed_experts(
    h: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: moe.ExpertWeights,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    slots_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """kernels.reference.routed_experts as two grouped-GEMM launches (h [N, d], ids and weights
    [N, k] -> [N, d] in weights' dtype). Falls back to kernels.moe.dense_experts where the
    weights have no offset table (a non-contiguous weight). Block sizes: powers of two >= 16.
    `slots_out` [N * k, d] receives the per-pair outputs (tests pass a NaN-filled one)."""
    table = experts.offsets()
    if table is None:
        return moe.dense_experts(h, ids, weights, experts)
    N, k = ids.shape
    d, H = experts.d_model, experts.hidden
    h = h.contiguous()
    if h.dtype != experts.dtype:
        h = h.to(experts.dtype)
    order, tile_expert, tile_start, tile_end = moe.expert_tiles(ids, experts.num_experts, block_m)
    T = tile_expert.numel()
    act = torch.empty(N * k, H, dtype=h.dtype, device=h.device)
    out = torch.empty(N * k, d, dtype=h.dtype, device=h.device) if slots_out is None else slots_out
    precision = None if h.dtype in (torch.float16, torch.bfloat16) else "ieee"  # None: default
    common = dict(
        ALIGNED=experts.aligned,
        PRECISION=precision,
        ACC=tl.float64 if h.dtype == torch.float64 else tl.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    tiles = (order, tile_expert, tile_start, tile_end)
    w = experts.gate[0]
    _experts_up_kernel[(T, triton.cdiv(H, block_n))](h, w, table, *tiles, act, d, H, k, **common)
    _experts_down_kernel[(T, triton.cdiv(d, block_n))](
        act, w, table, *tiles, out, d, H, k, **common
    )
    return moe.combine(out.view(N, k, d), weights)
