"""The iteration manager: block-wise semi-autoregressive denoising of a batch of requests.

One loop for every configuration: the decoder picks what to commit, the cache manager picks
what goes through the model; this file only walks blocks and steps, stops early at EOS, and lets
finished requests leave the batch at block boundaries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workers.cache import KVCache, make_cache
from workers.decoders import make_decoder
from workers.sampling import forbid_tokens, step_seed


@dataclass
class RequestState:
    index: int  # position in the caller's list
    seed: int
    generator: torch.Generator
    forwards: int = 0
    committed: int = 0
    window: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seconds: float = 0.0


class Batch:
    """Requests that share parameters, left-padded to one length.

    ids [B, P + G]: prompt, then the answer window (mask tokens until committed). RoPE positions
    start at 0 on each row's first real token and padding is hidden from attention, so a row
    computes what it would alone. With classifier-free guidance each forward also runs the
    unconditional copy (prompt masked) as extra rows.
    """

    def __init__(self, model, prompts: list[list[int]], params, mask_id: int, device):
        self.model, self.params, self.mask_id = model, params, mask_id
        B, P = len(prompts), max(len(p) for p in prompts)
        self.prompt_length, self.length = P, P + params.gen_length
        self.ids = torch.full((B, self.length), mask_id, dtype=torch.long, device=device)
        self.real = torch.zeros(B, self.length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(B, self.length, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            pad = P - len(prompt)
            self.ids[i, pad:P] = torch.tensor(prompt, device=device)
            self.real[i, pad:] = True
            self.positions[i, pad:] = torch.arange(self.length - pad, device=device)
        self.soft: tuple[int, torch.Tensor] | None = None  # (block start, [B, K, d] input embeddings)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def forward(self, ids, positions, real, cache=None, start: int = 0) -> torch.Tensor:
        """Logits for `ids`, which sit at sequence offset `start` (guidance and soft inputs applied)."""
        guided = self.params.cfg_scale > 0
        if guided:
            in_prompt = torch.arange(start, start + ids.shape[1], device=ids.device) < self.prompt_length
            unconditional = torch.where(in_prompt & real[:, start : start + ids.shape[1]], self.mask_id, ids)
            ids, positions, real = torch.cat([ids, unconditional]), positions.repeat(2, 1), real.repeat(2, 1)
        embeds = self._soft_embeds(ids, start)
        logits = self.model(ids, positions, real, cache=cache, start=start, inputs_embeds=embeds)
        if not guided:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + (self.params.cfg_scale + 1) * (cond - uncond)

    def set_soft(self, start: int, logits: torch.Tensor, still_masked: torch.Tensor, step: int) -> None:
        """Soft diffusion: a still-masked block position's next input is
        E[mask] + w * sum_v softmax(logits)_v E[v], with w = min(0.15 + 0.02 step, 0.3)."""
        table = self.model.embed_weight
        vocab = logits.shape[-1]
        probs = torch.softmax(logits.to(table.dtype), dim=-1)
        soft = table[self.mask_id] + min(0.15 + 0.02 * step, 0.3) * probs @ table[:vocab]
        plain = table[self.ids[:, start : start + logits.shape[1]]]
        self.soft = (start, torch.where(still_masked[..., None], soft, plain))

    def _soft_embeds(self, ids: torch.Tensor, start: int) -> torch.Tensor | None:
        if self.soft is None:
            return None
        block_start, soft = self.soft
        soft = soft.repeat(ids.shape[0] // soft.shape[0], 1, 1)
        embeds = self.model.embed(ids)
        lo, hi = max(block_start, start), min(block_start + soft.shape[1], start + ids.shape[1])
        if lo < hi:
            embeds[:, lo - start : hi - start] = soft[:, lo - block_start : hi - block_start]
        return embeds

    def new_cache(self) -> KVCache:
        rows = self.rows * (2 if self.params.cfg_scale > 0 else 1)
        return KVCache(self.model.config, rows, self.length, self.ids.device, self.model.lm_head_weight.dtype)

    def keep(self, rows: torch.Tensor) -> None:
        assert self.soft is None, "rows leave only at block boundaries"
        self.ids, self.real, self.positions = self.ids[rows], self.real[rows], self.positions[rows]


@torch.no_grad()
def denoise(model, prompts: list[list[int]], params, seeds: list[int]) -> list[RequestState]:
    """Generate the answer window of every prompt under `params` (already validated)."""
    cfg = model.config
    mask_id, eos_id = cfg.mask_token_id, cfg.eos_token_id
    device = model.lm_head_weight.device
    begin = time.perf_counter()
    batch = Batch(model, prompts, params, mask_id, device)
    states = [RequestState(i, s, torch.Generator(device=device)) for i, s in enumerate(seeds)]
    active = list(states)
    decoder, cache = make_decoder(params), make_cache(params)
    P, K = batch.prompt_length, params.block_length

    for block in range(params.num_blocks):
        start, end = P + block * K, P + (block + 1) * K
        generators = [s.generator for s in active]
        step = 0
        while True:
            for s in active:
                s.generator.manual_seed(step_seed(s.seed, block, step))
            logits = cache.block_logits(batch.forward, batch, start, end, step)
            logits = forbid_tokens(logits, mask_id, eos_id, params.suppress_eos)
            masked = batch.ids[:, start:end] == mask_id
            token, commit = decoder.select(logits, masked, step, generators)
            batch.ids[:, start:end] = torch.where(commit, token, batch.ids[:, start:end])
            worked = masked.any(-1).tolist()
            committed = commit.sum(-1).tolist()
            for s, w, n in zip(active, worked, committed):
                s.forwards += w  # a forward counts for a request only if it still had masks to fill
                s.committed += n
            if decoder.block_done(step + 1, masked & ~commit):
                break
            if params.soft_diffusion:
                batch.set_soft(start, logits, masked & ~commit, step)
            step += 1
        decoder.end_block()
        batch.soft = None
        has_eos = (batch.ids[:, start:end] == eos_id).any(-1).tolist()
        last = block == params.num_blocks - 1
        keep = []
        for row, s in enumerate(active):
            if last or (params.early_stop and has_eos[row]):
                window = batch.ids[row, P:].tolist()
                if params.early_stop and eos_id in window[: end - P]:
                    cut = window.index(eos_id)
                    window = window[:cut] + [eos_id] * (len(window) - cut)
                s.window = window
                s.finish_reason = "eos" if eos_id in window else "length"
                s.seconds = time.perf_counter() - begin
            else:
                keep.append(row)
        if len(keep) < len(active):
            active = [active[r] for r in keep]
            if not active:
                break
            batch.keep(torch.tensor(keep, device=device))
    return states
