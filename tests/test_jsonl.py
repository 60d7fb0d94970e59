"""dinfer-batch's line formats without workers: strict input fields, bytes that are not JSON or
not Unicode, OpenAI Batch lines, strict JSON output, and what counts as one of our records."""

import json

import pytest

from dinfer_async.jsonl import (
    Job,
    LineError,
    completion_record,
    decode_line,
    encode_record,
    parse_line,
    record_key,
)


def parse(obj, defaults=None, line=1):
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return parse_line(line, text, defaults or {})


def error_of(obj, defaults=None) -> str:
    item = parse(obj, defaults)
    assert isinstance(item, LineError), item
    return item.message


def openai(body, url="/v1/chat/completions", **top):
    return {"custom_id": "c", "method": "POST", "url": url, "body": body, **top}


CHAT = [{"role": "user", "content": "reverse abc"}]


def test_unknown_native_fields_are_named_with_the_closest_known_one():
    message = error_of({"id": "a", "prompt": "x", "gen_lenght": 64, "temprature": 0.5})
    assert "'gen_lenght' (did you mean 'gen_length'?)" in message
    assert "'temprature' (did you mean 'temperature'?)" in message
    assert "'zzz'" in error_of({"id": "a", "prompt": "x", "zzz": 1})
    assert "did you mean" not in error_of({"id": "a", "prompt": "x", "zzz": 1})


def test_max_tokens_in_a_native_line_sets_gen_length_in_whole_blocks():
    job = parse({"id": "a", "prompt": "x", "max_tokens": 40, "block_length": 32})
    assert isinstance(job, Job) and job.params.gen_length == 64
    # the line's own gen_length wins over a --max-tokens flag
    job = parse({"id": "a", "prompt": "x", "gen_length": 32}, {"max_tokens": 100})
    assert job.params.gen_length == 32 and job.params.max_tokens is None
    job = parse({"id": "a", "prompt": "x"}, {"max_tokens": 100})
    assert job.params.gen_length == 128
    assert "max_tokens" in error_of({"id": "a", "prompt": "x", "max_tokens": 0})
    job = parse({"id": "a", "prompt": "x", "stop": "\n"})
    assert job.params.stop == ["\n"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"id": NaN, "prompt": "x"}', "NaN"),
        ('{"id": "a", "prompt": "x", "temperature": Infinity}', "temperature is Infinity"),
        ('{"id": "a", "prompt": "x", "seed": [-Infinity]}', "seed[0] is -Infinity"),
        ('{"id": "a", "prompt": "x", "threshold": 2e400}', "threshold is 2e400"),
        ('{"id": 1e999, "prompt": "x"}', "id is 1e999"),
        ('{"id": "a", "prompt": "\\ud800"}', "U+D800"),
        ('{"id": "\\udfff", "prompt": "x"}', "surrogate"),
        ('{"id": "a", "messages": [{"role": "user", "content": "a\\ud83d"}]}', "messages[0]"),
        ("[" * 100_000, "invalid JSON"),
        ('{"id": ' + "9" * 5000 + ', "prompt": "x"}', "invalid JSON"),
        ("\x00\x01garbage", "invalid JSON"),
        ('{"id": true, "prompt": "x"}', "'id'"),
        ('{"id": "", "prompt": "x"}', "'id'"),
        ('{"prompt": "x"}', "'id'"),
        ('"just a string"', "JSON object"),
    ],
)
def test_lines_that_are_not_strict_json_or_not_unicode_are_errors(text, expected):
    item = parse_line(3, text, {})
    assert isinstance(item, LineError) and item.line == 3
    assert expected in item.message, item.message
    record = item.record()
    assert json.loads(encode_record(record, 3), parse_constant=_no_constants) == record
    if record["id"] is not None:  # only a usable id is echoed back
        assert record["id"] == "a"


def _no_constants(name):
    raise AssertionError(f"{name} in the output")


def test_decode_line_accepts_a_bom_on_line_1_only_and_reports_bad_utf8():
    assert decode_line(1, b'\xef\xbb\xbf{"id": 1}\n') == '{"id": 1}\n'
    assert isinstance(parse_line(2, decode_line(2, b'\xef\xbb\xbf{"id": 1}\n'), {}), LineError)
    bad = decode_line(4, b'{"id": "a", "prompt": "caf\xe9"}\n')
    assert isinstance(bad, LineError) and "0xe9 at offset 26" in bad.message and bad.line == 4


def test_encode_record_is_strict_json_whatever_the_result_holds():
    job = parse({"id": "a", "prompt": "x"})
    for text, stats in (
        ("fine", {"forwards": 1, "tokens": 1, "seconds": float("nan")}),
        ("lone \ud800", {"forwards": 1, "tokens": 1, "seconds": 0.1}),
    ):
        record = completion_record(job, text, [1], "eos", stats, "m")
        out = json.loads(encode_record(record, 5).decode("utf-8"), parse_constant=_no_constants)
        assert out["error"]["line"] == 5 and "could not be written" in out["error"]["message"]
    good = completion_record(job, "ok", [1], "eos", {"forwards": 2, "tokens": 1, "seconds": 1}, "m")
    assert json.loads(encode_record(good, 5)) == good


def test_openai_fields_that_are_not_honoured_are_named():
    message = error_of(
        openai(
            {
                "messages": CHAT,
                "top_p": 0.9,
                "n": 2,
                "logprobs": True,
                "tools": [{"type": "function"}],
                "response_format": {"type": "json_object"},
                "frequency_penaltyy": 0,
            }
        )
    )
    for name in ("top_p", "n=2", "logprobs", "tools", "response_format", "frequency_penaltyy"):
        assert f"body.{name}" in message, (name, message)
    assert "n=true" in error_of(openai({"messages": CHAT, "n": True}))  # not 1 in disguise
    assert "'extra'" in error_of(openai({"messages": CHAT}, extra=1))
    assert "POST" in error_of(openai({"messages": CHAT}, method="GET"))
    assert "url" in error_of(openai({"input": "x"}, url="/v1/embeddings"))
    assert "body.prompt" in error_of(openai({"prompt": ["a", "b"]}, url="/v1/completions"))
    assert "only text parts" in error_of(
        openai({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    )
    assert "differ" in error_of(
        openai({"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 9})
    )


def test_openai_fields_that_are_honoured_or_no_ops():
    job = parse(
        openai(
            {
                "model": "any",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "reverse"},
                            {"type": "text", "text": "abc"},
                        ],
                    },
                ],
                "max_completion_tokens": 40,
                "temperature": 0.5,
                "seed": 3,
                "stop": "\n",
                "top_p": 1,
                "n": 1,
                "stream": False,
                "logprobs": None,
                "tools": [],
                "user": "u1",
            }
        ),
        {"block_length": 32},
    )
    assert isinstance(job, Job), job
    assert job.params.gen_length == 64 and job.params.temperature == 0.5 and job.params.seed == 3
    assert job.params.stop == ["\n"]
    assert job.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "reverse\nabc"},
    ]
    job = parse(openai({"prompt": "abc", "max_tokens": 5}, url="/v1/completions"))
    assert job.prompt == "abc" and job.openai == "/v1/completions"


def test_openai_usage_counts_prompt_completion_and_total_tokens():
    job = parse(openai({"messages": CHAT}))
    stats = {"forwards": 2, "tokens": 3, "committed": 32, "prompt_tokens": 11, "seconds": 0.5}
    body = completion_record(job, "cba", [1, 2, 3], "eos", stats, "m")["response"]["body"]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["dinfer_stats"]["tokens_per_forward"] == 1.5
    assert body["dinfer_stats"]["committed_per_forward"] == 16.0
    del stats["prompt_tokens"]
    body = completion_record(job, "cba", [1, 2, 3], "length", stats, "m")["response"]["body"]
    assert (
        body["usage"] == {"completion_tokens": 3}
        and body["choices"][0]["finish_reason"] == "length"
    )


def test_what_counts_as_one_of_our_records():
    job = parse({"id": "g0", "prompt": "x"})
    stats = {"forwards": 1, "tokens": 1, "seconds": 0.1}
    ours = [
        completion_record(job, "t", [1], "eos", stats, "m"),
        LineError(4, None, "bad").record(),
        completion_record(parse(openai({"messages": CHAT})), "t", [1], "eos", stats, "m"),
        LineError(5, "c", "bad", openai=True).record(),
    ]
    assert [record_key(r) for r in ours] == ['id:"g0"', "line:4", 'id:"c"', "line:5"]
    for stray in (
        {"id": "g0"},
        {"id": "g0", "text": "t"},
        {"id": "g0", "text": "t", "token_ids": [], "finish_reason": "eos", "stats": None},
        {"id": None, "error": {"message": "no line"}},
        {"id": None, "error": {"line": 0, "message": "bad"}},
        {"custom_id": "c", "response": None},
        {"note": "my notes"},
        [1, 2],
        "text",
    ):
        assert record_key(stray) is None, stray
