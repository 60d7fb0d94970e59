"""Decoders: which masked positions of the current block to commit at each step.

A decoder serves the rows of a batch that chose it, each row with its own parameters (held as
[rows, 1] tensors). `select` sees the rows' block logits [B, K, V] and which positions are still
masked [B, K], and returns predicted tokens and a commit mask using tensor ops only (no host
sync). `done` says which rows have finished the block. A decoder sees logits and the block's
state, never the model. An editing decoder ("joint") may also return committed positions of the
block in its commit mask with a new token (revisions); it reads the block's tokens (`block`).
Each decoder leaves the probability of its predictions in `prob` (what streams show as
confidence).

Adding a decoder: a `Decoder` subclass here (its parameters read from each row's
SamplingParams in `__init__`), one line in `DECODERS`, its name in dinfer_async/params.py's
DECODERS (tests/test_engine_contracts.py checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import dinfer_kernels as kernels
from dinfer_async.params import SamplingParams
from dinfer_kernels.reference import RANDOM_SCORE_TOKEN, descending_rank, uniform
from workers.sampling import local_ids, predict
from workers.shared import transfer_counts

Device = torch.device | str


def _column(values: Sequence[float], device: Device) -> torch.Tensor:
    """Per-row parameters as a [rows, 1] float64 column."""
    return torch.tensor(values, device=device, dtype=torch.float64)[:, None]


def _random_scores(seeds: torch.Tensor, positions: int) -> torch.Tensor:
    """kernels.reference.random_scores without uploading its counter (a fill on the device)."""
    token = torch.full((1,), RANDOM_SCORE_TOKEN, dtype=torch.long, device=seeds.device)
    return uniform(seeds, positions, token)[..., 0]


def _best_or_above(conf: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Positions with conf >= tau, and always the most confident: tau_eff = min(tau, best) makes
    progress without a branch (conf is -inf where nothing may be committed)."""
    return kernels.threshold_commit(conf, conf > -torch.inf, tau)


class Decoder:
    """The rows of a batch that chose one decoder, with their per-row parameters."""

    def __init__(self, params: list[SamplingParams], device: Device):
        self.temperature = torch.tensor(
            [p.temperature for p in params], device=device, dtype=torch.float64
        )
        self.sampling = any(p.temperature > 0 for p in params)  # decided on the host, once
        self.prob: torch.Tensor | None = None  # [B, K] the last prediction's probabilities

    def predict(
        self, logits: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token, self.prob = predict(logits, self.temperature if self.sampling else None, seeds)
        return token, self.prob

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, K, V], masked [B, K], steps [B] each row's step in its block, block
        [B, K] the block's tokens -> (predicted token [B, K], commit [B, K] bool: the positions
        that take the predicted token)."""
        raise NotImplementedError

    def done(self, steps: torch.Tensor, masked_left: torch.Tensor) -> torch.Tensor:
        """[rows] bool: which rows finished the block after `steps` [rows] steps."""
        return ~masked_left.any(-1)

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` (indices into this decoder's rows) stay: slice every per-row tensor."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[rows])

    def extend(self, other: Decoder) -> None:
        """`other`'s rows (the same decoder, rows starting their block) follow these: every
        per-row tensor concatenated; a state one side has not made yet (None) is zeros for its
        rows, as a fresh block's state is; host flags are or-ed."""
        mine, theirs = len(self.temperature), len(other.temperature)
        for name, a in vars(self).items():
            b = getattr(other, name)
            if isinstance(a, bool):
                setattr(self, name, a or b)
            elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                like = a if isinstance(a, torch.Tensor) else b
                a = like.new_zeros(mine, *like.shape[1:]) if a is None else a
                b = like.new_zeros(theirs, *like.shape[1:]) if b is None else b
                setattr(self, name, torch.cat([a, b]))

    def end_block(self) -> None:
        pass


class FixedDecoder(Decoder):
    """LLaDA's rule: a fixed number of commits per step, the most confident (or random) first."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        K = params[0].block_length
        per_block = [p.total_steps // p.num_blocks for p in params]
        width = max(per_block)
        self.counts = torch.tensor(
            [transfer_counts(K, n) + [0] * (width - n) for n in per_block], device=device
        )
        self.steps = torch.tensor(per_block, device=device)
        self.random = torch.tensor([p.remasking == "random" for p in params], device=device)
        self.any_random = any(p.remasking == "random" for p in params)  # decided on the host, once

    def done(self, steps: torch.Tensor, masked_left: torch.Tensor) -> torch.Tensor:
        # its schedule's steps, or sooner when none is left to commit (more steps than positions)
        return (self.steps <= steps) | ~masked_left.any(-1)

    def extend(self, other: Decoder) -> None:
        assert isinstance(other, FixedDecoder)
        width = max(self.counts.shape[1], other.counts.shape[1])  # schedules padded with 0
        self.counts = F.pad(self.counts, (0, width - self.counts.shape[1]))
        other.counts = F.pad(other.counts, (0, width - other.counts.shape[1]))
        super().extend(other)

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token, score = self.predict(logits, seeds)
        if self.any_random:
            score = torch.where(self.random[:, None], _random_scores(seeds, masked.shape[1]), score)
        score = torch.where(masked, score, -torch.inf)
        width = self.counts.shape[1]  # a row past its schedule commits nothing
        count = self.counts.gather(1, steps.clamp(max=width - 1)[:, None])
        count = torch.where(steps[:, None] < width, count, 0)
        return token, masked & (descending_rank(score) < count)


class ThresholdDecoder(Decoder):
    """Commit every masked position whose confidence is >= tau, and at least the most confident."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        self.tau = _column([p.threshold for p in params], device)

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token, conf = self.predict(logits, seeds)
        conf = torch.where(masked, conf, -torch.inf)
        return token, masked & _best_or_above(conf, self.tau)


class FactorDecoder(Decoder):
    """Fast-dLLM's factor rule: with the block's confidences sorted c_1 >= c_2 >= ..., commit the
    largest n such that (n + 1)(1 - c_n) < f; always at least one."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        self.f = _column([p.factor for p in params], device)

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token, conf = self.predict(logits, seeds)
        return token, kernels.factor_commit(conf, masked, self.f)


class HierarchicalDecoder(Decoder):
    """dInfer's hierarchical rule: split the block's masked positions into contiguous runs; commit
    each run's most confident position if it is >= low_threshold, every position >= tau, and the
    block's most confident position."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        self.tau = _column([p.threshold for p in params], device)
        self.low = _column([p.low_threshold for p in params], device)

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token, conf = self.predict(logits, seeds)
        return token, kernels.hierarchical_commit(conf, masked, self.tau, self.low)


class CreditDecoder(Decoder):
    """dInfer's credit decoding: a per-block credit over (position, token) accumulates evidence
    across steps; each step credit <- beta * credit + p^gamma at every masked position's predicted
    token, and the threshold rule runs on logits + alpha * log(1 + credit)."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        self.tau = _column([p.threshold for p in params], device)
        self.alpha = _column([p.credit_alpha for p in params], device)[..., None]
        self.gamma = _column([p.credit_gamma for p in params], device)
        self.beta = _column([p.credit_beta for p in params], device)[..., None]
        self.credit: torch.Tensor | None = None

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.credit is None:
            self.credit = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
        token, prob = predict(logits, None, seeds)
        self.credit.mul_(self.beta)
        gain = torch.where(masked, prob.pow(self.gamma), 0.0)
        column, held = local_ids(token, logits.shape[-1])  # a vocabulary shard: its own ids
        self.credit.scatter_add_(-1, column[..., None], torch.where(held, gain, 0.0)[..., None])
        boosted = logits.double() + self.alpha * torch.log1p(self.credit)
        token, conf = self.predict(boosted, seeds)
        conf = torch.where(masked, conf, -torch.inf)
        return token, masked & _best_or_above(conf, self.tau)

    def end_block(self) -> None:
        self.credit = None


class JointDecoder(Decoder):
    """LLaDA2.1's joint threshold decoding (SGLang's JointThreshold): each step commits masked
    positions as `threshold` does (mask-to-token) and replaces each position committed earlier in
    the block whose predicted token differs from its token with probability > edit_threshold
    (token-to-token). Once the block has no mask, steps are edit rounds: the block ends after a
    round without edits or after max_edit_steps rounds (0: it ends when the last mask commits).
    The prompt's tail in a block-causal model's first block is never edited."""

    def __init__(self, params: list[SamplingParams], device: Device):
        super().__init__(params, device)
        self.tau = _column([p.threshold for p in params], device)
        self.edit_tau = _column([p.edit_threshold for p in params], device)
        self.max_rounds = torch.tensor([p.max_edit_steps for p in params], device=device)
        rows = len(params)
        self.rounds = torch.zeros(rows, dtype=torch.long, device=device)
        self.edited = torch.zeros(rows, dtype=torch.bool, device=device)
        self.editable: torch.Tensor | None = None  # [B, K] masked when the block began

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if block is None:
            raise ValueError("the joint decoder needs the block's tokens (block=)")
        if self.editable is None:
            self.editable = masked.clone()
        else:  # rows at their block's first step: what is masked now is editable
            self.editable = torch.where(steps[:, None] == 0, masked, self.editable)
        token, conf = self.predict(logits, seeds)
        self.rounds += ~masked.any(-1)  # a step that starts with no mask is an edit round
        commit = masked & _best_or_above(torch.where(masked, conf, -torch.inf), self.tau)
        edit = self.editable & ~masked & (token != block) & (conf > self.edit_tau)
        self.edited = edit.any(-1)
        return token, commit | edit

    def done(self, steps: torch.Tensor, masked_left: torch.Tensor) -> torch.Tensor:
        filled = ~masked_left.any(-1)
        # a round that edited nothing ends the block; so does the last allowed round
        quiet = (self.rounds > 0) & ~self.edited
        return filled & (quiet | (self.rounds >= self.max_rounds))

    def end_block(self) -> None:
        self.editable = None
        self.rounds.zero_()
        self.edited.zero_()


# name (SamplingParams.decoder, listed in dinfer_async.params.DECODERS) -> class
DECODERS: dict[str, type[Decoder]] = {
    "fixed": FixedDecoder,
    "threshold": ThresholdDecoder,
    "factor": FactorDecoder,
    "hierarchical": HierarchicalDecoder,
    "credit": CreditDecoder,
    "joint": JointDecoder,
}


class DecoderSet:
    """The decoders of a batch: rows grouped by decoder name, each group decoded by one object."""

    def __init__(self, params: list[SamplingParams], device: Device):
        self.device = device
        self.confidence: torch.Tensor | None = None  # [B, K] after select
        self.groups: list[tuple[torch.Tensor, Decoder]] = []
        self.rows = 0
        self.join(params)

    def join(self, params: list[SamplingParams]) -> None:
        """Rows with `params`, starting their block, follow the present ones (a decoder of
        their name takes them on, or a new one)."""
        first, self.rows = self.rows, self.rows + len(params)
        for name in sorted({p.decoder for p in params}):
            rows = [first + i for i, p in enumerate(params) if p.decoder == name]
            index = torch.tensor(rows, device=self.device)
            decoder = DECODERS[name]([params[r - first] for r in rows], self.device)
            for i, (present, same) in enumerate(self.groups):
                if type(same) is type(decoder):
                    same.extend(decoder)
                    self.groups[i] = (torch.cat([present, index]), same)
                    break
            else:
                self.groups.append((index, decoder))

    def select(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        steps: torch.Tensor,
        seeds: torch.Tensor,
        block: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's rows through its decoder (see Decoder.select); `confidence` [B, K] holds
        the probabilities of their predictions."""
        if len(self.groups) == 1:  # the common case: one decoder for the whole batch
            decoder = self.groups[0][1]
            token, commit = decoder.select(logits, masked, steps, seeds, block)
            self.confidence = decoder.prob
            return token, commit
        token = torch.empty(masked.shape, dtype=torch.long, device=masked.device)
        commit = torch.zeros_like(masked)
        confidence = torch.zeros(masked.shape, dtype=torch.float64, device=masked.device)
        for index, decoder in self.groups:
            rows = (logits[index], masked[index], steps[index], seeds[index], block[index])
            t, c = decoder.select(*rows)
            token[index], commit[index] = t, c
            if decoder.prob is not None:
                confidence[index] = decoder.prob
        self.confidence = confidence
        return token, commit

    def done(self, steps: torch.Tensor, masked_left: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0][1].done(steps, masked_left)
        out = torch.zeros(masked_left.shape[0], dtype=torch.bool, device=masked_left.device)
        for index, decoder in self.groups:
            out[index] = decoder.done(steps[index], masked_left[index])
        return out

    def end_block(self) -> None:
        for _, decoder in self.groups:
            decoder.end_block()

    def keep(self, rows: torch.Tensor) -> None:
        """Only batch `rows` stay (in that order); groups renumber their rows."""
        new_position = {r: i for i, r in enumerate(rows.tolist())}
        groups = []
        for index, decoder in self.groups:
            local = [j for j, r in enumerate(index.tolist()) if r in new_position]
            if not local:
                continue
            decoder.keep(torch.tensor(local, device=self.device))
            remapped = [new_position[index[j].item()] for j in local]
            groups.append((torch.tensor(remapped, device=self.device), decoder))
        self.groups = groups
        self.rows = len(new_position)
