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


def forbid_tokens(logits: torch.Tensor, mask_id: int, eos_id: int, suppress_eos: torch.Tensor | None) -> torch.Tensor:
    """Never predict the mask token; never predict EOS on rows whose `suppress_eos` [B] is set
    (None: no row suppresses EOS)."""
    logits[..., mask_id] = -torch.inf
    if suppress_eos is not None:
        logits[suppress_eos, :, eos_id] = -torch.inf
    return logits


def predict(logits: torch.Tensor, temperatures: list[float], generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, V] -> (token [B, K], probability of that token [B, K] float64).

    Rows with temperature 0 take the argmax; the others Gumbel-max in float64 from their generator."""
    token, prob = kernels.confidence(logits)
    compute = torch.promote_types(logits.dtype, torch.float32)
    for i, (t, gen) in enumerate(zip(temperatures, generators, strict=True)):
        if t == 0:
            continue
        row = logits[i]
        u = torch.rand(row.shape, generator=gen, dtype=torch.float64, device=row.device)
        token[i] = (row.double() - t * torch.log(-torch.log(u))).argmax(-1)
        lse = torch.logsumexp(row.to(compute), dim=-1)
        prob[i] = torch.exp(row.gather(-1, token[i][:, None])[:, 0].to(compute) - lse).double()
    # a NaN confidence (a broken model or checkpoint) would never pass "the best one commits"
    # and a block would step forever; as 0 it still lets every step commit something
    return token, torch.nan_to_num(prob, nan=0.0)


def random_scores(width: int, generators: list[torch.Generator], device) -> torch.Tensor:
    """Random remasking's scores: one float64 uniform per position, per request generator."""
    return torch.stack([torch.rand(width, generator=g, dtype=torch.float64, device=device) for g in generators])
