"""The engine's handling of what differs between model families, on tiny LLaDA stand-ins:

- shifted logits (Dream: column c predicts column c + 1), with every cache policy;
- block-causal attention (LLaDA2): blocks aligned to block_length from the first token, the
  prompt's tail decoded with the first answer block, and caches that are exact.

The families' own model files are tested in tests/test_model_*.py; here the model is a tiny
LLaDA whose class says it is shifted or block-causal, so a failure points at the engine.
"""

import pytest
import torch

from dinfer_async import SamplingParams
from tests.tiny_models import Recorder, random_prompts, tiny_family_model, tiny_model
from workers.reference import reference_generate
from workers.scheduler import Scheduler, denoise

MASK, EOS = 11, 1
PROMPT_LENGTHS = [6, 1, 9, 8, 13]  # with block_length 4 or 8: tails of every size, including none


def as_family(model, **traits):
    """The same weights, with the class attributes (logit_shift, block_causal) of another family."""
    model.__class__ = type(f"{type(model).__name__}As", (type(model),), traits)
    return model


def tiny(seed=7, **traits):
    return as_family(
        tiny_model(seed, vocab_size=12, embedding_size=16, mask_token_id=MASK), **traits
    )


def answers(model, prompts, seeds, **kw):
    params = SamplingParams(**kw).validate()
    return [s.generated() for s in denoise(model, prompts, params, seeds)]


def reference(model, prompts, seeds, **kw):
    return reference_generate(model, prompts, mask_id=MASK, eos_id=EOS, seeds=seeds, **kw)[0]


FIXED = [
    dict(gen_length=16, block_length=8, steps=8),
    dict(gen_length=16, block_length=4, steps=16, temperature=0.8),
    dict(gen_length=8, block_length=8, steps=8, cfg_scale=0.5),
]


@pytest.mark.parametrize(
    "traits", [dict(logit_shift=1), dict(block_causal=True)], ids=["shifted", "block_causal"]
)
@pytest.mark.parametrize("kw", FIXED)
def test_fixed_without_cache_equals_reference(traits, kw):
    model = tiny(**traits)
    prompts = random_prompts(3, PROMPT_LENGTHS, 11, MASK)
    seeds = [1, 2, 3, 4, 5]
    got = answers(model, prompts, seeds, decoder="fixed", cache="none", early_stop=False, **kw)
    assert got == reference(model, prompts, seeds, **kw)


def test_the_shift_matters():
    """Guards the tests above: the same weights without the shift decode differently."""
    prompts = random_prompts(3, PROMPT_LENGTHS, 11, MASK)
    kw = dict(gen_length=16, block_length=8, steps=8)
    assert reference(tiny(logit_shift=1), prompts, [0] * 5, **kw) != reference(
        tiny(), prompts, [0] * 5, **kw
    )


def test_block_causal_prompt_tail_joins_the_first_block():
    """LLaDA2's layout: a 9-token prompt with blocks of 4 decodes positions 9..11 with the
    prompt's 9th token in their block, and the answer is exactly gen_length tokens."""
    model = tiny(block_causal=True)
    params = SamplingParams(
        gen_length=8, block_length=4, steps=8, decoder="fixed", cache="none", early_stop=False
    ).validate()
    prompt = random_prompts(5, [9], 11, MASK)[0]
    seq = denoise(model, [prompt], params, [0])[0]
    assert seq.prompt == prompt[:8] and seq.skip == 1 and seq.window[0] == prompt[8]
    assert len(seq.window) == 12 and len(seq.generated()) == 8 and MASK not in seq.generated()


@pytest.mark.parametrize("decoder", ["fixed", "threshold", "credit"])
@pytest.mark.parametrize("cache", ["prefix", "dual", "vicinity"])
def test_block_causal_caches_are_exact(decoder, cache):
    """Finished blocks never see later ones, so every cache equals no cache token for token."""
    model = tiny(block_causal=True)
    prompts = random_prompts(4, PROMPT_LENGTHS, 11, MASK)
    kw = dict(
        gen_length=16,
        block_length=4,
        decoder=decoder,
        threshold=0.5,
        early_stop=False,
        prefix_look=2,
        after_look=2,
    )
    if decoder == "fixed":
        kw["steps"] = 16
    seeds = [0, 1, 2, 3, 4]
    assert answers(model, prompts, seeds, cache=cache, **kw) == answers(
        model, prompts, seeds, cache="none", **kw
    )


@pytest.mark.parametrize("cache", ["prefix", "dual", "vicinity"])
def test_shifted_caches_decode_every_position(cache):
    """With a shift the block's first position is predicted from the column before the block;
    cached runs fill every position and stay batch invariant."""
    model = tiny(logit_shift=1)
    prompts = random_prompts(6, PROMPT_LENGTHS, 11, MASK)
    kw = dict(
        gen_length=16,
        block_length=8,
        decoder="threshold",
        threshold=0.6,
        cache=cache,
        early_stop=False,
    )
    together = answers(model, prompts, [0] * 5, **kw)
    alone = [answers(model, [p], [0], **kw)[0] for p in prompts]
    assert together == alone
    assert all(MASK not in a and len(a) == 16 for a in together)


def test_block_causal_streamed_blocks_hold_only_the_answer():
    """Step updates never show the prompt's tail or positions past gen_length."""
    model = tiny(block_causal=True)
    params = SamplingParams(
        gen_length=8, block_length=4, threshold=0.5, early_stop=False
    ).validate()
    prompt = random_prompts(8, [6], 11, MASK)[0]  # tail of 2: window of 12, answer 8
    scheduler = Scheduler(model, report=True)
    seq = scheduler.add(0, prompt, params, 0)
    finals = {}
    with torch.no_grad():
        while scheduler.has_work():
            for u in scheduler.step():
                if getattr(u, "block_final", False):
                    finals[u.block] = u.block_tokens
                elif hasattr(u, "newly_committed"):
                    assert all(0 <= j < len(u.block_tokens) for j in u.newly_committed)
    assert [t for b in sorted(finals) for t in finals[b]] == seq.generated()
    assert [len(finals[b]) for b in sorted(finals)] == [2, 4, 2]


def test_block_causal_early_stop_ignores_eos_in_the_prompt_tail():
    """An EOS inside the prompt's tail is prompt, not an answer: decoding goes on after it."""
    model = tiny(block_causal=True)
    prompt = random_prompts(9, [5], 11, MASK)[0]
    prompt[-1] = EOS
    params = SamplingParams(
        gen_length=12, block_length=4, steps=12, decoder="fixed", cache="none", suppress_eos=True
    ).validate()
    seq = denoise(model, [prompt], params, [0])[0]
    assert seq.skip == 1 and EOS not in seq.generated() and seq.finish_reason == "length"


# ---- the real families' tiny models ---------------------------------------------------------

FAMILIES = ["lladamoe", "llada2_moe", "Dream"]


def family_model(family, seed=0, **overrides):
    model = tiny_family_model(family, seed=seed, **overrides)
    return model, model.config.mask_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fixed_without_cache_equals_reference(family):
    model, mask = family_model(family)
    prompts = random_prompts(11, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    kw = dict(gen_length=16, block_length=8, steps=16, temperature=0.7)
    seeds = [5, 6, 7, 8, 9]
    params = SamplingParams(decoder="fixed", cache="none", early_stop=False, **kw).validate()
    got = [s.generated() for s in denoise(model, prompts, params, seeds)]
    want, _ = reference_generate(
        model, prompts, mask_id=mask, eos_id=model.config.eos_token_id, seeds=seeds, **kw
    )
    assert got == want


@pytest.mark.parametrize("cache", ["prefix", "dual", "vicinity"])
def test_llada2_cached_block_decoding_equals_uncached(cache):
    model, mask = family_model("llada2_moe", seed=3)
    prompts = random_prompts(12, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    kw = dict(gen_length=16, block_length=4, decoder="threshold", threshold=0.5, early_stop=False)
    uncached = [
        s.generated()
        for s in denoise(model, prompts, SamplingParams(cache="none", **kw).validate(), [0] * 5)
    ]
    cached = [
        s.generated()
        for s in denoise(model, prompts, SamplingParams(cache=cache, **kw).validate(), [0] * 5)
    ]
    assert cached == uncached


@pytest.mark.parametrize("cache", ["prefix", "dual", "vicinity"])
def test_dream_caches_equal_no_cache(cache):
    """Dream (shifted logits) with one layer: a cached key and value depend only on their token
    and position, so every cache is exact and must give cache="none"'s tokens, token for token
    (float64, ragged batch). Feeding the wrong columns around the block (the column before it
    predicts its first position) or taking the wrong logits would change them."""
    model, mask = family_model("Dream", seed=4, num_hidden_layers=1)
    assert model.logit_shift == 1
    prompts = random_prompts(13, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    kw = dict(
        gen_length=16,
        block_length=8,
        threshold=0.6,
        early_stop=False,
        prefix_look=2,
        after_look=3,
    )
    seeds = [0] * 5
    uncached = answers(model, prompts, seeds, cache="none", **kw)
    assert answers(model, prompts, seeds, cache=cache, **kw) == uncached
    forwards = [s.forwards for s in denoise(model, prompts, SamplingParams(**kw).validate(), seeds)]
    assert max(forwards) > 2, "blocks should take several steps, or the cache is never read"


def test_block_causal_cache_feeds_each_token_once_per_block():
    """A block's first forward feeds the block just finished and the new one, not the prompt
    again: the prompt goes through the model once (widths of every forward below)."""
    model = Recorder(tiny(block_causal=True))
    params = SamplingParams(
        gen_length=12, block_length=4, steps=12, decoder="fixed", cache="dual", early_stop=False
    ).validate()
    prompt = random_prompts(10, [8], 11, MASK)[0]
    denoise(model, [prompt], params, [0])
    assert [ids.shape[1] for ids in model.inputs] == [12, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4]
