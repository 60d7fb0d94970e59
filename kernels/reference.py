"""Plain-torch reference implementations of every kernel: the CPU path and the oracle for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in at least fp32, cast back to the input dtype, then scaled."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, H, L, D]; cos, sin: [B, 1, L, D] in the compute dtype."""
    h = x.to(cos.dtype)
    return (h * cos + rotate_half(h) * sin).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention without a causal mask. q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D]; key_mask: [B, Lk]
    bool (True = attend), or [B, Lq, Lk] for per-query masks (block-causal models). Grouped KV
    heads are shared by consecutive query heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token and its softmax probability per position, without keeping a softmax tensor:
    p(top1) = exp(max - logsumexp)."""
    top, token = logits.max(dim=-1)
    prob = torch.exp(top.double() - torch.logsumexp(logits.double(), dim=-1))
    return token, prob


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


def hierarchical_commit(conf: torch.Tensor, masked: torch.Tensor, tau: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
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
