"""Naive reference formulas shared by the model tests: loops and plain arithmetic, one row or one
token at a time, sharing no code with `workers` or `kernels`, so a wrong sign, pairing or skipped
weight in the models shows as a mismatch. Each model test composes its own forward from these."""

from __future__ import annotations

import math

import torch


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, row by row."""
    rows = [x[i] / math.sqrt(float((x[i] * x[i]).mean()) + eps) for i in range(x.shape[0])]
    return torch.stack(rows) * weight


def naive_rope(
    x: torch.Tensor, positions: list[int], theta: float, rot: int | None = None
) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + rot/2]), i < rot/2, of the vector at position p by the angle
    p * theta^(-2i/rot); rot defaults to the whole width, and dims >= rot are left untouched."""
    rot = x.shape[1] if rot is None else rot
    half = rot // 2
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(half):
            angle = positions[t] * theta ** (-(2 * i) / rot)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * c - b * s
            out[t, i + half] = b * c + a * s
    return out


def naive_softmax(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_attention_head(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """One head: softmax(q k^T / sqrt(D)) v; keys outside `allowed` ([Lk] or [Lq, Lk]) hidden."""
    scores = (q @ k.T) / math.sqrt(q.shape[-1])
    if allowed.dim() == 1:
        scores[:, ~allowed] = -math.inf
    else:
        scores[~allowed] = -math.inf
    return naive_softmax(scores) @ v


def naive_swiglu(h: torch.Tensor, w: dict, prefix: str) -> torch.Tensor:
    """silu(h W_gate^T) * (h W_up^T) W_down^T from the Hugging Face names
    gate_proj/up_proj/down_proj."""
    gate, up = h @ w[prefix + "gate_proj.weight"].T, h @ w[prefix + "up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ w[prefix + "down_proj.weight"].T
