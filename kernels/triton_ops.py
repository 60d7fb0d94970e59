"""Triton kernels for the hot path of a diffusion step. Registered with the dispatcher
(kernels/__init__.py) for CUDA tensors; each has a torch reference in kernels/reference.py and a
test against it (tests/test_kernels.py, run under TRITON_INTERPRET=1 on CPU).

Shapes follow the references: rows are flattened leading dimensions, the last dimension is
contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# ---- RMSNorm (optionally fused with the residual add) -----------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=keep, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=keep, other=0.0)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=keep)
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=keep, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, w * (h * inv).to(x.dtype), mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, out=None):
    """RMSNorm of x (or of x + residual, returning (normed, x + residual)). `out` may be given
    (tests pass NaN-filled ones to catch unwritten elements)."""
    rows = _rows(x)
    out = torch.empty_like(rows) if out is None else out.view(rows.shape)
    total = torch.empty_like(rows) if residual is not None else out
    res = _rows(residual) if residual is not None else rows
    block = triton.next_power_of_2(rows.shape[1])
    _rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, total, rows.shape[1], eps,
                                       HAS_RES=residual is not None, BLOCK=block)
    out = out.view(x.shape)
    return out if residual is None else (out, total.view(x.shape))


# ---- SwiGLU -------------------------------------------------------------------------------------


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(gate_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=keep, other=0.0)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g)).to(u.dtype) * u, mask=keep)


def swiglu(gate: torch.Tensor, up: torch.Tensor, out=None) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(up) if out is None else out
    n = up.numel()
    block = 4096
    _swiglu_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out


# ---- RoPE (rotate-half) ------------------------------------------------------------------------


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, length, half, BLOCK: tl.constexpr):
    # one program per (batch, head, position); cos/sin are [B, 1, L, D]
    pid = tl.program_id(0)
    pos = pid % length
    b = pid // (length * heads)
    cols = tl.arange(0, BLOCK)
    keep = cols < half
    base = pid * 2 * half
    trig = (b * length + pos) * 2 * half
    x1 = tl.load(x_ptr + base + cols, mask=keep, other=0.0)
    x2 = tl.load(x_ptr + base + half + cols, mask=keep, other=0.0)
    c1 = tl.load(cos_ptr + trig + cols, mask=keep, other=0.0)
    c2 = tl.load(cos_ptr + trig + half + cols, mask=keep, other=0.0)
    s1 = tl.load(sin_ptr + trig + cols, mask=keep, other=0.0)
    s2 = tl.load(sin_ptr + trig + half + cols, mask=keep, other=0.0)
    h1, h2 = x1.to(c1.dtype), x2.to(c1.dtype)
    tl.store(out_ptr + base + cols, (h1 * c1 - h2 * s1).to(x1.dtype), mask=keep)
    tl.store(out_ptr + base + half + cols, (h2 * c2 + h1 * s2).to(x1.dtype), mask=keep)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out=None) -> torch.Tensor:
    """x [B, H, L, D]; cos, sin [B, 1, L, D] (the compute dtype)."""
    B, H, L, D = x.shape
    x = x.contiguous()
    cos, sin = cos.expand(B, 1, L, D).contiguous(), sin.expand(B, 1, L, D).contiguous()
    out = torch.empty_like(x) if out is None else out
    _rope_kernel[(B * H * L,)](x, cos, sin, out, H, L, D // 2, BLOCK=triton.next_power_of_2(D // 2))
    return out


# ---- confidence: top-1 token and its probability in one pass over the vocabulary ---------------


@triton.jit
def _confidence_kernel(logits_ptr, token_ptr, prob_ptr, margin_ptr, entropy_ptr, vocab, exclude,
                       CHUNK: tl.constexpr):
    """Online over vocabulary chunks: running max m, sum of exp(l - m) s, sum of exp(l - m) * l
    (for the entropy) and the runner-up; never holds more than one chunk of a row."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * vocab
    m = -float("inf")
    second = -float("inf")
    s = 0.0
    sl = 0.0
    best = 0
    for start in range(0, vocab, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        keep = (cols < vocab) & (cols != exclude)
        x = tl.load(base + cols, mask=keep, other=-float("inf")).to(tl.float32)
        cmax = tl.max(x, axis=0)
        carg = tl.argmax(x, axis=0) + start
        # runner-up inside this chunk: the max once the chunk's argmax is removed
        csecond = tl.max(tl.where(cols == carg, -float("inf"), x), axis=0)
        new_m = tl.maximum(m, cmax)
        finite = new_m > -float("inf")  # False only while every logit so far is -inf
        scale = tl.where(finite, tl.exp(m - new_m), 0.0)
        e = tl.where(x > -float("inf"), tl.exp(x - new_m), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        sl = sl * scale + tl.sum(tl.where(e > 0, e * x, 0.0), axis=0)
        second = tl.maximum(tl.maximum(second, csecond), tl.minimum(m, cmax))
        best = tl.where(cmax > m, carg, best)
        m = new_m
    lse = m + tl.log(s)
    tl.store(token_ptr + row, best)
    tl.store(prob_ptr + row, tl.exp(m - lse))
    tl.store(margin_ptr + row, tl.exp(m - lse) - tl.exp(second - lse))
    tl.store(entropy_ptr + row, lse - sl / s)


def confidence_stats(logits: torch.Tensor, exclude: int = -1, chunk: int = 2048, fill=None):
    """Per position: (top-1 token, its probability, top-1 minus top-2 probability, entropy),
    the token `exclude` left out; probabilities in float32. `fill` pre-fills the outputs."""
    rows = _rows(logits)
    n = rows.shape[0]
    token = torch.full((n,), -1 if fill is None else int(fill), dtype=torch.long, device=rows.device)
    prob, margin, entropy = (torch.full((n,), float("nan") if fill is None else fill, dtype=torch.float32, device=rows.device)
                             for _ in range(3))
    _confidence_kernel[(n,)](rows, token, prob, margin, entropy, rows.shape[1], exclude, CHUNK=chunk)
    shape = logits.shape[:-1]
    return token.view(shape), prob.view(shape), margin.view(shape), entropy.view(shape)


def confidence(logits: torch.Tensor):
    """Dispatcher signature: (token, probability as float64)."""
    token, prob, _, _ = confidence_stats(logits)
    return token, prob.double()


# ---- commit selection on [B, K]: one program per row, the whole block loaded at once -----------
# Positions past K are loaded as -inf at the far right, so they never beat a real position.


@triton.jit
def _load_block(conf_ptr, masked_ptr, K, BLOCK: tl.constexpr):
    """This program's row: (positions, in range, masked, conf with -inf where not masked)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < K
    masked = tl.load(masked_ptr + row * K + cols, mask=keep, other=0) != 0
    conf = tl.load(conf_ptr + row * K + cols, mask=keep, other=-float("inf"))
    return cols, keep, masked, tl.where(masked, conf, -float("inf"))


@triton.jit
def _store_block(commit_ptr, K, cols, keep, commit):
    tl.store(commit_ptr + tl.program_id(0) * K + cols, commit.to(tl.int8), mask=keep)


@triton.jit
def _beats(conf, cols):
    """[BLOCK, BLOCK]: does position j (column) come before position i (row) in descending
    confidence, leftmost first among equals?"""
    ci, cj = conf[:, None], conf[None, :]
    return (cj > ci) | ((cj == ci) & (cols[None, :] < cols[:, None]))


@triton.jit
def _threshold_rule(conf, allowed, tau):
    """Allowed positions with conf >= min(tau, best allowed conf): always at least the best."""
    best = tl.max(tl.where(allowed, conf, -float("inf")), axis=0)
    return allowed & (conf >= tl.minimum(tau, best))


@triton.jit
def _threshold_commit_kernel(conf_ptr, masked_ptr, tau_ptr, commit_ptr, K, BLOCK: tl.constexpr):
    cols, keep, masked, conf = _load_block(conf_ptr, masked_ptr, K, BLOCK)
    tau = tl.load(tau_ptr + tl.program_id(0))
    _store_block(commit_ptr, K, cols, keep, _threshold_rule(conf, masked, tau))


@triton.jit
def _factor_commit_kernel(conf_ptr, masked_ptr, f_ptr, commit_ptr, K, BLOCK: tl.constexpr):
    """No sort: position i has rank r_i (how many positions come before it), i.e. it is the
    (r_i + 1)-th largest, so n = r_i + 1 qualifies iff (r_i + 2)(1 - c_i) < f."""
    cols, keep, masked, conf = _load_block(conf_ptr, masked_ptr, K, BLOCK)
    f = tl.load(f_ptr + tl.program_id(0))
    rank = tl.sum(_beats(conf, cols).to(tl.int32), axis=1)
    ok = keep & (((rank + 2).to(conf.dtype) * (1.0 - conf)).to(f.dtype) < f)
    count = tl.max(tl.where(ok, rank + 1, 1), axis=0)
    _store_block(commit_ptr, K, cols, keep, masked & (rank < count))


@triton.jit
def _hierarchical_commit_kernel(conf_ptr, masked_ptr, tau_ptr, low_ptr, commit_ptr, K, BLOCK: tl.constexpr):
    """Runs of masked positions are numbered by the running count of run starts; a position is
    its run's pick if no masked position of the same run beats it."""
    cols, keep, masked, conf = _load_block(conf_ptr, masked_ptr, K, BLOCK)
    row = tl.program_id(0)
    tau, low = tl.load(tau_ptr + row), tl.load(low_ptr + row)
    before = tl.load(masked_ptr + row * K + cols - 1, mask=keep & (cols > 0), other=0)
    run = tl.cumsum((masked & (before == 0)).to(tl.int32), axis=0)
    same_run = (run[:, None] == run[None, :]) & masked[None, :]
    beaten = tl.max((same_run & _beats(conf, cols)).to(tl.int32), axis=1) > 0
    pick = masked & (beaten == 0) & (conf.to(low.dtype) >= low)
    _store_block(commit_ptr, K, cols, keep, pick | _threshold_rule(conf, conf > -float("inf"), tau))


def _commit(kernel, conf: torch.Tensor, masked: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """Launch a commit kernel, one program per row; `params` are per-row [B, 1] tensors already in
    the dtype their comparison uses. -> [B, K] int8, 1 = commit."""
    B, K = conf.shape
    commit = torch.full((B, K), 7, dtype=torch.int8, device=conf.device)  # not 0/1: unwritten shows
    kernel[(B,)](conf.contiguous(), masked.to(torch.int8).contiguous(), *(p.reshape(B).contiguous() for p in params),
                 commit, K, BLOCK=triton.next_power_of_2(K))
    return commit


def threshold_commit(conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """conf [B, K], masked [B, K] bool, tau [B, 1] -> commit [B, K] int8: masked positions at or
    above tau, and always each row's most confident masked position."""
    return _commit(_threshold_commit_kernel, conf, masked, tau.to(conf.dtype))


def factor_commit(conf: torch.Tensor, masked: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule (kernels.reference.factor_commit) -> [B, K] int8."""
    return _commit(_factor_commit_kernel, conf, masked, f.to(torch.promote_types(conf.dtype, f.dtype)))


def hierarchical_commit(conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """dInfer's hierarchical rule (kernels.reference.hierarchical_commit) -> [B, K] int8."""
    return _commit(_hierarchical_commit_kernel, conf, masked, tau.to(conf.dtype),
                   low.to(torch.promote_types(conf.dtype, low.dtype)))


# ---- attention of a block's queries over the KV cache -------------------------------------------


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, H, KV_H, Lq, Lk, scale,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, so_b, so_h, so_l,
                      HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bidirectional attention, online softmax over key blocks. Query head h reads KV head
    h // (H // KV_H); keys with mask 0 are skipped."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // (H // KV_H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :], mask=rows[:, None] < Lq, other=0.0)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = cols < Lk
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * Lk + cols, mask=cols < Lk, other=0) != 0)
        k = tl.load(k_ptr + b * sk_b + kvh * sk_h + cols[:, None] * sk_l + dims[None, :], mask=(cols < Lk)[:, None], other=0.0)
        v = tl.load(v_ptr + b * sk_b + kvh * sk_h + cols[:, None] * sk_l + dims[None, :], mask=(cols < Lk)[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(valid[None, :], scores, -float("inf"))
        new_m = tl.maximum(m, tl.max(scores, axis=1))
        safe_m = tl.where(new_m > -float("inf"), new_m, 0.0)
        p = tl.exp(scores - safe_m[:, None])
        alpha = tl.exp(m - safe_m)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = new_m
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dims[None, :], out.to(q.dtype), mask=rows[:, None] < Lq)


def attention(q, k, v, key_mask, out=None, block_m: int = 32, block_n: int = 64):
    """q [B, H, Lq, D]; k, v [B, KV_H, Lk, D] (views into the cache are fine: the last dim must be
    contiguous); key_mask [B, Lk] bool or None -> [B, H, Lq, D]."""
    B, H, Lq, D = q.shape
    KV_H, Lk = k.shape[1], k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(q) if out is None else out
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q
    grid = (B * H, triton.cdiv(Lq, block_m))
    _attention_kernel[grid](q, k, v, mask, out, H, KV_H, Lq, Lk, D ** -0.5,
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            out.stride(0), out.stride(1), out.stride(2),
                            HAS_MASK=key_mask is not None, D=D, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


KERNELS = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "confidence": confidence, "attention": attention,
           "threshold_commit": threshold_commit, "factor_commit": factor_commit,
           "hierarchical_commit": hierarchical_commit}
