"""LLaDA's published sampler, rewritten to be obviously correct: the slow oracle for every fast
path.

Block-wise semi-autoregressive: the answer window is split into blocks decoded left to right;
`steps` is split evenly over blocks and as evenly as possible over the steps of a block (earlier
steps take the remainder). Each step runs the model over the whole sequence, predicts every
masked position (argmax, or Gumbel-max in float64 with temperature), and commits the
`k` most confident predictions of the current block (or `k` random ones); among equal scores
the leftmost wins (torch.topk leaves ties unspecified).

Randomness is per request, so a request's tokens do not depend on its batch: at each step of each
block, request i's noise is a pure function of its key step_seeds(block_seed(seeds[i], block),
step), the block position and the token id (kernels.reference.gumbel and random_scores, the
numbers the Triton kernel draws too); Gumbel-max is taken in float64.

Other families: a model with `logit_shift` (Dream) has its logits moved right by that many
columns, its first column's kept, as Dream's sampler does. A `block_causal` model (LLaDA2) is
decoded one prompt at a time as LLaDA2's sampler does: blocks sit at multiples of block_length
from the first token, the prompt's last partial block is decoded with the first answer tokens,
each forward covers the sequence up to the current block's end under the block-causal mask,
and the answer is the gen_length positions after the prompt.

Two choices beyond the published code, shared with the engine: the mask token is never
predicted (its logit is -inf), and `suppress_eos` sets EOS's logit to -inf as well.
Prompts of different lengths are left-padded; padding is hidden from attention and RoPE
positions start at each prompt's first token, so each row sees exactly what it would alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dinfer_kernels.reference import gumbel, random_scores
from workers.shared import (
    block_causal_mask,
    block_seed,
    forbid_tokens,
    step_seeds,
    transfer_counts,
    until_eos,
)

if TYPE_CHECKING:
    from workers.interfaces import DiffusionModel

__all__ = ["reference_generate", "reference_joint", "transfer_counts", "until_eos"]


@torch.no_grad()
def reference_generate(
    model: DiffusionModel,
    prompts: list[list[int]],
    *,
    mask_id: int,
    eos_id: int,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    suppress_eos: bool = False,
    seeds: list[int] | None = None,
    suffix_window: int | None = None,
) -> tuple[list[list[int]], int]:
    """Return each prompt's generated window (gen_length ids) and the number of model calls.
    suffix_window: each forward sees only that many positions after the current block (DPad's
    sliding window; None: the whole sequence)."""
    if getattr(model, "block_causal", False) and len(prompts) > 1:
        options: dict[str, Any] = dict(
            mask_id=mask_id,
            eos_id=eos_id,
            gen_length=gen_length,
            block_length=block_length,
            steps=steps,
            temperature=temperature,
            cfg_scale=cfg_scale,
            remasking=remasking,
            suppress_eos=suppress_eos,
            suffix_window=suffix_window,
        )
        alone = [
            reference_generate(model, [p], seeds=[seed], **options)
            for p, seed in zip(prompts, seeds or [0] * len(prompts))
        ]
        return [w[0] for w, _ in alone], sum(n for _, n in alone)
    assert gen_length % block_length == 0, "gen_length must be a multiple of block_length"
    answer_blocks = gen_length // block_length
    assert steps % answer_blocks == 0, "steps must be a multiple of the number of blocks"
    steps_per_block = steps // answer_blocks
    device = model.lm_head_weight.device
    B = len(prompts)
    P = max(len(p) for p in prompts)
    shift = getattr(model, "logit_shift", 0)
    aligned = getattr(model, "block_causal", False)
    tail = P % block_length if aligned else 0  # answer starts inside the prompt's last block
    num_blocks = -(-(tail + gen_length) // block_length)  # answer_blocks, or one more with a tail
    L = P - tail + num_blocks * block_length

    x = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    real = torch.zeros(B, L, dtype=torch.bool, device=device)
    positions = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        pad = P - len(prompt)
        x[i, pad:P] = torch.tensor(prompt, device=device)
        real[i, pad:] = True
        positions[i, pad:] = torch.arange(L - pad, device=device)
    is_prompt = real.clone()
    is_prompt[:, P:] = False
    seeds = seeds or [0] * B

    forwards = 0
    for block in range(num_blocks):
        start = P - tail + block * block_length
        end = start + block_length
        counts = transfer_counts(block_length, steps_per_block)
        block_keys = torch.tensor([block_seed(seed, block) for seed in seeds], device=device)
        # a block-causal model sees nothing after the block; the block sees itself and what precedes
        seen = end if aligned else L if suffix_window is None else min(L, end + suffix_window)
        keys = real[:, :seen]
        if aligned:  # one prompt, no padding: its positions are its columns
            keys = block_causal_mask(positions[:, :seen], positions[:, :seen], block_length, keys)
        for step in range(steps_per_block):
            if cfg_scale > 0:
                unconditional = torch.where(is_prompt, mask_id, x)[:, :seen]
                both = model(
                    torch.cat([x[:, :seen], unconditional]),
                    positions[:, :seen].repeat(2, 1),
                    keys.repeat(2, *[1] * (keys.dim() - 1)),
                ).double()
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x[:, :seen], positions[:, :seen], keys).double()
            if shift:
                logits = torch.cat([logits[:, :shift], logits[:, :-shift]], dim=1)
            forwards += 1
            everyone = torch.ones(B, dtype=torch.bool, device=device)
            forbid_tokens(logits, mask_id, eos_id, everyone if suppress_eos else None)
            step_keys = step_seeds(block_keys, step)
            for i in range(B):
                key = step_keys[i : i + 1]  # request i's own key: its noise ignores the batch
                block_logits = logits[i, start:end]  # [block_length, vocab]
                if temperature > 0:
                    noise = gumbel(key, block_length, block_logits.shape[-1], torch.float64)[0]
                    prediction = (block_logits + temperature * noise).argmax(-1)
                else:
                    prediction = block_logits.argmax(-1)
                if remasking == "low_confidence":
                    probs = torch.softmax(block_logits, dim=-1)
                    score = probs.gather(-1, prediction[:, None])[:, 0]
                elif remasking == "random":
                    score = random_scores(key, block_length)[0]
                else:
                    raise ValueError(f"remasking={remasking!r}")
                still_masked = x[i, start:end] == mask_id
                score = torch.where(still_masked, score, -torch.inf)
                k = min(counts[step], int(still_masked.sum()))
                chosen = torch.sort(-score, stable=True).indices[:k]  # ties: leftmost first
                x[i, start + chosen] = prediction[chosen]
    return [row[P : P + gen_length].tolist() for row in x], forwards


@torch.no_grad()
def reference_joint(
    model: DiffusionModel,
    prompt: list[int],
    *,
    mask_id: int,
    eos_id: int,
    gen_length: int = 64,
    block_length: int = 32,
    threshold: float = 0.7,
    edit_threshold: float = 0.5,
    max_edit_steps: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    suppress_eos: bool = False,
    early_stop: bool = False,
) -> tuple[list[int], int, int]:
    """LLaDA2.1's joint threshold decoding of one prompt, written out plainly: the oracle of the
    engine's "joint" decoder. Returns the gen_length answer positions, the model calls and the
    number of token edits.

    Each step runs the model over the sequence (up to the block's end for a block-causal model),
    predicts every block position (argmax, or Gumbel-max with the request's counter-based noise),
    then mask-to-token: every masked position with probability >= min(threshold, the best masked
    probability), so at least the most confident one; token-to-token: every position committed
    earlier in this block whose prediction differs from its token with probability >
    edit_threshold. Once no mask is left, a step is an edit round; the block ends after a round
    that changed nothing or after max_edit_steps rounds (with 0, as soon as no mask is left).
    early_stop: after a block whose answer part holds EOS, the rest of the answer is EOS."""
    device = model.lm_head_weight.device
    K = block_length
    shift = getattr(model, "logit_shift", 0)
    aligned = getattr(model, "block_causal", False)
    P = len(prompt)
    tail = P % K if aligned else 0  # a block-causal prompt's last partial block joins block 0
    start0 = P - tail
    num_blocks = -(-(tail + gen_length) // K)
    L = start0 + num_blocks * K
    x = prompt + [mask_id] * (L - P)
    positions = torch.arange(L, device=device)[None]
    forwards = edits = 0
    for block in range(num_blocks):
        lo, hi = start0 + block * K, start0 + (block + 1) * K
        editable = [x[i] == mask_id for i in range(lo, hi)]  # the prompt's tail is never edited
        key = torch.tensor([block_seed(seed, block)], device=device)
        seen = hi if aligned else L
        mask = None
        if aligned:
            mask = block_causal_mask(positions[:, :seen], positions[:, :seen], K)
        step = rounds = 0
        while True:
            ids = torch.tensor([x[:seen]], device=device)
            logits = model(ids, positions[:, :seen], mask).double()
            forwards += 1
            if shift:
                logits = torch.cat([logits[:, :shift], logits[:, :-shift]], dim=1)
            no_eos = torch.tensor([suppress_eos], device=device) if suppress_eos else None
            forbid_tokens(logits, mask_id, eos_id, no_eos)
            block_logits = logits[0, lo:hi]
            if temperature > 0:
                noise = gumbel(step_seeds(key, step), K, block_logits.shape[-1], torch.float64)
                prediction = (block_logits + temperature * noise[0]).argmax(-1)
            else:
                prediction = block_logits.argmax(-1)
            lse = torch.logsumexp(block_logits, dim=-1)
            tokens = prediction.tolist()
            probs = torch.exp(block_logits.gather(-1, prediction[:, None])[:, 0] - lse).tolist()
            masked = [j for j in range(K) if x[lo + j] == mask_id]
            if not masked:
                rounds += 1
            chosen = []
            if masked:  # tau_eff = min(tau, best): positions tied with the best commit with it
                tau = min(threshold, max(probs[j] for j in masked))
                chosen = [j for j in masked if probs[j] >= tau]
            edited = [
                j
                for j in range(K)
                if editable[j]
                and x[lo + j] != mask_id
                and tokens[j] != x[lo + j]
                and probs[j] > edit_threshold
            ]
            for j in chosen + edited:
                x[lo + j] = tokens[j]
            edits += len(edited)
            step += 1
            if mask_id not in x[lo:hi] and ((rounds and not edited) or rounds >= max_edit_steps):
                break
        answer_lo, answer_hi = max(lo, P), min(hi, P + gen_length)
        if early_stop and eos_id in x[answer_lo:answer_hi]:
            cut = x.index(eos_id, P)
            x[cut:] = [eos_id] * (L - cut)
            break
    return x[P : P + gen_length], forwards, edits
