"""dinfer-serve end to end: a real server process (uvicorn on a free port, one bundled-model
worker) driven by the `openai` package (sync and async) and by httpx for what the SDK will not
send (malformed bodies, wrong keys, disconnects mid-stream, raw SSE)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from dinfer_async.protocol import MASK_TEXT

KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {KEY}"}
SMALL = {"max_tokens": 32}  # one block of the server's default block_length 32
# A request that runs for hundreds of steps unless aborted: one position per step, no EOS.
LONG = {
    "max_tokens": 512,
    "decoder": "fixed",
    "steps": 512,
    "cache": "none",
    "suppress_eos": True,
}
PROMPTS = ["reverse planet", "sort 93715", "add 12+34", "in abcd count a", "copy green apple"]


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[dict]:
    port = free_port()
    cmd = [sys.executable, "-m", "dinfer_async.serve", "--port", str(port), "--threads", "1"]
    cmd += ["--gen-length", "32", "--log-level", "warning"]
    env = {**os.environ, "DINFER_API_KEY": KEY}  # the key comes from the environment here
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield {"url": wait_ready(proc, log, f"http://127.0.0.1:{port}"), "pid": proc.pid}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen, log, url: str) -> str:
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"dinfer-serve exited with {proc.returncode}: {log.read().decode()}")
        try:
            if httpx.get(url + "/health", headers=HEADERS, timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "dinfer-serve did not start"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def aio(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def load(server) -> list[int]:
    r = httpx.get(server["url"] + "/health", headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["workers"]


def wait_idle(server, within: float = 20.0) -> None:
    """Poll the workers' own count of active requests until it is 0. The requests aborted in
    these tests would run for hundreds of steps otherwise."""
    deadline = time.monotonic() + within
    while sum(load(server)):
        assert time.monotonic() < deadline, f"the worker still runs {load(server)} request(s)"
        time.sleep(0.05)


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def test_models_health_and_model_mismatch(server, sdk):
    [model] = sdk.models.list().data
    assert model.id == "dinfer-bundled" and model.owned_by == "dinfer"
    assert sdk.models.retrieve(model.id).id == model.id
    assert load(server) == [0]
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="gpt-4o", messages=chat("sort 321"), **SMALL)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_chat_stream_equals_non_stream_sync(sdk):
    kwargs = dict(model="dinfer-bundled", messages=chat("reverse planet"), temperature=0.8)
    whole = sdk.chat.completions.create(seed=11, **kwargs, **SMALL)
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.object == "chat.completion"
    usage = whole.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.forwards >= 1 and usage.tokens_per_forward > 0  # dInfer's extra usage fields
    chunks = list(
        sdk.chat.completions.create(
            seed=11, stream=True, stream_options={"include_usage": True}, **kwargs, **SMALL
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [choice.finish_reason]
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


async def test_completions_async_stream_equals_non_stream(aio):
    # diffusion fields as extras: 8 fixed steps, every one run (no early stop)
    extra = {"decoder": "fixed", "steps": 8, "cache": "prefix", "early_stop": False}
    kwargs = dict(model="dinfer-bundled", prompt="copy green apple", seed=3, temperature=0.5)
    whole = await aio.completions.create(extra_body=extra, **kwargs, **SMALL)
    assert whole.object == "text_completion" and whole.usage.forwards == 8
    stream = await aio.completions.create(stream=True, extra_body=extra, **kwargs, **SMALL)
    pieces = [c.choices[0].text async for c in stream]
    assert "".join(pieces) == whole.choices[0].text
    # a chat stream and a non-stream chat of the same seed agree through the async client too
    chat_kwargs = dict(model="dinfer-bundled", messages=chat("add 12+34"), seed=5, temperature=1.0)
    reply = await aio.chat.completions.create(**chat_kwargs, **SMALL)
    stream = await aio.chat.completions.create(stream=True, **chat_kwargs, **SMALL)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == reply.choices[0].message.content
    await aio.close()


def test_denoise_extension_shows_each_step(server):
    """With {"dinfer": {"denoise": true}} every step's block comes in the `dinfer` field; the
    content deltas are still the stable text only."""
    body = {"messages": chat("reverse planet"), "stream": True, "dinfer": {"denoise": True}}
    body.update(decoder="fixed", steps=32, **SMALL)  # one position per step: 32 steps
    with httpx.stream(
        "POST", server["url"] + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    steps = [e["dinfer"] for e in events[:-1] if "dinfer" in e]
    assert len(steps) == 32 and all(len(s["committed"]) == 1 for s in steps)
    assert MASK_TEXT in steps[0]["text"] and steps[-1]["final"]
    assert all(s["revised"] == [] for s in steps)  # only the joint decoder edits
    assert all(len(s["confidence"]) == 32 for s in steps)  # one per position of the block
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    plain = httpx.post(
        server["url"] + "/v1/chat/completions",
        json={k: v for k, v in body.items() if k not in ("stream", "dinfer")},
        headers=HEADERS,
        timeout=60,
    ).json()
    assert text == plain["choices"][0]["message"]["content"]


def test_stop_cuts_the_answer_stream_and_non_stream(sdk):
    kwargs = dict(model="dinfer-bundled", messages=chat("copy green apple"), max_tokens=64)
    base = sdk.chat.completions.create(**kwargs).choices[0].message.content
    assert len(base) > 6, base
    for stop in (base[3:5], [base[5:7], "~never~"]):
        first = base.find(stop if isinstance(stop, str) else stop[0])
        reply = sdk.chat.completions.create(stop=stop, **kwargs)
        [choice] = reply.choices
        assert (choice.message.content, choice.finish_reason) == (base[:first], "stop")
        chunks = list(sdk.chat.completions.create(stop=stop, stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == base[:first] and chunks[-1].choices[0].finish_reason == "stop"
    reply = sdk.chat.completions.create(stop="~never~", **kwargs)
    assert reply.choices[0].message.content == base
    assert reply.choices[0].finish_reason in ("stop", "length")  # EOS is "stop" too


def test_max_tokens_rounds_up_to_whole_blocks(sdk):
    reply = sdk.completions.create(
        model="dinfer-bundled",
        prompt="copy green apple",
        max_tokens=40,
        extra_body={"suppress_eos": True},
    )
    assert reply.usage.completion_tokens == 64  # 40 rounded up to two blocks of 32
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 2}, "n"),
        ({"top_p": 0.5}, "top_p"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.3}, "presence_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": -1}, "temperature"),
        ({"decoder": "nope"}, "decoder"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),  # over the model's limit
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"max_completion_tokens": "ten"}, "max_completion_tokens"),
        ({"stop": [""]}, "stop[0]"),
        ({"seed": -4}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"dinfer": {"colour": True}}, "dinfer.colour"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),  # worker refuses
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_fields_get_400_naming_the_field(server, fields, param, stream):
    body = {"model": "dinfer-bundled", "messages": chat("sort 321"), **SMALL, **fields}
    if stream and "stream_options" not in fields:
        body["stream"] = True
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=HEADERS, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and error["message"].startswith(param)
    assert error["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(server, sdk):
    with pytest.raises(openai.BadRequestError, match="n: 3 is not supported"):
        sdk.chat.completions.create(model="dinfer-bundled", messages=chat("sort 1"), n=3)
    wrong = openai.OpenAI(base_url=server["url"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError, match="prompt: one prompt per request"):
        sdk.completions.create(model="dinfer-bundled", prompt=["a", "b"], **SMALL)


@pytest.mark.parametrize(
    "method, path, body, headers, status, code",
    [
        ("POST", "/v1/chat/completions", b'{"messages": [', HEADERS, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"[1, 2]", HEADERS, 400, "invalid_json"),
        ("POST", "/v1/completions", b"{}", HEADERS, 400, "invalid_value"),
        ("POST", "/v1/chat/completions", b"{}", {}, 401, "invalid_api_key"),
        ("GET", "/health", None, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        ("GET", "/metrics", None, {"Authorization": KEY}, 401, "invalid_api_key"),
        ("GET", "/v1/nothing", None, HEADERS, 404, "not_found"),
        ("GET", "/v1/models/other", None, HEADERS, 404, "model_not_found"),
        ("GET", "/v1/chat/completions", None, HEADERS, 405, "method_not_allowed"),
    ],
)
def test_malformed_requests_and_keys(server, method, path, body, headers, status, code):
    r = httpx.request(method, server["url"] + path, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}


def test_disconnect_mid_stream_aborts_on_the_worker(server):
    body = {"messages": chat("copy green apple"), "stream": True, **LONG}
    with httpx.stream(
        "POST", server["url"] + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # the request is running
        assert load(server) == [1]
    wait_idle(server)  # 512 steps would take far longer than the bound


def test_disconnect_before_a_non_stream_answer_aborts(server):
    body = {"messages": chat("copy green apple"), **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=HEADERS, timeout=1.0)
    wait_idle(server)


def test_a_reader_that_stalls_does_not_stall_others(server, sdk):
    """A stream nobody reads keeps running (its chunks merge in its buffer) while other
    requests come and go; read afterwards, it has lost no text."""
    body = {"messages": chat("copy green apple"), "stream": True, "seed": 1, "temperature": 0.7}
    body.update(decoder="fixed", steps=32, **SMALL)
    with httpx.stream(
        "POST", server["url"] + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60
    ) as stalled:
        for prompt in PROMPTS:
            reply = sdk.chat.completions.create(model="dinfer-bundled", messages=chat(prompt))
            assert reply.choices[0].finish_reason in ("stop", "length")
        events = list(sse_events(stalled.iter_lines()))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    plain = {k: v for k, v in body.items() if k != "stream"}
    reply = httpx.post(
        server["url"] + "/v1/chat/completions", json=plain, headers=HEADERS, timeout=60
    ).json()
    assert events[-1] == "[DONE]" and text == reply["choices"][0]["message"]["content"]


async def test_100_concurrent_streams(aio):
    """Each of 100 concurrent streams gives the text its prompt gets alone (greedy)."""
    alone = {}
    for p in PROMPTS:
        reply = await aio.chat.completions.create(model="dinfer-bundled", messages=chat(p))
        alone[p] = reply.choices[0].message.content

    async def one(i: int) -> tuple[str, str, str | None]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await aio.chat.completions.create(
            model="dinfer-bundled", messages=chat(prompt), stream=True
        )
        pieces, reason = [], None
        async for c in stream:
            pieces.append(c.choices[0].delta.content or "")
            reason = c.choices[0].finish_reason or reason
        return prompt, "".join(pieces), reason

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert all(reason in ("stop", "length") for _, _, reason in results)
    assert all(text == alone[prompt] for prompt, text, _ in results)
    await aio.close()


def test_metrics(server):
    r = httpx.get(server["url"] + "/metrics", headers=HEADERS, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in r.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['dinfer_requests_total{endpoint="chat",status="200"}'] >= 100
    assert values['dinfer_requests_total{endpoint="chat",status="400"}'] >= 18
    assert values["dinfer_generation_tokens_total"] > 0 and values["dinfer_forwards_total"] > 0
    assert values["dinfer_tokens_per_forward_count"] >= 100
    assert values["dinfer_time_to_first_token_seconds_count"] >= 100
    assert values["dinfer_requests_aborted_total"] >= 2  # the two disconnects above
    assert values["dinfer_queue_depth"] == 0 and values["dinfer_requests_running"] == 0
    assert values['dinfer_worker_active_requests{worker="0"}'] == 0
    assert "dinfer_tokens_per_second" in values and "dinfer_prompt_tokens_total" in values
    assert values["dinfer_worker_died_errors_total"] == 0


def worker_pids(server_pid: int) -> list[int]:
    """The server's child processes (its workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == server_pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc")
def test_worker_death_mid_stream_ends_with_an_error_event(server, sdk):
    """Last: it kills the worker (the client restarts it; the server serves again after)."""
    stream = sdk.chat.completions.create(
        model="dinfer-bundled", messages=chat("copy green apple"), stream=True, extra_body=LONG
    )
    chunks = iter(stream)
    next(chunks)
    [pid] = worker_pids(server["pid"])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="worker died"):
        for _ in chunks:
            pass
    r = httpx.get(server["url"] + "/metrics", headers=HEADERS, timeout=10)
    assert "dinfer_worker_died_errors_total 1.0" in r.text
    deadline = time.monotonic() + 120
    while True:  # the restarted worker serves again
        try:
            reply = sdk.chat.completions.create(
                model="dinfer-bundled", messages=chat("sort 321"), **SMALL
            )
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_importing_the_sdk_leaves_the_web_stack_out():
    code = (
        "import sys, dinfer_async, dinfer_async.openai_api; "
        "print([m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', 'prometheus_client') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_and_a_port_in_use_are_one_line_each():
    out = subprocess.run(["dinfer-serve", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dinfer-serve ")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = subprocess.run(
            ["dinfer-serve", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "already in use" in out.stderr
    assert "pick another --port" in out.stderr
