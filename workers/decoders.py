"""Decoders: which masked positions of the current block to commit at each step.

A decoder sees a block's logits [B, K, V] and which positions are still masked [B, K], and
returns the predicted tokens and a commit mask, using tensor ops only (no host sync).
"""

from __future__ import annotations

import torch

from workers.reference import transfer_counts
from workers.sampling import predict, random_scores


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending score, leftmost first among equals (as the reference)."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


class FixedDecoder:
    """LLaDA's rule: a fixed number of commits per step, the most confident (or random) first."""

    def __init__(self, params):
        self.steps_per_block = params.total_steps // params.num_blocks
        self.counts = transfer_counts(params.block_length, self.steps_per_block)
        self.temperature, self.remasking = params.temperature, params.remasking

    def block_done(self, step: int, masked_left: torch.Tensor) -> bool:
        return step >= self.steps_per_block

    def select(self, logits, masked, step, generators):
        token, score = predict(logits, self.temperature, generators)
        if self.remasking == "random":
            score = random_scores(masked.shape, generators, masked.device)
        score = torch.where(masked, score, -torch.inf)
        return token, masked & (_rank(score) < self.counts[step])


class ThresholdDecoder:
    """Commit every masked position whose confidence is >= tau, and always the most confident one:
    tau_eff = min(tau, best) makes progress without a branch."""

    def __init__(self, params):
        self.tau, self.temperature = params.threshold, params.temperature

    def block_done(self, step: int, masked_left: torch.Tensor) -> bool:
        return not bool(masked_left.any())

    def select(self, logits, masked, step, generators):
        token, conf = predict(logits, self.temperature, generators)
        conf = torch.where(masked, conf, -torch.inf)
        best = conf.max(dim=-1, keepdim=True).values
        return token, masked & (conf >= torch.clamp(best, max=self.tau))


DECODERS = {"fixed": FixedDecoder, "threshold": ThresholdDecoder}


def make_decoder(params):
    if params.decoder not in DECODERS:
        raise NotImplementedError(
            f"decoder={params.decoder!r} is not implemented yet; available: {sorted(DECODERS)}"
        )
    return DECODERS[params.decoder](params)
