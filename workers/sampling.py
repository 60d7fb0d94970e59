"""From a block's logits to predictions: token and confidence per position.

Shared by every decoder so they all sample the same way as the reference sampler
(workers/reference.py): mask token never predicted, optional EOS suppression, Gumbel-max with
counter-based noise (kernels.reference.gumbel; the same numbers inside the Triton confidence
kernel). A request's noise at a step is keyed by `step_seeds(block_seed(seed, block), step)`,
so it never depends on its batch-mates, and the keys are derived on the device: no per-step
upload.
"""

from __future__ import annotations

import torch

import dinfer_kernels as kernels
from dinfer_kernels.reference import mix32


def block_seed(seed: int, block: int) -> int:
    """A request's key for one block, in [0, 2**63) (splitmix64 mixing, on the host once per block)."""
    x = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def step_seeds(block_seeds: torch.Tensor, step: int) -> torch.Tensor:
    """[B] int64 block keys -> [B] int64 keys of `step` (in [0, 2**63)), with tensor ops only."""
    s = int(mix32(torch.tensor(step + 0x632BE5AB)))
    lo = mix32((block_seeds & 0xFFFFFFFF) ^ s)
    hi = mix32((block_seeds >> 32) ^ lo ^ 0x9E3779B9) & 0x7FFFFFFF
    return (hi << 32) | lo


def forbid_tokens(
    logits: torch.Tensor, mask_id: int, eos_id: int, suppress_eos: torch.Tensor | None
) -> torch.Tensor:
    """Never predict the mask token; never predict EOS on rows whose `suppress_eos` [B] is set
    (None: no row suppresses EOS)."""
    logits[..., mask_id] = -torch.inf
    if suppress_eos is not None:
        logits[suppress_eos, :, eos_id] = -torch.inf
    return logits


def predict(
    logits: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, V] -> (token [B, K], probability of that token [B, K] float64).

    `temperature` [B] (None when every row is greedy; 0 rows take the argmax), `seeds` [B] the
    rows' step keys."""
    token, prob = kernels.confidence(
        logits, temperature, seeds if temperature is not None else None
    )
    # a NaN confidence (a broken model or checkpoint) would never pass "the best one commits"
    # and a block would step forever; as 0 it still lets every step commit something
    return token, torch.nan_to_num(prob, nan=0.0)
