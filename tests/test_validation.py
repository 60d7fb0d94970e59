"""The one request validation (dinfer_async.validation) and the engine's use of it."""

from __future__ import annotations

import random
import subprocess
import sys

import msgspec
import pytest

from dinfer_async import InvalidRequestError, SamplingParams
from dinfer_async import protocol as wire
from dinfer_async.validation import (
    CHARS_PER_TOKEN,
    Limits,
    check_input,
    check_request,
    frame_bytes_limit,
)

LIMITS = Limits.for_model(vocab_size=263, max_prompt_length=1023, max_gen_length=512)
USER = {"role": "user", "content": "hi"}
DEEP: list = [1]
for _ in range(40):
    DEEP = [DEEP]


def field_of(**request) -> str:
    with pytest.raises(InvalidRequestError) as info:
        check_request(**request, limits=LIMITS)
    return info.value.field


@pytest.mark.parametrize(
    "request_,field",
    [
        (dict(prompt="ok \ud800"), "prompt"),
        (dict(messages=[{"role": "user", "content": "\udfff"}]), "messages[0].content"),
        (
            dict(messages=[USER, {"role": "user", "content": "x", "name": "\ud800"}]),
            "messages[1].name",
        ),
        (dict(messages=[{**USER, "meta": {"tags": ["a", "\ud83d"]}}]), "messages[0].meta.tags[1]"),
        (dict(messages=[{**USER, "\ud800": 1}]), "messages[0] key"),
        (dict(token_ids=[2**64]), "token_ids"),
        (dict(token_ids=[263]), "token_ids"),
        (dict(token_ids=[-1]), "token_ids"),
        (dict(token_ids=[True]), "token_ids"),
        (dict(token_ids=[1.0]), "token_ids"),
        (dict(token_ids=[]), "token_ids"),
        (dict(token_ids="abc"), "token_ids"),
        (dict(token_ids=[5] * 1024), "token_ids"),
        (dict(messages=[{**USER, "meta": object()}]), "messages[0].meta"),
        (dict(messages=[{**USER, "meta": b"raw"}]), "messages[0].meta"),
        (dict(messages=[{**USER, "meta": {1, 2}}]), "messages[0].meta"),
        (dict(messages=[{**USER, "n": 2**64}]), "messages[0].n"),
        (dict(messages=[{**USER, "x": float("nan")}]), "messages[0].x"),
        (dict(messages=[{**USER, "d": {1: "a"}}]), "messages[0].d"),
        (dict(messages=[{**USER, "deep": DEEP}]), "messages[0].deep" + "[0]" * 31),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": 3}]), "messages[0]"),
        (dict(messages=[]), "messages"),
        (dict(prompt="x", token_ids=[1]), "prompt"),
        (dict(), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(prompt=b"bytes"), "prompt"),
        (dict(prompt="x" * (1023 * CHARS_PER_TOKEN + 1)), "prompt"),
        (
            dict(messages=[USER, {"role": "user", "content": "x" * 1023 * CHARS_PER_TOKEN}]),
            "messages",
        ),
        (dict(prompt="x", params=SamplingParams(gen_length=1024)), "gen_length"),
        (dict(prompt="x", params={"gen_length": 32}), "params"),
    ],
)
def test_every_bad_input_is_an_invalid_request_naming_the_field(request_, field):
    assert field_of(**request_) == field


def test_good_input_passes_and_params_come_back_validated():
    params = check_request(prompt="hello", limits=LIMITS)
    assert params == SamplingParams().validate()
    extra = {**USER, "name": "bob", "tool_calls": [{"id": "1", "args": {"x": 1.5, "y": None}}]}
    check_request(messages=[extra], limits=LIMITS)
    check_request(token_ids=[0, 262], limits=LIMITS)
    check_input(token_ids=[2**63 - 1])  # no vocabulary known: anything msgpack carries
    with pytest.raises(InvalidRequestError):
        check_input(token_ids=[2**63])


def test_character_bound_is_checked_before_anything_walks_the_text():
    limit = LIMITS.max_prompt_chars
    assert limit == 1023 * CHARS_PER_TOKEN
    check_input(prompt="y" * limit, limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="characters exceed") as info:
        check_input(prompt="y" * 20_000_000 + "\ud800", limits=LIMITS)  # length first, not the
    assert info.value.field == "prompt"  # surrogate: the 20M characters are never encoded


def test_what_passes_fits_in_a_frame():
    """Any request the check lets through encodes to at most max_frame_bytes, so the worker's
    MAXMSGSIZE never drops a well-formed request (random prompts, messages and ids)."""
    rng = random.Random(0)
    limits = Limits.for_model(vocab_size=100_000, max_prompt_length=512, max_gen_length=256)
    wide = "😀é\u4e2d"
    params = SamplingParams(stop=["x" * 256] * 8)
    passed, largest = [0, 0, 0, 0], 0
    for trial in range(80):
        kind = trial % 4
        if kind == 0:
            request = dict(prompt="".join(rng.choice(wide) for _ in range(rng.randrange(1, 9000))))
        elif kind == 1:  # many messages: few characters, many bytes of structure
            n = rng.choice([1, 10, 3000, 30000, 45000, 60000])
            request = dict(messages=[{"role": "user", "content": rng.choice(["", *wide])}] * n)
        elif kind == 2:  # numbers in an extra key: bytes without characters
            n = rng.randrange(1, 150_000)
            request = dict(messages=[{**USER, "scores": [rng.random() for _ in range(n)]}])
        else:
            request = dict(token_ids=[rng.randrange(100_000) for _ in range(rng.randrange(1, 600))])
        try:
            checked = check_request(**request, params=params, limits=limits)
        except InvalidRequestError:
            continue
        frame = wire.encode(wire.Submit(request_id="f" * 32, params=checked, **request))
        assert len(frame) <= limits.max_frame_bytes
        passed[kind] += 1
        largest = max(largest, len(frame))
    assert min(passed) > 0 and largest > limits.max_frame_bytes // 2  # near the bound
    assert limits.max_frame_bytes == frame_bytes_limit(512)


def test_limits_from_welcomes_take_the_tightest():
    def welcome(**kw):
        base = dict(
            protocol=wire.PROTOCOL_VERSION, model="m", tokenizer="t", max_prompt_length=100,
            max_gen_length=64, eos_token_id=1, mask_token_id=2, pid=1,
        )  # fmt: skip
        return wire.Welcome(**{**base, **kw})

    limits = Limits.from_welcomes(
        [welcome(vocab_size=300, max_prompt_chars=900), None, welcome(max_gen_length=32)]
    )
    assert limits == Limits(300, 100, 900, None, 32)
    assert Limits.from_welcomes([]) == Limits()


def test_importing_validation_and_transport_does_not_import_torch():
    code = (
        "import sys, dinfer_async.validation, dinfer_async.transport, dinfer_async.keys; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def engine():
    from workers import Engine

    return Engine.from_pretrained(None)


def test_the_engine_uses_the_same_check(engine):
    for request, field in [
        (dict(prompt="\ud800"), "prompt"),
        (dict(messages=[{"role": "user", "content": "a\ud800"}]), "messages[0].content"),
        (dict(messages=[{**USER, "meta": object()}]), "messages[0].meta"),
        (dict(), "prompt"),
    ]:
        with pytest.raises(InvalidRequestError) as info:
            engine.encode(**request)
        assert info.value.field == field
    with pytest.raises(InvalidRequestError, match="token ids") as info:
        engine.generate([[2**64]], SamplingParams(gen_length=32, block_length=32))
    assert info.value.field == "prompts[0]"
    assert msgspec.msgpack.encode(engine.encode(prompt="fine"))  # good input still tokenizes
