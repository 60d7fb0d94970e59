"""What the engine and the reference sampler (workers/reference.py) must agree on, in one place.

Both import these; neither imports the other. An answer ends before its first EOS; LLaDA's
schedule spreads a block's commits over its steps as evenly as possible; a block-causal model
(LLaDA2) attends within its block and to earlier blocks; random numbers are keyed per request,
block and step; the mask token is never predicted and EOS only where allowed.
"""

from __future__ import annotations

import torch

from dinfer_kernels.reference import mix32
from workers.parallel.group import current


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """A generated window's answer: the ids before the first EOS (all of them without one)."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def transfer_counts(masked: int, steps: int) -> list[int]:
    """How many positions each of `steps` steps commits, `masked` in all (LLaDA's schedule)."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def block_causal_mask(
    positions_q: torch.Tensor,
    positions_k: torch.Tensor,
    block_length: int,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Lq, Lk] bool: a query sees every key of its own block and of earlier blocks, blocks
    being position // block_length (LLaDA2's block-diffusion mask); `key_mask` [B, Lk] hides
    padding."""
    q_block = torch.div(positions_q, block_length, rounding_mode="floor")
    k_block = torch.div(positions_k, block_length, rounding_mode="floor")
    mask = k_block[:, None, :] <= q_block[:, :, None]
    return mask if key_mask is None else mask & key_mask[:, None, :].bool()


def block_seed(seed: int, block: int) -> int:
    """A request's key for one block, in [0, 2**63) (splitmix64 mixing, on the host once per
    block)."""
    x = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


def step_seeds(block_seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """[B] int64 block keys -> [B] int64 keys of `step` (one for every row, or [B] each row's),
    in [0, 2**63), with tensor ops only."""
    # a Python int (no tensor, no sync) or the rows' steps; two calls for mix32's type variable
    s = mix32(step + 0x632BE5AB) if isinstance(step, int) else mix32(step + 0x632BE5AB)
    lo = mix32((block_seeds & 0xFFFFFFFF) ^ s)
    hi = mix32((block_seeds >> 32) ^ lo ^ 0x9E3779B9) & 0x7FFFFFFF
    return (hi << 32) | lo


def forbid_tokens(
    logits: torch.Tensor, mask_id: int, eos_id: int, suppress_eos: torch.Tensor | None
) -> torch.Tensor:
    """Never predict the mask token; never predict EOS on rows whose `suppress_eos` [B] is set
    (None: no row suppresses EOS). In place; returns `logits` [B, L, V]. Under tensor parallel
    the logits are a vocabulary shard (workers.parallel): each rank forbids the ids it holds."""
    tp = current()
    first = 0 if tp is None else tp.vocab_start
    if 0 <= mask_id - first < logits.shape[-1]:
        logits[..., mask_id - first] = -torch.inf
    if suppress_eos is not None and 0 <= eos_id - first < logits.shape[-1]:
        column = logits[..., eos_id - first]  # a view; a masked write, not a boolean index
        column.copy_(torch.where(suppress_eos[:, None], -torch.inf, column))
    return logits
