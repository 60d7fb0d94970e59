"""Stop strings: the answer is cut before the first one, in the engine and in the stream."""

import anyio
import pytest

from dinfer_async import Client, SamplingParams
from workers import Engine
from workers.bundled.tasks import held_out
from workers.stops import cut_at_stop, find_stop, streamable


def chars(ids: list[int]) -> str:  # a stand-in tokenizer: one character per token
    return "".join(chr(96 + i) for i in ids)


def test_find_and_streamable_hold_back_what_may_begin_a_stop():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) is None
    assert streamable("hello wo", ["world"]) == "hello "
    assert streamable("hello", ["lo!"]) == "hel"
    assert streamable("hello world!", ["world"]) == "hello "
    assert streamable("abc", ["x", "yz"]) == "abc"


def test_cut_at_stop_keeps_the_tokens_before_the_stop():
    ids = [1, 2, 3, 4, 5]  # "abcde"
    cut = cut_at_stop(ids, ["cd"], chars)
    assert (cut.tokens, cut.text) == (2, "ab")
    assert cut_at_stop(ids, ["zz"], chars) is None
    assert cut_at_stop(ids, ["a"], chars).tokens == 0


def expected(text: str, stops: list[str]) -> str:
    at = find_stop(text, stops)
    return text if at is None else text[:at]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(None)


@pytest.fixture(scope="module")
def prompts(engine):
    examples = [x for x in held_out(4) if x.prompt.startswith("copy")][:3]
    return [engine.encode(messages=x.messages) for x in examples]


def test_engine_cuts_each_answer_at_its_stop_and_stops_decoding(engine, prompts):
    base = engine.generate(prompts, SamplingParams(gen_length=64, block_length=8))
    texts = [r.text for r in base]
    assert all(len(t) > 6 for t in texts), texts
    # one stop inside the first block, one across a block boundary, one that never occurs
    stops = [[texts[0][2:4]], [texts[1][7:9]], ["~never~"]]
    params = [SamplingParams(gen_length=64, block_length=8, stop=s) for s in stops]
    results = engine.generate(prompts, params)
    for b, r, s in zip(base, results, stops):
        assert r.text == expected(b.text, s)
        assert r.token_ids == b.token_ids[: len(r.token_ids)]
        assert engine.decode(r.token_ids) == r.text
    assert [r.finish_reason for r in results] == ["stop", "stop", base[2].finish_reason]
    assert results[0].stats.forwards < base[0].stats.forwards  # later blocks never ran


async def test_streamed_text_never_shows_the_stop_and_matches_generate(prompts, engine):
    base = [r.text for r in engine.generate(prompts, SamplingParams(gen_length=64, block_length=8))]
    with anyio.fail_after(120):
        async with Client(model=None, workers=1) as client:
            for ids, text in zip(prompts, base):
                for stop in ([text[7:9]], [text[3:5], "zz"], ["~never~"]):
                    params = SamplingParams(gen_length=64, block_length=8, stop=stop)
                    seen, blocks = [], {}
                    async for chunk in client.stream(token_ids=ids, params=params):
                        seen.append(chunk.stable_text)
                        assert not any(s in "".join(seen) for s in stop)
                        if chunk.final:
                            blocks[chunk.block] = chunk.tokens
                        last = chunk
                    done = await client.generate(token_ids=ids, params=params)
                    assert "".join(seen) == done.text == expected(text, stop)
                    assert engine.decode(done.token_ids) == done.text
                    assert last.finish_reason == ("stop" if done.text != text else "eos")
