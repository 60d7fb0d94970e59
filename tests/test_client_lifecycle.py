"""The client's life cycle under any task structure, its streams' clean-up, start-up failures
and stale directories; against fake workers (tests/fake_worker.py), so each test takes well
under a second of work. Waits are bounded with generous fail_after only to catch hangs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tempfile

import anyio
import pytest

from dinfer_async import (
    Client,
    ClientClosedError,
    ConnectError,
    InvalidRequestError,
    SamplingParams,
    WorkerError,
    WorkerMismatchError,
)
from dinfer_async import protocol as wire
from tests.client_helpers import FakeClient, dead_pid, fake_worker, free_endpoint

P = SamplingParams(gen_length=32, block_length=32)
LONG = ["--steps", "100000", "--step-delay", "0.01"]  # a request that runs until aborted


async def until(check, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def load_is(client: Client, counts: list[int]) -> bool:
    return await client.worker_load() == counts


async def test_close_from_a_sibling_task_ends_streams_and_spares_the_opener():
    with anyio.fail_after(60):
        async with FakeClient(fake_args=lambda n: LONG) as client:

            async def consume() -> None:
                async for _ in client.stream(prompt="x", params=P):
                    pass

            streams = [asyncio.create_task(consume()) for _ in range(3)]
            await until(lambda: load_is(client, [3]))
            closer = asyncio.create_task(client.close())
            for t in streams:
                with pytest.raises(ClientClosedError):
                    await t
            await closer
            await asyncio.sleep(0.01)  # the opening task is not cancelled by anything
            await client.close()  # idempotent
        await asyncio.sleep(0.01)  # nor after leaving `async with`
        with pytest.raises(ClientClosedError):
            await client.generate(prompt="x", params=P)
        assert client.workers_healthy == 0


async def test_concurrent_closes_wait_for_one_shutdown():
    with anyio.fail_after(60):
        client = await FakeClient().__aenter__()
        pid = client.welcome.pid
        await asyncio.gather(*(client.close() for _ in range(4)))
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_connect_in_a_child_task_then_use_and_close_from_others():
    endpoint = free_endpoint()
    with fake_worker(endpoint), anyio.fail_after(60):
        clients: list[Client] = []

        async def open_it() -> None:
            clients.append(await Client.connect(endpoint, connect_timeout=30))

        await asyncio.create_task(open_it())
        [client] = clients
        results = await asyncio.gather(
            *(asyncio.create_task(client.generate(prompt="x", params=P)) for _ in range(3))
        )
        assert [r.finish_reason for r in results] == ["length"] * 3
        await asyncio.create_task(client.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ClientClosedError):
            await client.generate(prompt="x", params=P)


async def test_open_in_one_task_close_in_another_with_async_with_in_a_third():
    with anyio.fail_after(60):
        client = FakeClient()
        await asyncio.create_task(client.__aenter__())
        assert (await client.generate(prompt="x", params=P)).finish_reason == "length"
        await asyncio.create_task(client.close())
        async with client:  # entering a closed client does not revive it
            with pytest.raises(ClientClosedError):
                await client.generate(prompt="x", params=P)


async def test_connect_to_nothing_is_a_typed_error_naming_the_endpoint():
    endpoint = free_endpoint()
    with anyio.fail_after(60), pytest.raises(ConnectError, match=endpoint) as info:
        await Client.connect(endpoint, connect_timeout=0.5)
    assert isinstance(info.value, TimeoutError)


async def test_a_malformed_endpoint_is_an_invalid_request():
    with anyio.fail_after(60), pytest.raises(InvalidRequestError, match="endpoint"):
        await Client.connect("127.0.0.1:5555")


async def test_workers_of_different_models_are_refused():
    a, b = free_endpoint(), free_endpoint()
    with (
        fake_worker(a, "--model", "one"),
        fake_worker(b, "--model", "two"),
        anyio.fail_after(60),
        pytest.raises(WorkerMismatchError, match="'two'|'one'"),
    ):
        await Client.connect([a, b], connect_timeout=30)


async def test_a_worker_that_exits_while_starting_names_its_last_stderr_line(caplog):
    caplog.set_level(logging.INFO, logger="dinfer_async.worker")
    fail = ["--fail-start", "ValueError: no config.json in /bad/path"]
    with anyio.fail_after(60), pytest.raises(WorkerError, match="no config.json in /bad/path"):
        async with FakeClient(fake_args=lambda n: fail):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "dinfer_async.worker"]
    assert any("fake-worker: loading" in line for line in lines), lines


async def test_leaving_async_with_on_a_stream_aborts_it():
    with anyio.fail_after(60):
        async with FakeClient(fake_args=lambda n: LONG) as client:
            async with client.stream(prompt="x", params=P) as stream:
                async for _ in stream:
                    break
                assert await client.worker_load() == [1]
            await until(lambda: load_is(client, [0]))

            stream = client.stream(prompt="x", params=P)
            async with contextlib.aclosing(stream):
                async for _ in stream:
                    break
            await until(lambda: load_is(client, [0]))


async def test_breaking_out_and_dropping_the_stream_aborts_it():
    with anyio.fail_after(60):
        async with FakeClient(fake_args=lambda n: LONG) as client:
            async for _ in client.stream(prompt="x", params=P):
                break
            gc.collect()
            await until(lambda: load_is(client, [0]))


async def test_a_killed_client_s_directory_is_removed_by_the_next_one():
    base = tempfile.gettempdir()
    stale = tempfile.mkdtemp(prefix="dinfer-", dir=base)
    with open(os.path.join(stale, "pid"), "w") as f:
        f.write(f"{dead_pid()}\n")
    open(os.path.join(stale, "worker0.sock"), "w").close()
    live = tempfile.mkdtemp(prefix="dinfer-", dir=base)
    with open(os.path.join(live, "pid"), "w") as f:
        f.write(f"{os.getppid()}\n")
    other = tempfile.mkdtemp(prefix="dinfer-", dir=base)  # not a client's: no pid file
    try:
        with anyio.fail_after(60):
            async with FakeClient() as client:
                assert os.path.exists(os.path.join(client._dir, "pid"))
        assert not os.path.exists(stale)
        assert os.path.exists(live) and os.path.exists(other)
    finally:
        for d in (stale, live, other):
            with contextlib.suppress(OSError):
                for name in os.listdir(d):
                    os.unlink(os.path.join(d, name))
                os.rmdir(d)


def test_a_full_buffer_merges_chunks_of_one_block_keeping_every_change():
    """A slow reader's buffer merges consecutive chunks of one block: the latest tokens, and the
    union of committed and revised positions (token edits), and all the stable text."""
    from dinfer_async.client import _Inbox

    inbox = _Inbox(limit=1)
    inbox.put(wire.Chunk("r", 0, [1, 9, 9], "a░░", [0], False, "a", revised=[]))
    inbox.put(wire.Chunk("r", 0, [2, 3, 9], "bc░", [1], False, "", revised=[0]))
    inbox.put(wire.Chunk("r", 0, [2, 3, 4], "bcd", [2], True, "bcd"[1:], revised=[1]))
    (merged,) = inbox.items
    assert merged.tokens == [2, 3, 4] and merged.final
    assert merged.committed == [0, 1, 2] and merged.revised == [0, 1]
    assert merged.stable_text == "acd"
