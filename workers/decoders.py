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


class Decoder:
    """A block ends when no position is masked; `end_block` frees per-block state."""

    def block_done(self, step: int, masked_left: torch.Tensor) -> bool:
        return not bool(masked_left.any())

    def end_block(self) -> None:
        pass


class FixedDecoder(Decoder):
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


class ThresholdDecoder(Decoder):
    """Commit every masked position whose confidence is >= tau, and always the most confident one:
    tau_eff = min(tau, best) makes progress without a branch."""

    def __init__(self, params):
        self.tau, self.temperature = params.threshold, params.temperature

    def select(self, logits, masked, step, generators):
        token, conf = predict(logits, self.temperature, generators)
        conf = torch.where(masked, conf, -torch.inf)
        best = conf.max(dim=-1, keepdim=True).values
        return token, masked & (conf >= torch.clamp(best, max=self.tau))


class FactorDecoder(Decoder):
    """Fast-dLLM's factor rule: with the block's confidences sorted c_1 >= c_2 >= ..., commit the
    largest n such that (n + 1)(1 - c_n) < f; always at least one."""

    def __init__(self, params):
        self.f, self.temperature = params.factor, params.temperature

    def select(self, logits, masked, step, generators):
        token, conf = predict(logits, self.temperature, generators)
        conf = torch.where(masked, conf, -torch.inf)
        ordered = torch.sort(conf, dim=-1, descending=True).values
        n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=conf.dtype)
        ok = (n + 1) * (1 - ordered) < self.f
        count = torch.where(ok, n, 0).max(dim=-1, keepdim=True).values.clamp(min=1)
        return token, masked & (_rank(conf) < count)


class HierarchicalDecoder(Decoder):
    """dInfer's hierarchical rule: split the block's masked positions into contiguous runs; commit
    each run's most confident position if it is >= low_threshold, every position >= tau, and the
    block's most confident position."""

    def __init__(self, params):
        self.tau, self.low, self.temperature = params.threshold, params.low_threshold, params.temperature

    def select(self, logits, masked, step, generators):
        token, conf = predict(logits, self.temperature, generators)
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
        run_pick = is_best & (index == first.gather(1, run)) & (conf >= self.low)
        best = conf.max(dim=-1, keepdim=True).values
        return token, masked & (run_pick | (conf >= torch.clamp(best, max=self.tau)))


class CreditDecoder(Decoder):
    """dInfer's credit decoding: a per-block credit over (position, token) accumulates evidence
    across steps; each step credit <- beta * credit + p^gamma at every masked position's predicted
    token, and the threshold rule runs on logits + alpha * log(1 + credit)."""

    def __init__(self, params):
        self.alpha, self.gamma, self.beta = params.credit_alpha, params.credit_gamma, params.credit_beta
        self.threshold = ThresholdDecoder(params)
        self.credit: torch.Tensor | None = None

    def select(self, logits, masked, step, generators):
        if self.credit is None:
            self.credit = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
        token, prob = predict(logits, 0.0, generators)
        self.credit.mul_(self.beta)
        gain = torch.where(masked, prob.pow(self.gamma), 0.0)
        self.credit.scatter_add_(-1, token[..., None], gain[..., None])
        boosted = logits.double() + self.alpha * torch.log1p(self.credit)
        return self.threshold.select(boosted, masked, step, generators)

    def end_block(self) -> None:
        self.credit = None


DECODERS = {
    "fixed": FixedDecoder,
    "threshold": ThresholdDecoder,
    "factor": FactorDecoder,
    "hierarchical": HierarchicalDecoder,
    "credit": CreditDecoder,
}


def make_decoder(params) -> Decoder:
    return DECODERS[params.decoder](params)
