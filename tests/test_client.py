"""The async client against real worker processes on the bundled model (each test has a timeout)."""

import asyncio
import contextlib
import os
import signal

import anyio
import pytest
import pytest_asyncio
import zmq

from dinfer_async import (
    Chunk,
    Client,
    ClientClosedError,
    InvalidRequestError,
    SamplingParams,
    WorkerDiedError,
    WorkerError,
    WorkerUnresponsiveError,
)
from dinfer_async import protocol as wire

FAST = SamplingParams(gen_length=32, block_length=32)
SLOW = SamplingParams(
    gen_length=256, block_length=8, decoder="fixed", steps=256, cache="none", early_stop=False
)
ASK = [{"role": "user", "content": "reverse planet"}]
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    async with Client(workers=1, threads=1) as c:
        yield c


async def test_stream_blocks_then_final_chunk(client):
    with anyio.fail_after(60):
        chunks = [
            c
            async for c in client.stream(
                messages=ASK, params=SamplingParams(gen_length=64, block_length=32)
            )
        ]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert chunks[-1].finish_reason in ("eos", "length") and chunks[-1].final
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert set(chunks[-1].stats) >= {"forwards", "tokens", "tokens_per_forward", "seconds"}
    first = chunks[0]
    assert len(first.tokens) == 32 and first.text.count(wire.MASK_TEXT) == 32 - len(first.committed)
    committed = [j for c in chunks if c.block == 0 for j in c.committed]
    assert sorted(committed) == list(range(32)), (
        "every position of block 0 is committed exactly once"
    )


async def test_generate_equals_in_process_engine_and_text_mode(client):
    from workers import Engine

    engine = Engine.from_pretrained(None)
    expected = engine.generate([engine.encode(messages=ASK)], FAST)[0]
    with anyio.fail_after(60):
        completion = await client.generate(messages=ASK, params=FAST)
        pieces = [p async for p in client.stream(messages=ASK, params=FAST, text_only=True)]
    assert completion.text == expected.text and completion.token_ids == expected.token_ids
    assert "".join(pieces) == expected.text and all(isinstance(p, str) and p for p in pieces)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(prompt=""), "prompt"),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (dict(messages=ASK, params=SamplingParams(gen_length=48, block_length=32)), "gen_length"),
        (dict(messages=ASK, params=SamplingParams(decoder="beam")), "decoder"),
        (dict(messages=ASK, params=SamplingParams(cache="paged")), "cache"),
        (dict(messages=ASK, params=SamplingParams(threshold=1.5)), "threshold"),
        (dict(messages=ASK, params=SamplingParams(temperature=-1.0)), "temperature"),
    ],
)
async def test_bad_input_raises_before_sending(client, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        async for _ in client.stream(**kwargs):
            pass
    assert info.value.field == field


async def test_refused_by_the_worker_and_still_usable(client):
    with anyio.fail_after(60):
        with pytest.raises(InvalidRequestError, match="max_sequence_length") as info:
            await client.generate(prompt="x" * 2000, params=FAST)
        assert info.value.field == "prompt"
        with pytest.raises(InvalidRequestError, match="token ids"):
            await client.generate(token_ids=[10**6], params=FAST)
        assert (await client.generate(messages=ASK, params=FAST)).finish_reason


async def test_leaving_early_or_cancelling_aborts_on_the_worker(client):
    with anyio.fail_after(60):
        async for _chunk in client.stream(messages=ASK, params=SLOW):
            assert await client.worker_load() == [1]
            break
        await asyncio.sleep(0)
        for _ in range(100):
            if await client.worker_load() == [0]:
                break
            await asyncio.sleep(0.05)
        assert await client.worker_load() == [0]

        async def consume():
            async for _ in client.stream(messages=ASK, params=SLOW):
                pass

        task = asyncio.create_task(consume())
        while await client.worker_load() != [1]:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if await client.worker_load() == [0]:
                break
            await asyncio.sleep(0.05)
        assert await client.worker_load() == [0]


async def test_fuzzed_frames_never_stop_a_worker(client):
    import random

    rng = random.Random(0)
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.connect(client._workers[0].endpoint)
    frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))) for _ in range(1500)]
    frames += [
        wire.encoder.encode(
            {
                "type": rng.choice(["submit", "abort", "hello", "ping", "chunk", "nope"]),
                "request_id": rng.choice([1, None, "x", [1]]),
                "params": rng.choice([{}, 3, {"gen_length": "x"}]),
            }
        )
        for _ in range(1500)
    ]
    frames.append(wire.encode(wire.Submit(request_id="not-greeted", params=FAST, prompt="x")))
    with anyio.fail_after(60):
        for lo in range(0, len(frames), 100):  # in rounds: a peer that never reads may lose replies
            for f in frames[lo : lo + 100]:
                await sock.send(f)
            for _ in frames[lo : lo + 100]:
                assert isinstance(wire.decode(await sock.recv()), wire.Error)
        assert (await client.generate(messages=ASK, params=FAST)).finish_reason
    sock.close(linger=0)


async def test_killed_or_stopped_worker_fails_its_streams_and_is_replaced():
    with anyio.fail_after(180):
        async with Client(workers=1, threads=1, heartbeat_timeout=2.0) as c:

            async def consume():
                async for _ in c.stream(messages=ASK, params=SLOW):
                    pass

            for sig, error in ((signal.SIGKILL, WorkerDiedError), (signal.SIGSTOP, None)):
                pid = c.welcome.pid
                tasks = [asyncio.create_task(consume()) for _ in range(3)]
                while await c.worker_load() != [3]:
                    await asyncio.sleep(0.02)
                os.kill(pid, sig)
                try:
                    for t in tasks:  # well before the worker is back (the bound only catches hangs)
                        with pytest.raises(error or WorkerUnresponsiveError) as info:
                            await t
                        if error is not None:
                            assert not isinstance(info.value, WorkerUnresponsiveError)
                    assert not c._workers[0].alive and not c._workers[0].inflight
                    await c.wait_ready(60)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                assert c.welcome.pid != pid
                assert (await c.generate(messages=ASK, params=FAST)).finish_reason
            assert c.restarts == 2


async def test_a_bad_model_path_fails_the_start_with_the_worker_s_own_message():
    with anyio.fail_after(120), pytest.raises(WorkerError, match="'/bad/path': no such directory"):
        async with Client(model="/bad/path", workers=1, threads=1):
            pass


async def test_several_workers_spread_and_agree_and_leave_nothing_behind():
    prompts = [[{"role": "user", "content": f"copy word{i}"}] for i in range(6)]
    with anyio.fail_after(120):
        async with Client(workers=2, threads=1) as c:
            directory = c._dir
            pids = {w.welcome.pid for w in c._workers}

            async def one(m):
                comp = await c.generate(messages=m, params=FAST)
                return comp.text

            texts = await asyncio.gather(*(one(m) for m in prompts))
            assert all(len(w.inflight) == 0 for w in c._workers)
        assert not os.path.exists(directory)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    from workers import Engine

    engine = Engine.from_pretrained(None)
    expected = [r.text for r in engine.generate([engine.encode(messages=m) for m in prompts], FAST)]
    assert texts == expected


async def test_exit_through_an_exception_cleans_up():
    with anyio.fail_after(60):
        with pytest.raises(RuntimeError):
            async with Client(workers=1, threads=1) as c:
                directory, pid = c._dir, c.welcome.pid
                raise RuntimeError("user code failed")
    assert not os.path.exists(directory)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ClientClosedError):
        await c.generate(messages=ASK, params=FAST)
