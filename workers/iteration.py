"""The iteration manager: one block of semi-autoregressive denoising over a batch of requests.

A `BlockRound` lays the running requests out so their current blocks share columns, then steps:
the cache manager picks what goes through the model, the decoders pick what to commit, until
every row has finished its block. Rows may be at different blocks of different windows, with
different prompts and decoding parameters; only the block length and cache policy are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.decoders import DecoderSet
from workers.models.llada2 import block_causal_mask
from workers.reference import until_eos
from workers.sampling import block_seed, forbid_tokens, step_seeds


@dataclass
class Sequence:
    """One request's state across rounds.

    `window` holds the positions decoded block by block. Usually it is exactly the gen_length
    answer positions. For block-causal models (LLaDA2) blocks sit at multiples of block_length
    from the first token, as the model was trained: the prompt's last partial block then opens
    the window already committed (`skip` tokens), and the window runs to the end of the block
    holding the last answer position; only [skip, skip + gen_length) is the answer.
    """

    id: object
    prompt: list[int]
    params: object  # SamplingParams, validated
    seed: int
    window: list[int]  # ids decoded block by block; mask until committed
    skip: int = 0  # window positions before the answer (a block-causal prompt's tail)
    block: int = 0  # the block the next round decodes
    forwards: int = 0
    committed: int = 0
    finish_reason: str | None = None
    admitted_at: float = 0.0
    seconds: float = 0.0
    aborted: bool = False
    kv: tuple | None = None  # block-causal models: this request's final keys and values
    kv_len: int = 0  # ... valid for its first kv_len tokens (prompt head + finished blocks)

    @classmethod
    def create(
        cls, id, prompt: list[int], params, seed: int, mask_id: int, block_aligned: bool = False
    ):
        K, tail = params.block_length, len(prompt) % params.block_length if block_aligned else 0
        head, tail_ids = list(prompt[: len(prompt) - tail]), list(prompt[len(prompt) - tail :])
        length = -(-(tail + params.gen_length) // K) * K
        window = tail_ids + [mask_id] * (length - tail)
        return cls(id, head, params, seed, window, skip=tail)

    @property
    def num_blocks(self) -> int:
        return len(self.window) // self.params.block_length

    def span(self, block: int) -> tuple[int, int]:
        """The answer positions of `block`, as window indices [lo, hi)."""
        K = self.params.block_length
        return max(block * K, self.skip), min((block + 1) * K, self.skip + self.params.gen_length)

    def generated(self) -> list[int]:
        return self.window[self.skip : self.skip + self.params.gen_length]

    def answer(self, eos_id: int) -> list[int]:
        """The answer positions up to (not including) the first EOS."""
        return until_eos(self.generated(), eos_id)

    def stats(self, eos_id: int) -> dict:
        tokens = len(self.answer(eos_id))
        return {
            "forwards": self.forwards,  # model calls that still had masked positions of this request
            "tokens": tokens,  # answer tokens before the first EOS
            "committed": self.committed,  # positions committed (EOS padding of decoded blocks included)
            "prompt_tokens": len(self.prompt) + self.skip,  # the prompt's tokens
            "tokens_per_forward": tokens / max(self.forwards, 1),  # answer tokens per forward
            "committed_per_forward": self.committed / max(self.forwards, 1),  # EOS padding included
            "seconds": self.seconds,
            "tokens_per_second": tokens / max(self.seconds, 1e-9),
        }


class Batch:
    """The round's token layout: row i = left padding, prompt and decided blocks, the current
    block at columns [C, C + K), the rest of the window, right padding. RoPE positions start at
    0 on each row's first real token and padding is hidden from attention, so every row computes
    what it would alone."""

    def __init__(self, model, seqs: list[Sequence], mask_id: int, pad_id: int, device):
        self.model, self.mask_id, self.seqs = model, mask_id, seqs
        self.shift = model.logit_shift  # logits of column c predict column c + shift (Dream: 1)
        K = seqs[0].params.block_length
        lefts = [s.prompt + s.window[: s.block * K] for s in seqs]
        # a block-causal model's block never sees what follows it: the round stops at the block
        rights = [[] if model.block_causal else s.window[(s.block + 1) * K :] for s in seqs]
        C, S = max(map(len, lefts)), max(map(len, rights))
        self.block_start, self.block_end, self.length, self.block_length = C, C + K, C + K + S, K
        B = len(seqs)
        self.row_start = [C - len(left) for left in lefts]  # each row's first real column
        self.ids = torch.full((B, self.length), pad_id, dtype=torch.long, device=device)
        self.real = torch.zeros(B, self.length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(B, self.length, dtype=torch.long, device=device)
        self.in_prompt = torch.zeros(B, self.length, dtype=torch.bool, device=device)
        for i, (s, left, right) in enumerate(zip(seqs, lefts, rights)):
            lo, hi = C - len(left), C + K + len(right)
            row = left + s.window[s.block * K : (s.block + 1) * K] + right
            self.ids[i, lo:hi] = torch.tensor(row, device=device)
            self.real[i, lo:hi] = True
            self.positions[i, lo:] = torch.arange(self.length - lo, device=device)
            self.in_prompt[i, lo : lo + len(s.prompt) + s.skip] = True
        self.soft: torch.Tensor | None = None  # [B, K, d] next inputs of the block (soft diffusion)
        self._row_options(seqs)

    def _row_options(self, seqs: list[Sequence]) -> None:
        device = self.ids.device
        scales = [s.params.cfg_scale for s in seqs]
        self.guided = torch.tensor(
            [i for i, c in enumerate(scales) if c > 0], dtype=torch.long, device=device
        )
        self.scales = torch.tensor([c for c in scales if c > 0], device=device)[:, None, None]
        self.soft_rows = torch.tensor([s.params.soft_diffusion for s in seqs], device=device)

    def keep(self, rows: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Only `rows` stay (mid-block, e.g. after an abort). Returns the cache rows to keep:
        the kept rows, then their unconditional copies."""
        cache_rows = torch.cat(
            [rows, self.rows + torch.nonzero(torch.isin(self.guided, rows))[:, 0]]
        )
        self.seqs, self.row_start = seqs, [self.row_start[i] for i in rows.tolist()]
        self.ids, self.real = self.ids[rows], self.real[rows]
        self.positions, self.in_prompt = self.positions[rows], self.in_prompt[rows]
        if self.soft is not None:
            self.soft = self.soft[rows]
        self._row_options(seqs)
        return cache_rows

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def forward(self, ids, positions, real, cache=None, start: int = 0) -> torch.Tensor:
        """Logits for `ids`, which sit at columns [start, start + n): guided rows also run their
        unconditional copy (prompt masked) as extra rows; soft inputs replace masked block inputs."""
        n, g = ids.shape[1], self.guided
        key_positions = self.positions
        if len(g):
            uncond = torch.where(self.in_prompt[g, start : start + n], self.mask_id, ids[g])
            ids, positions, real = (
                torch.cat([ids, uncond]),
                torch.cat([positions, positions[g]]),
                torch.cat([real, real[g]]),
            )
            key_positions = torch.cat([key_positions, key_positions[g]])
        if self.model.block_causal:
            real = block_causal_mask(positions, key_positions, self.block_length, real)
        logits = self.model(
            ids, positions, real, cache=cache, start=start, inputs_embeds=self._inputs(ids, start)
        )
        if not len(g):
            return logits
        logits, uncond = logits[: self.rows], logits[self.rows :]
        logits[g] = uncond + (self.scales + 1) * (logits[g] - uncond)
        return logits

    def set_soft(self, logits: torch.Tensor, still_masked: torch.Tensor, step: int) -> None:
        """Soft diffusion: a still-masked block position's next input is
        E[mask] + w * sum_v softmax(logits)_v E[v], with w = min(0.15 + 0.02 step, 0.3)."""
        table = self.model.embed_weight
        probs = torch.softmax(logits.to(table.dtype), dim=-1)
        soft = table[self.mask_id] + min(0.15 + 0.02 * step, 0.3) * (
            probs @ table[: logits.shape[-1]]
        )
        plain = table[self.ids[:, self.block_start : self.block_end]]
        use = still_masked & self.soft_rows[:, None]
        self.soft = torch.where(use[..., None], soft, plain)

    def _inputs(self, ids: torch.Tensor, start: int) -> torch.Tensor | None:
        if self.soft is None:
            return None
        soft = torch.cat([self.soft, self.soft[self.guided]]) if len(self.guided) else self.soft
        embeds = self.model.embed(ids)
        lo, hi = max(self.block_start, start), min(self.block_end, start + ids.shape[1])
        if lo < hi:
            embeds[:, lo - start : hi - start] = soft[
                :, lo - self.block_start : hi - self.block_start
            ]
        return embeds

    @property
    def cache_rows(self) -> int:
        return self.rows + len(self.guided)


@dataclass
class StepUpdate:
    """What one step changed for one request."""

    seq: Sequence
    block: int
    block_tokens: list[int]
    newly_committed: list[int]  # offsets inside the block
    block_final: bool


class BlockRound:
    """Runs one block for `seqs` (same block_length and cache policy), one forward per `step()`."""

    def __init__(
        self, model, seqs: list[Sequence], cache, report: bool = True, steps_per_check: int = 1
    ):
        cfg = model.config
        self.model, self.seqs = model, seqs
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        device = model.lm_head_weight.device
        self.batch = Batch(model, seqs, self.mask_id, self.eos_id, device)
        self.decoders = DecoderSet([s.params for s in seqs], device)
        self.block_seeds = torch.tensor(
            [block_seed(s.seed, s.block) for s in seqs], dtype=torch.long, device=device
        )
        self.cache = cache  # a policy from workers.cache.make_cache
        self.suppress_eos = torch.tensor([s.params.suppress_eos for s in seqs], device=device)
        self.any_suppress = any(s.params.suppress_eos for s in seqs)
        self.any_soft = any(s.params.soft_diffusion for s in seqs)
        self.row_done = torch.zeros(len(seqs), dtype=torch.bool, device=device)
        # per-row counters stay on the device; copied to the requests when the block ends
        self.forwards = torch.zeros(len(seqs), dtype=torch.long, device=device)
        self.committed = torch.zeros(len(seqs), dtype=torch.long, device=device)
        self.report = report  # build per-step updates (streaming); off, a step syncs the host once
        # without reports, the host looks at the rows only every `steps_per_check` steps: the steps
        # in between are queued without waiting (a row done early computes but commits nothing)
        self.steps_per_check = 1 if report else steps_per_check
        self.step_index = 0
        self.finished = False

    def drop(self, leaving: set[int]) -> None:
        """Remove the rows at `leaving` before the next step; their cache rows are released."""
        rows = torch.tensor(
            [i for i in range(len(self.seqs)) if i not in leaving],
            dtype=torch.long,
            device=self.row_done.device,
        )
        self.seqs = [self.seqs[i] for i in rows.tolist()]
        cache_rows = self.batch.keep(rows, self.seqs)
        self.cache.keep_rows(cache_rows)
        self.decoders.keep(rows)
        self.suppress_eos, self.row_done, self.block_seeds = (
            self.suppress_eos[rows],
            self.row_done[rows],
            self.block_seeds[rows],
        )
        self.forwards, self.committed = self.forwards[rows], self.committed[rows]
        if self.seqs and bool(self.row_done.all()):
            self._finish()

    def step(self) -> list[StepUpdate]:
        batch, seqs, t = self.batch, self.seqs, self.step_index
        lo, hi = batch.block_start, batch.block_end
        logits = self.cache.block_logits(batch.forward, batch, lo, hi, t)
        logits = forbid_tokens(
            logits, self.mask_id, self.eos_id, self.suppress_eos if self.any_suppress else None
        )
        masked = batch.ids[:, lo:hi] == self.mask_id
        token, commit = self.decoders.select(logits, masked, t, step_seeds(self.block_seeds, t))
        working = ~self.row_done
        commit &= working[:, None]
        batch.ids[:, lo:hi] = torch.where(commit, token, batch.ids[:, lo:hi])
        self.forwards += working  # a forward counts for a request only while it still had work
        self.committed += commit.sum(-1)
        self.row_done |= self.decoders.done(t + 1, masked & ~commit)
        self.step_index += 1
        done = (
            int(self.row_done.sum()) if self.step_index % self.steps_per_check == 0 else 0
        )  # the host sync
        self.finished = done == len(seqs)
        if not self.finished and self.any_soft:
            batch.set_soft(logits, masked & ~commit, t)
        leaving = torch.nonzero(self.row_done)[:, 0].tolist() if done and not self.finished else []
        if self.report or self.finished:
            updates = self._updates(working, commit)
        else:
            updates = self._updates(working, commit, only=leaving) if leaving else []
        if self.finished:
            self._finish()
        elif leaving:
            # rows done with the block leave the forwards now instead of idling in them until
            # the slowest row is done; they wait for the round's end to start their next block
            self._write_back(leaving)
            self.drop(set(leaving))
        return updates

    def _updates(
        self, working: torch.Tensor, commit: torch.Tensor, only: list[int] | None = None
    ) -> list[StepUpdate]:
        """What changed for each request this step (`only` those rows), limited to the block's
        answer positions; rows done with the block say so (block_final)."""
        lo, hi = self.batch.block_start, self.batch.block_end
        block, commits, work, done = (
            self.batch.ids[:, lo:hi].tolist(),
            commit.tolist(),
            working.tolist(),
            self.row_done.tolist(),
        )
        updates = []
        for i in range(len(self.seqs)) if only is None else only:
            s, row, c = self.seqs[i], block[i], commits[i]
            if work[i] or self.finished:
                a, b = (x - s.block * (hi - lo) for x in s.span(s.block))
                updates.append(
                    StepUpdate(s, s.block, row[a:b], [j - a for j in range(a, b) if c[j]], done[i])
                )
        return updates

    def _write_back(self, rows: list[int]) -> None:
        """Copy the block, counters and (block-causal) cache of `rows` into their requests."""
        lo, hi = self.batch.block_start, self.batch.block_end
        index = torch.tensor(rows, dtype=torch.long, device=self.row_done.device)
        blocks, forwards, committed = (
            self.batch.ids[index, lo:hi].tolist(),
            self.forwards[index].tolist(),
            self.committed[index].tolist(),
        )
        for r, row, n, c in zip(rows, blocks, forwards, committed):
            s = self.seqs[r]
            s.window[s.block * (hi - lo) : (s.block + 1) * (hi - lo)] = row
            s.forwards += n
            s.committed += c
        self.cache.end_block(self.batch, rows)

    def _finish(self) -> None:
        """Every row has finished the block: write the blocks back into the requests' windows."""
        self.finished = True
        self.decoders.end_block()
        self._write_back(list(range(len(self.seqs))))
