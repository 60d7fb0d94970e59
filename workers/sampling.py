"""From a block's logits to predictions: token and confidence per position.

Shared by every decoder so they all sample the same way as the reference sampler
(workers/reference.py): mask token never predicted, optional EOS suppression, Gumbel-max in
float64 with one generator per request, reseeded at every step by `step_seed`, drawn in the
reference's order.
"""

from __future__ import annotations

import torch

import kernels


def step_seed(seed: int, block: int, step: int) -> int:
    """The seed of a request's random draws at (block, step). Reseeding every step makes a
    request's noise independent of how many steps its batch-mates needed (splitmix64 mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def forbid_tokens(logits: torch.Tensor, mask_id: int, eos_id: int, suppress_eos: bool) -> torch.Tensor:
    logits[..., mask_id] = -torch.inf
    if suppress_eos:
        logits[..., eos_id] = -torch.inf
    return logits


def predict(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, V] -> (token [B, K], probability of that token [B, K] float64)."""
    if temperature == 0:
        return kernels.confidence(logits)
    tokens = []
    for row, gen in zip(logits, generators, strict=True):
        u = torch.rand(row.shape, generator=gen, dtype=torch.float64, device=row.device)
        tokens.append((row.double() - temperature * torch.log(-torch.log(u))).argmax(-1))
    token = torch.stack(tokens)
    compute = torch.promote_types(logits.dtype, torch.float32)
    lse = torch.logsumexp(logits.to(compute), dim=-1)
    prob = torch.exp(logits.gather(-1, token[..., None])[..., 0].to(compute) - lse).double()
    return token, prob


def random_scores(shape, generators: list[torch.Generator], device) -> torch.Tensor:
    """Random remasking's scores: one float64 uniform per position, per request generator."""
    return torch.stack([torch.rand(shape[1], generator=g, dtype=torch.float64, device=device) for g in generators])
