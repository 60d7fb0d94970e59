"""Triton kernels for the hot path of a diffusion step. Registered with the dispatcher
(kernels/__init__.py) for CUDA tensors; each has a torch reference in kernels/reference.py and a
test against it (tests/test_kernels.py, run under TRITON_INTERPRET=1 on CPU).

Shapes follow the references: rows are flattened leading dimensions, the last dimension is
contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from dinfer_kernels import reference, triton_moe
from dinfer_kernels.options import options


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# ---- RMSNorm (optionally fused with the residual add) -----------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
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


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out=None,
):
    """RMSNorm of x (or of x + residual, returning (normed, x + residual)). `out` may be given
    (tests pass NaN-filled ones to catch unwritten elements)."""
    rows = _rows(x)
    out = torch.empty_like(rows) if out is None else out.view(rows.shape)
    total = torch.empty_like(rows) if residual is not None else out
    res = _rows(residual) if residual is not None else rows
    block = triton.next_power_of_2(rows.shape[1])
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res, weight, out, total, rows.shape[1], eps, HAS_RES=residual is not None, BLOCK=block
    )
    out = out.view(x.shape)
    return out if residual is None else (out, total.view(x.shape))


# ---- SwiGLU -------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n"])
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


@triton.jit(do_not_specialize=["length"])
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    heads,
    length,
    half,
    sx_b,
    sx_h,
    sx_l,
    so_b,
    so_h,
    so_l,
    BLOCK: tl.constexpr,
):
    # one program per (batch, head, position); x and out strided, cos/sin contiguous [B, 1, L, D]
    pid = tl.program_id(0)
    pos = pid % length
    h = (pid // length) % heads
    b = pid // (length * heads)
    cols = tl.arange(0, BLOCK)
    keep = cols < half
    src = x_ptr + b * sx_b + h * sx_h + pos * sx_l
    dst = out_ptr + b * so_b + h * so_h + pos * so_l
    trig = (b * length + pos) * 2 * half
    x1 = tl.load(src + cols, mask=keep, other=0.0)
    x2 = tl.load(src + half + cols, mask=keep, other=0.0)
    c1 = tl.load(cos_ptr + trig + cols, mask=keep, other=0.0)
    c2 = tl.load(cos_ptr + trig + half + cols, mask=keep, other=0.0)
    s1 = tl.load(sin_ptr + trig + cols, mask=keep, other=0.0)
    s2 = tl.load(sin_ptr + trig + half + cols, mask=keep, other=0.0)
    h1, h2 = x1.to(c1.dtype), x2.to(c1.dtype)
    tl.store(dst + cols, (h1 * c1 - h2 * s1).to(x1.dtype), mask=keep)
    tl.store(dst + half + cols, (h2 * c2 + h1 * s2).to(x1.dtype), mask=keep)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out=None) -> torch.Tensor:
    """x [B, H, L, D] with a contiguous last dimension; cos, sin [B, 1, L, D] (the compute dtype).
    A head-transposed projection is read in place and the output keeps x's layout (no copies)."""
    B, H, L, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, 1, L, D).contiguous(), sin.expand(B, 1, L, D).contiguous()
    out = torch.empty_like(x) if out is None else out
    _rope_kernel[(B * H * L,)](
        x,
        cos,
        sin,
        out,
        H,
        L,
        D // 2,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK=triton.next_power_of_2(D // 2),
    )
    return out


# ---- confidence: top-1 token and its probability, the vocabulary split over programs ----------
# Pass 1 runs one program per (row, split of the vocabulary) and keeps, online over chunks, the
# split's max logit m, sum of exp(l - m) s, the winner (the max logit, or with sampling the max of
# l + temperature * gumbel, lowest token on ties) and with EXTRA the runner-up by logit and the
# logit of a given current token. With one split it writes the answer directly (one program per
# row); otherwise pass 2 merges each row's partials (lower splits hold lower tokens, so "lowest
# token among equals" is the same rule as torch's argmax).

_PARTS = 6  # float partials per (row, split): m, s, winner score, winner logit, runner-up, current
_PART_TOKENS = 3  # token partials: winner, top-1 by logit, runner-up by logit


@triton.jit
def _mix32(x):
    """kernels.reference.mix32 on uint32 (multiplies wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel(position_hash, cols, COMPUTE: tl.constexpr):
    """kernels.reference.gumbel for one position's tokens `cols`: -log(E), E = -log(1 - w)."""
    h = _mix32(position_hash ^ cols.to(tl.uint32))
    w = (((h >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08).to(COMPUTE)  # * 2**-24, exact
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))
    e = tl.where(w < 0.0078125, series, -tl.log(1.0 - w))
    return -tl.log(e)


@triton.jit
def _first(values, tokens, best, none):
    """The lowest token among `tokens` whose value equals `best` (`none` where there is none)."""
    return tl.min(tl.where(values == best, tokens, none), axis=0)


@triton.jit
def _confidence_kernel(
    logits_ptr,
    temp_ptr,
    seed_ptr,
    current_ptr,
    token_ptr,
    prob_ptr,
    second_ptr,
    second_prob_ptr,
    current_prob_ptr,
    part_ptr,
    part_token_ptr,
    vocab,
    split_size,
    positions,
    n_parts,
    CHUNK: tl.constexpr,
    SAMPLE: tl.constexpr,
    EXTRA: tl.constexpr,
    FINAL: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * vocab
    lo = split * split_size
    hi = tl.minimum(lo + split_size, vocab)
    m = tl.full((), -float("inf"), COMPUTE)
    s = tl.zeros((), COMPUTE)
    top = lo.to(tl.int64)  # the max logit's token (the first one while all are -inf)
    best_score = tl.full((), -float("inf"), COMPUTE)
    best_logit = tl.full((), -float("inf"), COMPUTE)
    best = lo.to(tl.int64)
    second = tl.full((), -float("inf"), COMPUTE)
    second_token = lo.to(tl.int64)
    current_logit = tl.full((), -float("inf"), COMPUTE)
    current = -1
    if EXTRA:
        current = tl.load(current_ptr + row)
    if SAMPLE:
        request = row // positions
        temperature = tl.load(temp_ptr + request).to(COMPUTE)
        seed = tl.load(seed_ptr + request)
        seed_hash = _mix32(_mix32((seed & 0xFFFFFFFF).to(tl.uint32)) ^ (seed >> 32).to(tl.uint32))
        position_hash = _mix32(seed_hash ^ (row % positions).to(tl.uint32))
    for start in range(lo, hi, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        keep = cols < hi
        x = tl.load(base + cols, mask=keep, other=-float("inf")).to(COMPUTE)
        cmax = tl.max(x, axis=0)
        xarg = (tl.argmax(x, axis=0) + start).to(tl.int64)
        if SAMPLE:  # the chunk's best noisy score, its token and that token's own logit
            score = tl.where(
                keep, x + temperature * _gumbel(position_hash, cols, COMPUTE), -float("inf")
            )
            cbest = tl.max(score, axis=0)
            carg = (tl.argmax(score, axis=0) + start).to(tl.int64)
            clogit = tl.max(tl.where(cols == carg, x, -float("inf")), axis=0)
            better = cbest > best_score
            best = tl.where(better, carg, best)
            best_logit = tl.where(better, clogit, best_logit)
            best_score = tl.maximum(best_score, cbest)
        if EXTRA:  # runner-up by logit: the better of the old pair and the chunk's pair
            rest = tl.where(cols == xarg, -float("inf"), x)
            csecond = tl.max(rest, axis=0)
            csecond_token = (tl.argmax(rest, axis=0) + start).to(tl.int64)
            # the chunk's max leads: old top-1 vs the chunk's runner-up; else the old top-1
            # stays: old runner-up vs the chunk's max (the old one, a lower token, wins ties)
            lead = cmax > m
            second_token = tl.where(
                lead,
                tl.where(m >= csecond, top, csecond_token),
                tl.where(second >= cmax, second_token, xarg),
            )
            second = tl.where(lead, tl.maximum(m, csecond), tl.maximum(second, cmax))
            current_logit = tl.maximum(
                current_logit, tl.max(tl.where(cols == current, x, -float("inf")), axis=0)
            )
        new_m = tl.maximum(m, cmax)
        top = tl.where(cmax > m, xarg, top)
        scale = tl.where(new_m > -float("inf"), tl.exp(m - new_m), 0.0)
        e = tl.where(x > -float("inf"), tl.exp(x - new_m), 0.0)
        s = s * scale + tl.sum(e, axis=0)
        m = new_m
    if not SAMPLE:  # greedy: the winner is the max logit
        best, best_logit, best_score = top, m, m
    if FINAL:
        lse = m + tl.log(s)
        tl.store(token_ptr + row, best)
        tl.store(prob_ptr + row, tl.exp(best_logit - lse))
        if EXTRA:
            tl.store(second_ptr + row, second_token)
            tl.store(second_prob_ptr + row, tl.exp(second - lse))
            tl.store(current_prob_ptr + row, tl.exp(current_logit - lse))
    else:
        part = row * n_parts + split
        stride = tl.num_programs(0) * n_parts
        tl.store(part_ptr + part, m)
        tl.store(part_ptr + stride + part, s)
        tl.store(part_ptr + 2 * stride + part, best_score)
        tl.store(part_ptr + 3 * stride + part, best_logit)
        tl.store(part_ptr + 4 * stride + part, second)
        tl.store(part_ptr + 5 * stride + part, current_logit)
        tl.store(part_token_ptr + part, best)
        tl.store(part_token_ptr + stride + part, top)
        tl.store(part_token_ptr + 2 * stride + part, second_token)


@triton.jit
def _confidence_merge_kernel(
    part_ptr,
    part_token_ptr,
    token_ptr,
    prob_ptr,
    second_ptr,
    second_prob_ptr,
    current_prob_ptr,
    n_parts,
    vocab,
    PARTS: tl.constexpr,
    EXTRA: tl.constexpr,
):
    """One program per row over its n_parts partials (PARTS >= n_parts, a power of two)."""
    row = tl.program_id(0)
    idx = tl.arange(0, PARTS)
    keep = idx < n_parts
    part = row * n_parts + idx
    stride = tl.num_programs(0) * n_parts
    m = tl.load(part_ptr + part, mask=keep, other=-float("inf"))
    s = tl.load(part_ptr + stride + part, mask=keep, other=0.0)
    score = tl.load(part_ptr + 2 * stride + part, mask=keep, other=-float("inf"))
    logit = tl.load(part_ptr + 3 * stride + part, mask=keep, other=-float("inf"))
    best_token = tl.load(part_token_ptr + part, mask=keep, other=vocab)
    big_m = tl.max(m, axis=0)
    scale = tl.where(m > -float("inf"), tl.exp(m - big_m), 0.0)
    lse = big_m + tl.log(tl.sum(s * scale, axis=0))
    best_score = tl.max(score, axis=0)
    token = _first(score, best_token, best_score, vocab)
    best_logit = tl.max(tl.where(best_token == token, logit, -float("inf")), axis=0)
    tl.store(token_ptr + row, token)
    tl.store(prob_ptr + row, tl.exp(best_logit - lse))
    if EXTRA:
        top = tl.load(part_token_ptr + stride + part, mask=keep, other=vocab)
        second = tl.load(part_ptr + 4 * stride + part, mask=keep, other=-float("inf"))
        second_token = tl.load(part_token_ptr + 2 * stride + part, mask=keep, other=vocab)
        current = tl.load(part_ptr + 5 * stride + part, mask=keep, other=-float("inf"))
        top_token = _first(m, top, big_m, vocab)
        # runner-up: every split's runner-up, and every split's top-1 but the overall one
        other = tl.where(top == top_token, -float("inf"), m)
        runner = tl.maximum(tl.max(second, axis=0), tl.max(other, axis=0))
        runner_token = tl.minimum(
            _first(second, second_token, runner, vocab), _first(other, top, runner, vocab)
        )
        tl.store(second_ptr + row, runner_token)
        tl.store(second_prob_ptr + row, tl.exp(runner - lse))
        tl.store(current_prob_ptr + row, tl.exp(tl.max(current, axis=0) - lse))


def confidence_splits(rows: int, vocab: int, sms: int, chunk: int) -> int:
    """How many programs share one row's vocabulary: 1 (one program per row, no merge pass) once
    the rows alone give every SM at least two programs; otherwise enough splits for about four
    programs per SM, each split at least two chunks long, so the merge stays small."""
    if rows >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, rows), triton.cdiv(vocab, 2 * chunk)))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def confidence_full(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    current: torch.Tensor | None = None,
    chunk: int = 2048,
    splits: int | None = None,
    fill: float | None = None,
):
    """logits [..., K, V] -> per position (token, its probability) and, when `current` (token ids
    shaped like logits.shape[:-1]) is given, also (runner-up token by logit, its probability,
    the probability of `current`): what a token-editing decoder needs, off by default so the
    greedy path does no extra work. Greedy, or Gumbel-max with `temperature` [B] and `seeds` [B]
    int64 per request (kernels.reference.confidence); the runner-up ranks the logits themselves,
    whatever the temperature. Probabilities in float32 (float64 for float64 logits).

    `splits`: programs per row (None: chosen by confidence_splits on CUDA when
    kernels.options.confidence_split is on, else 1). `fill` pre-fills the outputs (tests)."""
    rows = _rows(logits)
    n, vocab = rows.shape
    positions = logits.shape[-2] if logits.dim() > 1 else 1
    compute = torch.promote_types(logits.dtype, torch.float32)
    dev = rows.device
    if splits is None:
        splits = 1
        if rows.is_cuda and options.confidence_split:
            splits = confidence_splits(n, vocab, _sm_count(dev), chunk)
    split_size = triton.cdiv(triton.cdiv(vocab, splits), chunk) * chunk
    splits = triton.cdiv(vocab, split_size)  # no empty split
    nan = float("nan") if fill is None else fill
    token = torch.full((n,), -1 if fill is None else int(fill), dtype=torch.long, device=dev)
    prob = torch.full((n,), nan, dtype=compute, device=dev)
    extra = current is not None
    second, second_prob, current_prob = token, prob, prob  # unread unless EXTRA
    if extra:
        second = token.clone()
        second_prob, current_prob = prob.clone(), prob.clone()
    sample = temperature is not None
    if sample and seeds is None:
        raise ValueError("confidence: sampling with a temperature needs seeds [B] (int64)")
    temp = temperature.to(compute).contiguous() if temperature is not None else prob
    seed = seeds.to(torch.int64).contiguous() if seeds is not None and sample else token
    cur = current.reshape(-1).to(torch.int64).contiguous() if current is not None else token
    final = splits == 1
    parts = torch.empty((_PARTS, n, splits) if not final else 1, dtype=compute, device=dev)
    part_tokens = torch.empty(
        (_PART_TOKENS, n, splits) if not final else 1, dtype=torch.long, device=dev
    )
    kind = tl.float64 if compute == torch.float64 else tl.float32
    outputs = (token, prob, second, second_prob, current_prob)
    _confidence_kernel[(n, splits)](
        rows,
        temp,
        seed,
        cur,
        *outputs,
        parts,
        part_tokens,
        vocab,
        split_size,
        positions,
        splits,
        CHUNK=chunk,
        SAMPLE=sample,
        EXTRA=extra,
        FINAL=final,
        COMPUTE=kind,
    )
    if not final:
        _confidence_merge_kernel[(n,)](
            parts,
            part_tokens,
            *outputs,
            splits,
            vocab,
            PARTS=triton.next_power_of_2(splits),
            EXTRA=extra,
        )
    shape = logits.shape[:-1]
    if not extra:
        return token.view(shape), prob.view(shape)
    return tuple(t.view(shape) for t in outputs)


def confidence(
    logits: torch.Tensor, temperature: torch.Tensor | None = None, seeds: torch.Tensor | None = None
):
    """Dispatcher signature: (token, probability as float64)."""
    token, prob = confidence_full(logits, temperature, seeds)
    return token, prob.double()


def confidence_runner_up(
    logits: torch.Tensor,
    current: torch.Tensor,
    temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
):
    """Dispatcher signature (kernels.reference.confidence_runner_up): token, probability, runner-up
    token, its probability, probability of `current`; probabilities as float64."""
    token, prob, second, second_prob, current_prob = confidence_full(
        logits, temperature, seeds, current=current
    )
    return token, prob.double(), second, second_prob.double(), current_prob.double()


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
def _hierarchical_commit_kernel(
    conf_ptr, masked_ptr, tau_ptr, low_ptr, commit_ptr, K, BLOCK: tl.constexpr
):
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


def _commit(
    kernel, conf: torch.Tensor, masked: torch.Tensor, *params: torch.Tensor
) -> torch.Tensor:
    """Launch a commit kernel, one program per row; `params` are per-row [B, 1] tensors already in
    the dtype their comparison uses. -> [B, K] int8, 1 = commit."""
    B, K = conf.shape
    commit = torch.full((B, K), 7, dtype=torch.int8, device=conf.device)  # not 0/1: unwritten shows
    kernel[(B,)](
        conf.contiguous(),
        masked.to(torch.int8).contiguous(),
        *(p.reshape(B).contiguous() for p in params),
        commit,
        K,
        BLOCK=triton.next_power_of_2(K),
    )
    return commit


def threshold_commit(conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """conf [B, K], masked [B, K] bool, tau [B, 1] -> commit [B, K] int8: masked positions at or
    above tau, and always each row's most confident masked position."""
    return _commit(_threshold_commit_kernel, conf, masked, tau.to(conf.dtype))


def factor_commit(conf: torch.Tensor, masked: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule (kernels.reference.factor_commit) -> [B, K] int8."""
    return _commit(
        _factor_commit_kernel, conf, masked, f.to(torch.promote_types(conf.dtype, f.dtype))
    )


def hierarchical_commit(
    conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor, low: torch.Tensor
) -> torch.Tensor:
    """dInfer's hierarchical rule (kernels.reference.hierarchical_commit) -> [B, K] int8."""
    return _commit(
        _hierarchical_commit_kernel,
        conf,
        masked,
        tau.to(conf.dtype),
        low.to(torch.promote_types(conf.dtype, low.dtype)),
    )


# ---- attention of a block's queries over the KV cache -------------------------------------------


@triton.jit
def _kv_tile(cache, fresh, cols, dims, Lk, start, Lq, sk_l, sn_l, NEW: tl.constexpr):
    """Keys (or values) of columns `cols` [BLOCK_N, D], 0 past Lk: from the cache, except with
    NEW the fed tokens' own at [start, start + Lq), read from `fresh`."""
    in_range = cols < Lk
    if NEW:
        is_fresh = (cols >= start) & (cols < start + Lq)
        old = in_range & ((cols < start) | (cols >= start + Lq))
        tile = tl.load(
            cache + cols[:, None] * sk_l + dims[None, :], mask=old[:, None], other=0.0
        ) + tl.load(
            fresh + (cols - start)[:, None] * sn_l + dims[None, :],
            mask=is_fresh[:, None],
            other=0.0,
        )
    else:
        tile = tl.load(
            cache + cols[:, None] * sk_l + dims[None, :], mask=in_range[:, None], other=0.0
        )
    return tile


@triton.jit(do_not_specialize=["Lq", "Lk", "start"])  # one compiled kernel for every length
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    new_k_ptr,
    new_v_ptr,
    mask_ptr,
    out_ptr,
    H,
    KV_H,
    Lq,
    Lk,
    start,
    scale,
    sq_b,
    sq_h,
    sq_l,
    sk_b,
    sk_h,
    sk_l,
    sn_b,
    sn_h,
    sn_l,
    so_b,
    so_h,
    so_l,
    MASK: tl.constexpr,
    NEW: tl.constexpr,
    WRITE: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bidirectional attention, online softmax over key blocks. Query head h reads KV head
    h // (H // KV_H). MASK: 0 none, 1 per key [B, Lk], 2 per query and key [B, Lq, Lk]. With NEW,
    keys [start, start + Lq) come from the fed tokens' new_k / new_v instead of the cache (so no
    program reads what another writes), and with WRITE the first query tile of each KV head's
    first query head stores them into the cache."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // (H // KV_H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :],
        mask=rows[:, None] < Lq,
        other=0.0,
    )
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    cache_k, cache_v = k_ptr + b * sk_b + kvh * sk_h, v_ptr + b * sk_b + kvh * sk_h
    fresh_k, fresh_v = new_k_ptr + b * sn_b + kvh * sn_h, new_v_ptr + b * sn_b + kvh * sn_h
    for first in range(0, Lk, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        in_range = cols < Lk
        k = _kv_tile(cache_k, fresh_k, cols, dims, Lk, start, Lq, sk_l, sn_l, NEW)
        v = _kv_tile(cache_v, fresh_v, cols, dims, Lk, start, Lq, sk_l, sn_l, NEW)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        if MASK == 1:
            key_ok = in_range & (tl.load(mask_ptr + b * Lk + cols, mask=in_range, other=0) != 0)
            valid = (rows[:, None] >= 0) & key_ok[None, :]
        elif MASK == 2:
            tile = (rows[:, None] < Lq) & in_range[None, :]
            valid = tile & (
                tl.load(
                    mask_ptr + (b * Lq + rows[:, None]) * Lk + cols[None, :], mask=tile, other=0
                )
                != 0
            )
        else:
            valid = (rows[:, None] >= 0) & in_range[None, :]
        scores = tl.where(valid, scores, -float("inf"))
        new_m = tl.maximum(m, tl.max(scores, axis=1))
        safe_m = tl.where(new_m > -float("inf"), new_m, 0.0)
        p = tl.exp(scores - safe_m[:, None])
        alpha = tl.exp(m - safe_m)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = new_m
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(
        out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dims[None, :],
        out.to(q.dtype),
        mask=rows[:, None] < Lq,
    )
    if WRITE:  # noqa: SIM102 (WRITE is a constexpr: `and` would not fold it at compile time)
        if (tl.program_id(1) == 0) & (h % (H // KV_H) == 0):
            for first in range(0, Lq, BLOCK_N):
                pos = first + tl.arange(0, BLOCK_N)
                keep = (pos < Lq)[:, None]
                src = pos[:, None] * sn_l + dims[None, :]
                dst = (start + pos)[:, None] * sk_l + dims[None, :]
                tl.store(cache_k + dst, tl.load(fresh_k + src, mask=keep, other=0.0), mask=keep)
                tl.store(cache_v + dst, tl.load(fresh_v + src, mask=keep, other=0.0), mask=keep)


def _launch_attention(q, k, v, key_mask, new_k, new_v, start, write, out, block_m, block_n):
    B, H, Lq, D = q.shape
    # tl.arange and tl.dot want a power of two >= 16, and Triton's float64 MMA rejects this kernel
    # on NVIDIA ("fp64 don't support largeK MMA", Triton 3.6 on an H200): the reference serves both
    if D < 16 or D & (D - 1) or (q.dtype == torch.float64 and q.is_cuda):
        if new_k is None:
            return reference.attention(q, k, v, key_mask)
        return reference.cached_attention(q, new_k, new_v, k, v, start, key_mask, write)
    KV_H, Lk = k.shape[1], k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        if write:
            raise ValueError(
                "cache: keys and values must share strides with a contiguous last dimension "
                "to be written in place"
            )
        k, v = k.contiguous(), v.contiguous()
    fresh = new_k is not None  # the fed tokens' keys/values come apart from the cache
    if fresh:  # strided views of the projections are read in place when k and v share a layout
        if new_k.stride(-1) != 1 or new_v.stride(-1) != 1 or new_k.stride() != new_v.stride():
            new_k, new_v = new_k.contiguous(), new_v.contiguous()
    else:
        new_k = new_v = k  # unread (NEW=False): any valid pointer
    out = torch.empty_like(q) if out is None else out  # q's layout: [B, L, H, D] in memory stays so
    mask = (
        key_mask.contiguous().view(torch.int8) if key_mask is not None else q
    )  # bool as bytes, no copy
    kind = 0 if key_mask is None else key_mask.dim() - 1
    grid = (B * H, triton.cdiv(Lq, block_m))
    _attention_kernel[grid](
        q,
        k,
        v,
        new_k,
        new_v,
        mask,
        out,
        H,
        KV_H,
        Lq,
        Lk,
        start,
        D**-0.5,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        new_k.stride(0),
        new_k.stride(1),
        new_k.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        MASK=kind,
        NEW=fresh,
        WRITE=write,
        D=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out


def attention(q, k, v, key_mask, out=None, block_m: int = 32, block_n: int = 64):
    """q [B, H, Lq, D]; k, v [B, KV_H, Lk, D] (views into the cache are fine: the last dim must be
    contiguous); key_mask [B, Lk] or [B, Lq, Lk] bool, or None -> [B, H, Lq, D]."""
    return _launch_attention(q, k, v, key_mask, None, None, 0, False, out, block_m, block_n)


def cached_attention(
    q,
    k,
    v,
    cache_k,
    cache_v,
    start: int,
    key_mask,
    write: bool,
    out=None,
    block_m: int = 32,
    block_n: int = 64,
):
    """The fed tokens' queries q [B, H, Lq, D] over the cache view cache_k / cache_v
    [B, KV_H, Lk, D] with the fed tokens' own k, v [B, KV_H, Lq, D] in place at [start, start + Lq);
    `write` stores k, v there in the same launch (kernels.reference.cached_attention)."""
    return _launch_attention(
        q, cache_k, cache_v, key_mask, k, v, start, write, out, block_m, block_n
    )


def add_rms_norm(x, residual, weight, eps):
    """Dispatcher signature: (RMSNorm(x + residual), x + residual) in one launch."""
    return rms_norm(x, weight, eps, residual=residual)


KERNELS: dict[str, Callable[..., Any]] = {
    "routed_experts": triton_moe.routed_experts,
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "swiglu": swiglu,
    "rope": rope,
    "confidence": confidence,
    "confidence_runner_up": confidence_runner_up,
    "attention": attention,
    "cached_attention": cached_attention,
    "threshold_commit": threshold_commit,
    "factor_commit": factor_commit,
    "hierarchical_commit": hierarchical_commit,
}
