"""From a block's logits to predictions: token and confidence per position.

Shared by every decoder so they all sample the same way as the reference sampler
(workers/reference.py): Gumbel-max with counter-based noise (kernels.reference.gumbel; the same
numbers inside the Triton confidence kernel). A request's noise at a step is keyed by
`step_seeds(block_seed(seed, block), step)` (workers/shared.py), so it never depends on its
batch-mates, and the keys are derived on the device: no per-step upload.
"""

from __future__ import annotations

import torch

import dinfer_kernels as kernels


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
