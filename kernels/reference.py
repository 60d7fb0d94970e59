"""Plain-torch reference implementations of every kernel: the CPU path and the oracle for tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dinfer_kernels.moe import ExpertWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in at least fp32, cast back to the input dtype, then scaled."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, H, L, D]; cos, sin: [B, 1, L, D] in the compute dtype."""
    h = x.to(cos.dtype)
    return (h * cos + rotate_half(h) * sin).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).mul_(up)  # in place on silu's fresh output: one buffer fewer


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention without a causal mask. q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D]; key_mask: [B, Lk]
    bool (True = attend), or [B, Lq, Lk] for per-query masks (block-causal models). Grouped KV
    heads are shared by consecutive query heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = (
        None
        if key_mask is None
        else key_mask[:, None, None, :]
        if key_mask.dim() == 2
        else key_mask[:, None]
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    start: int,
    key_mask: torch.Tensor | None,
    write: bool,
) -> torch.Tensor:
    """The fed tokens' queries q [B, H, Lq, D] attend over the cache view cache_k, cache_v
    [B, Hkv, Lk, D] with their own keys/values k, v [B, Hkv, Lq, D] at [start, start + Lq);
    `write` stores k, v into the cache there, otherwise the cache is left untouched."""
    end = start + k.shape[2]
    if write:
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        return attention(q, cache_k, cache_v, key_mask)
    keys = torch.cat([cache_k[:, :, :start], k, cache_k[:, :, end:]], dim=2)
    values = torch.cat([cache_v[:, :, :start], v, cache_v[:, :, end:]], dim=2)
    return attention(q, keys, values, key_mask)


# ---- counter-based noise: a pure function of (seed, position, token), the same on any device ----
# The Triton confidence kernel draws the same numbers (kernels/triton_ops.py, _gumbel), so sampling
# on CUDA and here agree token for token, and a request's noise never depends on its batch-mates.

_M32 = 0xFFFFFFFF
Int32 = TypeVar("Int32", torch.Tensor, int)  # what mix32 takes and gives: a tensor or an int
RANDOM_SCORE_TOKEN = _M32  # the counter random remasking draws at: a token id no vocabulary reaches


def _mul32(x: Int32, c: int) -> Int32:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in 16-bit halves so nothing overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: Int32) -> Int32:
    """A 32-bit integer finaliser (xor-shift-multiply, bijective) on int64 tensors in [0, 2**32),
    or on one Python int there (the same numbers, no tensor: workers.shared.step_seeds)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, positions: int, tokens: torch.Tensor) -> torch.Tensor:
    """seeds [B] int64 (>= 0), `positions` per row, token ids [T] -> float64 [B, positions, T] in
    (0, 1): odd multiples of 2**-24, exact in float32 too. Counter: seed (both 32-bit halves),
    position, token."""
    seeds = seeds.to(torch.int64)
    row = mix32(mix32(seeds & _M32) ^ (seeds >> 32))[:, None, None]
    pos = torch.arange(positions, device=seeds.device, dtype=torch.int64)[None, :, None]
    h = mix32(mix32(row ^ pos) ^ tokens.to(torch.int64)[None, None, :])
    return ((h >> 9) * 2 + 1).double() * 2.0**-24


def exponential(w: torch.Tensor) -> torch.Tensor:
    """-log(1 - w) for w in (0, 1), accurate for small w, where Gumbel-max's winners come from."""
    series = w * (1 + w * (0.5 + w * (1 / 3 + w * 0.25)))
    return torch.where(w < 2.0**-7, series, -torch.log(1 - w))


def gumbel(seeds: torch.Tensor, positions: int, vocab: int, dtype) -> torch.Tensor:
    """Standard Gumbel noise [B, positions, vocab] in `dtype`: -log(E), E ~ Exp(1)."""
    w = uniform(seeds, positions, torch.arange(vocab, device=seeds.device)).to(dtype)
    return -torch.log(exponential(w))


def random_scores(seeds: torch.Tensor, positions: int) -> torch.Tensor:
    """Random remasking's scores: one float64 uniform per (row, position)."""
    return uniform(seeds, positions, torch.tensor([RANDOM_SCORE_TOKEN], device=seeds.device))[
        ..., 0
    ]


def confidence(
    logits: torch.Tensor, temperature: torch.Tensor | None = None, seeds: torch.Tensor | None = None
):
    """logits [B, K, V] -> (token [B, K], its softmax probability [B, K] float64), never keeping a
    softmax tensor: p = exp(logit - logsumexp). Greedy by default; with `temperature` [B] and
    `seeds` [B], Gumbel-max: token = argmax(logit + temperature * gumbel(seed)) (temperature 0 is
    greedy), computed in the logits' dtype promoted to at least float32."""
    if temperature is None:
        top, token = logits.max(dim=-1)
        return token, torch.exp(top.double() - torch.logsumexp(logits.double(), dim=-1))
    if seeds is None:
        raise ValueError("confidence: sampling with a temperature needs seeds [B] (int64)")
    compute = torch.promote_types(logits.dtype, torch.float32)
    B, K, V = logits.shape
    h = logits.to(compute)
    score = h + temperature.to(compute)[:, None, None] * gumbel(seeds, K, V, compute)
    token = score.argmax(dim=-1)
    prob = torch.exp(h.gather(-1, token[..., None])[..., 0] - torch.logsumexp(h, dim=-1))
    return token, prob.double()


def threshold_commit(conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """conf [B, K], masked [B, K] bool, tau [B, 1] -> commit [B, K] bool: every masked position
    with conf >= tau, and always each row's most confident one (tau_eff = min(tau, best))."""
    conf = torch.where(masked, conf, -torch.inf)
    best = conf.max(dim=-1, keepdim=True).values
    return masked & (conf >= torch.minimum(tau.to(conf.dtype), best))


def descending_rank(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending conf, leftmost first among equals (0 = best)."""
    order = torch.sort(-conf, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return ranks


def factor_commit(conf: torch.Tensor, masked: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """conf [B, K], masked [B, K] bool, f [B, 1] -> commit [B, K] bool. Fast-dLLM's factor rule:
    with the masked confidences sorted c_1 >= c_2 >= ..., commit the n most confident (leftmost
    first among equals) for the largest n with (n + 1)(1 - c_n) < f, and always at least one."""
    conf = torch.where(masked, conf, -torch.inf)
    ordered = torch.sort(conf, dim=-1, descending=True).values
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
    ok = (n + 1) * (1 - ordered) < f
    count = torch.where(ok, n, 0).max(dim=-1, keepdim=True).values.clamp(min=1)
    return masked & (descending_rank(conf) < count)


def hierarchical_commit(
    conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor, low: torch.Tensor
) -> torch.Tensor:
    """conf [B, K], masked [B, K] bool, tau, low [B, 1] -> commit [B, K] bool. dInfer's
    hierarchical rule: each contiguous run of masked positions commits its most confident
    position (leftmost among equals) if it is >= low; plus the threshold rule with tau."""
    conf = torch.where(masked, conf, -torch.inf)
    B, K = masked.shape
    starts = masked.clone()
    starts[:, 1:] &= ~masked[:, :-1]
    run = torch.cumsum(starts, dim=-1) * masked  # 1, 2, ... per run; 0 outside runs
    run_best = torch.full((B, K + 1), -torch.inf, dtype=conf.dtype, device=conf.device)
    run_best.scatter_reduce_(1, run, conf, reduce="amax")
    is_best = masked & (conf == run_best.gather(1, run))
    index = torch.arange(K, device=conf.device).expand(B, K)
    first = torch.full((B, K + 1), K, dtype=torch.long, device=conf.device)
    first.scatter_reduce_(1, run, torch.where(is_best, index, K), reduce="amin")
    run_pick = is_best & (index == first.gather(1, run)) & (conf >= low)
    return masked & (run_pick | threshold_commit(conf, conf > -torch.inf, tau))


def confidence_runner_up(
    logits: torch.Tensor,
    current: torch.Tensor,
    temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
):
    """confidence() plus what a token-editing decoder needs: (token, probability, runner-up token,
    its probability, probability of `current` [B, K]), probabilities float64. The runner-up is the
    second token by logit (the lowest among equals), whatever the temperature."""
    token, prob = confidence(logits, temperature, seeds)
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    rest = x.scatter(-1, x.argmax(dim=-1, keepdim=True), -torch.inf)
    second = rest.argmax(dim=-1)
    second_prob = torch.exp(rest.gather(-1, second[..., None])[..., 0] - lse)
    current_prob = torch.exp(x.gather(-1, current[..., None].long())[..., 0] - lse)
    return token, prob, second, second_prob, current_prob


def routed_experts(
    h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{ids[:, j]}(h) for h [N, d], ids and weights [N, k] -> [N, d]
    in weights' dtype; an expert is down(silu(gate h) * up h) (kernels.moe.ExpertWeights).

    The (token, choice) pairs are sorted by expert and each expert runs one matmul over its
    tokens; each pair's output lands in its own row and a token's k rows are summed in choice
    order, with no scatter-add, so the result is deterministic. The counts are read on the host
    (a sync per layer on a GPU): kernels.moe and kernels/triton_moe.py avoid that."""
    N, k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # slots grouped by expert, each group in slot order
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    out = torch.empty(N * k, h.shape[-1], device=h.device, dtype=weights.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n:
            slots = order[start : start + n]
            x = h[slots // k]
            gate, up = F.linear(x, experts.gate[e]), F.linear(x, experts.up[e])
            out[slots] = F.linear(swiglu(gate, up), experts.down[e]).to(out.dtype)
            start += n
    return (out.view(N, k, -1) * weights[..., None]).sum(dim=1)
