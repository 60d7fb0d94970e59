"""suffix_window (DPad's sliding window): each forward sees only that many window positions after
the current block. The engine against the reference sampler with the same window (float64,
ragged prompts, plain and shifted logits), every cache policy batch-invariant with rows of
different windows, and the fed layout really shorter."""

import pytest

from dinfer_async import SamplingParams
from dinfer_async.errors import InvalidRequestError
from tests.test_engine_families import MASK, PROMPT_LENGTHS, answers, reference, tiny
from tests.tiny_models import Recorder, random_prompts
from workers.scheduler import denoise


@pytest.mark.parametrize("window", [0, 3, 8, 100])
@pytest.mark.parametrize("traits", [{}, dict(logit_shift=1)], ids=["llada", "shifted"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fixed_without_cache_equals_reference_with_the_window(window, traits, temperature):
    model = tiny(**traits)
    prompts = random_prompts(5, PROMPT_LENGTHS, 11, MASK)
    seeds = [1, 2, 3, 4, 5]
    kw = dict(gen_length=24, block_length=8, steps=12, temperature=temperature)
    got = answers(
        model,
        prompts,
        seeds,
        decoder="fixed",
        cache="none",
        early_stop=False,
        suffix_window=window,
        **kw,
    )
    assert got == reference(model, prompts, seeds, suffix_window=window, **kw)


def test_a_window_past_the_end_is_the_whole_sequence():
    model = tiny()
    prompts = random_prompts(6, PROMPT_LENGTHS, 11, MASK)
    kw = dict(gen_length=24, block_length=8, decoder="threshold", threshold=0.5, cache="dual")
    whole = answers(model, prompts, [0] * 5, **kw)
    assert answers(model, prompts, [0] * 5, suffix_window=16, **kw) == whole
    assert answers(model, prompts, [0] * 5, suffix_window=15, **kw) != whole


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "vicinity"])
def test_rows_with_different_windows_batched_equal_each_alone(cache):
    model = tiny(9)
    prompts = random_prompts(7, [5, 12, 2, 9], 11, MASK)
    params = [
        SamplingParams(
            gen_length=24,
            block_length=8,
            decoder="threshold",
            threshold=0.4,
            cache=cache,
            prefix_look=2,
            after_look=3,
            suffix_window=w,
        ).validate()
        for w in (None, 0, 4, 9)
    ]
    seeds = [3, 4, 5, 6]
    together = [s.window for s in denoise(model, prompts, params, seeds)]
    alone = [denoise(model, [p], [q], [s])[0].window for p, q, s in zip(prompts, params, seeds)]
    assert together == alone


def test_the_refresh_feeds_only_the_window():
    recorder = Recorder(tiny())
    prompt = random_prompts(8, [6], 11, MASK)
    params = SamplingParams(
        gen_length=64,
        block_length=8,
        decoder="fixed",
        steps=8,
        cache="dual",
        early_stop=False,
        suffix_window=4,
    ).validate()
    denoise(recorder, prompt, params, [0])
    refreshes = [ids.shape[1] for ids in recorder.inputs if ids.shape[1] > 8]
    # one refresh per block: prompt, the decided blocks, the block and 4 more (not the 64)
    assert refreshes == [min(6 + 8 * (b + 1) + 4, 6 + 64) for b in range(8)]


def test_suffix_window_is_validated():
    with pytest.raises(InvalidRequestError, match="suffix_window"):
        SamplingParams(suffix_window=-1).validate()
    assert SamplingParams(suffix_window=0).validate().suffix_window == 0
