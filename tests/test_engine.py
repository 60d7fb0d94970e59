"""The engine's loop (decoder + cache + iteration manager) against the reference sampler."""

import pytest
import torch

from dinfer_async import InvalidRequestError, SamplingParams
from tests.tiny_models import random_prompts, tiny_model
from workers.bundled import MODEL_DIR
from workers.cache import KVCache
from workers.engine import Engine
from workers.reference import reference_generate
from workers.scheduler import denoise
from workers.tokenizer import load_tokenizer

MASK, EOS = 39, 1


def run(model, prompts, seeds, **kw):
    params = SamplingParams(**kw).validate()
    return [s.window for s in denoise(model, prompts, params, seeds)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(gen_length=16, block_length=8, steps=8),
        dict(gen_length=16, block_length=8, steps=10),
        dict(gen_length=24, block_length=8, steps=24, temperature=0.9),
        dict(gen_length=16, block_length=16, steps=8, remasking="random"),
        dict(gen_length=16, block_length=8, steps=8, cfg_scale=0.7, temperature=0.5),
        dict(gen_length=16, block_length=8, steps=16, suppress_eos=True),
    ],
)
def test_fixed_without_cache_equals_reference(kw):
    """float64, ragged prompts, batch > 1: token for token."""
    model = tiny_model(7, vocab_size=12, embedding_size=16, mask_token_id=11)
    prompts = random_prompts(7, [6, 1, 9, 4], 11, 11)
    seeds = [3, 4, 5, 6]
    engine = run(model, prompts, seeds, decoder="fixed", cache="none", early_stop=False, **kw)
    ref, _ = reference_generate(model, prompts, mask_id=11, eos_id=EOS, seeds=seeds, **kw)
    assert engine == ref


def test_early_stop_keeps_every_token_before_eos():
    model = tiny_model(8, vocab_size=8, embedding_size=8, mask_token_id=7)
    prompts = random_prompts(8, [3, 5, 2, 6, 4], 7, 7)
    kw = dict(gen_length=32, block_length=8, steps=32)
    ref, _ = reference_generate(model, prompts, mask_id=7, eos_id=EOS, **kw)
    stopped = run(model, prompts, [0] * 5, decoder="fixed", cache="none", early_stop=True, **kw)
    assert any(EOS in r[:24] for r in ref), "the test needs an EOS before the last block"
    for r, s in zip(ref, stopped):
        cut = s.index(EOS) if EOS in s else len(s)
        assert s[:cut] == r[:cut]
        assert all(t == EOS for t in s[cut:])
        if EOS in r:
            assert cut == r.index(EOS)


@pytest.mark.parametrize(
    "decoder,cache",
    [("fixed", "dual"), ("threshold", "none"), ("threshold", "prefix"), ("threshold", "dual")],
)
def test_batch_invariance(decoder, cache):
    """A request's tokens do not depend on what it is batched with."""
    model = tiny_model(9)
    prompts = random_prompts(9, [5, 12, 2], 40, MASK)
    seeds = [1, 2, 3]
    kw = dict(
        decoder=decoder,
        cache=cache,
        gen_length=16,
        block_length=8,
        steps=8,
        threshold=0.3,
        temperature=0.6,
    )
    together = run(model, prompts, seeds, **kw)
    alone = [run(model, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert together == alone


def test_refresh_through_the_cache_equals_the_full_forward():
    model = tiny_model(10)
    prompts = random_prompts(10, [4, 9], 40, MASK)
    ids = torch.full((2, 9 + 8), MASK)
    real = torch.zeros(2, 17, dtype=torch.bool)
    pos = torch.zeros(2, 17, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p) : 9] = torch.tensor(p)
        real[i, 9 - len(p) :] = True
        pos[i, 9 - len(p) :] = torch.arange(17 - 9 + len(p))
    cache = KVCache(model.config, "cpu", torch.float64)
    cache.reserve(rows=3, length=20)  # larger than needed: views must cut it to the batch
    cache.reserve(rows=2, length=17)
    assert torch.equal(model(ids, pos, real, cache=cache, start=0), model(ids, pos, real))
    # a later step feeding only the block attends over the cache: with nothing changed since the
    # refresh it must reproduce the full forward's block logits
    block = model(ids[:, 9:], pos[:, 9:], real, cache=cache, start=9)
    torch.testing.assert_close(block, model(ids, pos, real)[:, 9:], rtol=0, atol=1e-12)


def test_threshold_commits_everything_confident_and_at_least_one():
    from workers.decoders import ThresholdDecoder

    dec = ThresholdDecoder([SamplingParams(threshold=0.5), SamplingParams(threshold=0.5)], "cpu")
    seeds = torch.tensor([3, 4])  # the rows' step keys (greedy here: unused)
    logits = torch.log(
        torch.tensor(
            [
                [[0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.9, 0.1]],
                [[0.4, 0.6], [0.5, 0.5], [0.45, 0.55], [0.52, 0.48]],
            ],
            dtype=torch.float64,
        )
    )
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    token, commit = dec.select(logits, masked, torch.zeros(2, dtype=torch.long), seeds)
    assert commit.tolist() == [[True, True, True, False], [True, True, True, True]]
    dec.tau = torch.tensor([[0.65], [0.65]], dtype=torch.float64)
    token, commit = dec.select(logits, masked, torch.zeros(2, dtype=torch.long), seeds)
    assert commit.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert token[0].tolist()[:3] == [0, 1, 1]


def test_engine_api_and_errors():
    model = tiny_model(11)
    engine = Engine(model, tokenizer=load_tokenizer(MODEL_DIR))
    params = SamplingParams(gen_length=8, block_length=8, decoder="fixed", cache="none", steps=4)
    results = engine.generate([[5, 6, 7], [8]], params)
    assert [r.stats.forwards for r in results] == [4, 4]
    assert all(len(r.token_ids) <= 8 and r.finish_reason in ("eos", "length") for r in results)
    with pytest.raises(InvalidRequestError, match="prompts\\[1\\]"):
        engine.generate([[5], []], params)
    with pytest.raises(InvalidRequestError, match="prompts\\[0\\]"):
        engine.generate([[5, 40]], params)
    with pytest.raises(InvalidRequestError, match="gen_length"):
        engine.generate([[5]], SamplingParams(gen_length=10, block_length=4))
