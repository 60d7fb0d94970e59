"""Liveness: dead, stopped and restarted workers, started by the client or attached with
connect, end every stream with a typed error and are served again; restarts back off and give
up; error frames always reach somebody. Fake workers (tests/fake_worker.py) and a hand-driven
peer socket keep it fast; heartbeat_timeout is 2 s. Waits are bounded with generous fail_after
only to catch hangs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import anyio
import pytest

from dinfer_async import (
    Client,
    DinferTimeoutError,
    SamplingParams,
    WorkerDiedError,
    WorkerError,
    WorkerUnresponsiveError,
)
from dinfer_async import protocol as wire
from tests.client_helpers import FakeClient, Peer, fake_worker, free_endpoint, stop, wait_gone

P = SamplingParams(gen_length=32, block_length=32)
LONG = ["--steps", "100000", "--step-delay", "0.01"]
HB = dict(heartbeat_timeout=2.0)


async def until(check, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def consume(client: Client) -> None:
    async for _ in client.stream(prompt="x", params=P):
        pass


async def started(client: Client, n: int) -> list[asyncio.Task]:
    """n streams that have each received a chunk."""
    tasks = [asyncio.create_task(consume(client)) for _ in range(n)]
    await until(lambda: sum(i.started for w in client._workers for i in w.inflight.values()) == n)
    return tasks


async def test_attached_worker_killed_then_restarted_on_the_same_endpoint():
    endpoint = free_endpoint()
    with anyio.fail_after(60):
        with fake_worker(endpoint, *LONG) as proc:
            client = await Client.connect(endpoint, **HB)
            first = client.welcome.pid
            tasks = await started(client, 2)
            proc.kill()
            for t in tasks:
                with pytest.raises(WorkerDiedError) as info:
                    await t
                assert not isinstance(info.value, WorkerUnresponsiveError)
            with pytest.raises(WorkerDiedError, match="wait_ready"):  # no hang: nobody serves
                await client.generate(prompt="x", params=P)
        with fake_worker(endpoint):  # a new worker on the endpoint is greeted and serves
            await client.wait_ready(30)
            assert client.welcome.pid != first
            assert (await client.generate(prompt="x", params=P)).finish_reason == "length"
        await client.close()


async def test_attached_worker_stopped_is_unresponsive_then_continued_serves_again():
    endpoint = free_endpoint()
    with fake_worker(endpoint, *LONG) as proc, anyio.fail_after(60):
        client = await Client.connect(endpoint, **HB)
        try:
            tasks = await started(client, 2)
            os.kill(proc.pid, signal.SIGSTOP)
            for t in tasks:
                with pytest.raises(WorkerUnresponsiveError):
                    await t
            assert client.workers_healthy == 0
            os.kill(proc.pid, signal.SIGCONT)
            await client.wait_ready(30)
            assert client.welcome.pid == proc.pid
            stream = client.stream(prompt="x", params=P)
            async with stream:
                async for _ in stream:
                    break
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            await client.close()


async def test_launched_worker_stopped_is_failed_killed_and_restarted():
    with anyio.fail_after(60):
        async with FakeClient(fake_args=lambda n: LONG, **HB) as client:
            pid = client.welcome.pid
            tasks = await started(client, 2)
            os.kill(pid, signal.SIGSTOP)
            try:
                for t in tasks:
                    with pytest.raises(WorkerUnresponsiveError):
                        await t
                await client.wait_ready(30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            assert client.welcome.pid != pid and wait_gone(pid)
            assert client.restarts == 1
            stream = client.stream(prompt="x", params=P)
            async with stream:
                async for _ in stream:
                    break


async def test_killed_replacement_while_loading_is_retried():
    # every start after the first takes a while to come up: kill it during that time
    def args(launch: int) -> list[str]:
        return ["--start-delay", "1.0"] if launch == 1 else []

    with anyio.fail_after(60):
        async with FakeClient(fake_args=args, **HB) as client:
            first = client.welcome.pid
            os.kill(first, signal.SIGKILL)
            await until(lambda: client._workers[0].process.pid != first)
            assert client.launches == 2
            os.kill(client._workers[0].process.pid, signal.SIGKILL)  # still sleeping
            await client.wait_ready(30)
            assert client.restarts == 2 and client.worker_states == ["healthy"]
            assert (await client.generate(prompt="x", params=P)).finish_reason == "length"


async def test_restarts_give_up_after_max_restarts_with_a_clear_error():
    def args(launch: int) -> list[str]:
        return ["--fail-start", "RuntimeError: out of memory"] if launch else []

    with anyio.fail_after(60):
        async with FakeClient(fake_args=args, max_restarts=2, **HB) as client:
            os.kill(client.welcome.pid, signal.SIGKILL)
            await until(lambda: client.workers_healthy == 0)
            with pytest.raises(WorkerError, match="out of memory"):
                await client.wait_ready(30)
            assert client.worker_states == ["failed"] and client.launches == 3
            with pytest.raises(WorkerError, match="max_restarts=2"):
                await client.generate(prompt="x", params=P)


async def test_while_restarting_wait_ready_times_out_honestly():
    def args(launch: int) -> list[str]:
        return ["--start-delay", "30"] if launch else []

    with anyio.fail_after(60):
        async with FakeClient(fake_args=args, **HB) as client:
            os.kill(client.welcome.pid, signal.SIGKILL)
            await until(lambda: client.workers_healthy == 0)
            with pytest.raises(DinferTimeoutError, match="restarting|starting"):
                await client.wait_ready(0.3)
            with pytest.raises(WorkerDiedError, match="starting|restarting"):
                await client.generate(prompt="x", params=P)


async def test_requests_go_to_the_healthy_worker_after_one_died():
    def args(launch: int) -> list[str]:
        return ["--start-delay", "30"] if launch >= 2 else []  # no quick replacement

    with anyio.fail_after(60):
        async with FakeClient(workers=2, fake_args=args, **HB) as client:
            dead, alive = client._workers
            os.kill(dead.welcome.pid, signal.SIGKILL)
            await until(lambda: client.workers_healthy == 1)
            results = await asyncio.gather(
                *(client.generate(prompt="x", params=P) for _ in range(6))
            )
            assert [r.finish_reason for r in results] == ["length"] * 6
            assert alive.state == "healthy" and dead.state != "healthy"


async def test_an_unknown_connection_error_makes_the_client_greet_again():
    endpoint = free_endpoint()
    peer = Peer(endpoint)
    try:
        with anyio.fail_after(30):
            client = await peer.connected(endpoint, **HB)
            task = asyncio.create_task(consume(client))
            await peer.next(wire.Submit)
            # as a worker restarted on the endpoint answers a connection it has not greeted
            await peer.send(wire.Error(None, "hello", "send Hello (with the shared secret) first"))
            with pytest.raises(WorkerDiedError, match="restarted"):
                await task
            await peer.next(wire.Hello)
            await peer.send(peer.welcome())
            await client.wait_ready(10)
            await client.close()
    finally:
        peer.close()


async def test_a_send_cut_short_by_a_dying_worker_is_worker_died_not_cancelled():
    """The supervisor closing a dying worker's socket cancels a send in progress: the caller
    gets WorkerDiedError, not a CancelledError that looks like its own cancellation."""
    endpoint = free_endpoint()
    peer = Peer(endpoint)
    try:
        with anyio.fail_after(30):
            client = await peer.connected(endpoint, **HB)
            sock = client._workers[0].socket
            send = sock.send

            def cut_short(frame, *args, **kwargs):
                if args or kwargs:  # not the Submit (the abort that follows, ...)
                    return send(frame, *args, **kwargs)
                future = asyncio.get_running_loop().create_future()
                future.cancel()
                return future

            sock.send = cut_short
            with pytest.raises(WorkerDiedError, match="went down while the request was sent"):
                await consume(client)
            del sock.send  # the socket's own send again
            await client.close()
    finally:
        peer.close()


async def test_a_frame_level_error_fails_the_requests_it_may_be_about():
    endpoint = free_endpoint()
    peer = Peer(endpoint)
    try:
        with anyio.fail_after(30):
            client = await peer.connected(endpoint, **HB)
            running = asyncio.create_task(consume(client))
            rid = None
            while rid is None:
                msg = await peer.recv()
                rid = msg.request_id if isinstance(msg, wire.Submit) else None
            chunk = wire.Chunk(rid, 0, [5] * 4, "xxxx", [0], False, "x")
            await peer.send(wire.Updates([chunk]))  # this one started
            await until(lambda: client._workers[0].inflight[rid].started)
            pending = asyncio.create_task(consume(client))
            await peer.next(wire.Submit)
            await peer.send(wire.Error(None, "frame", "frame too large"))
            with pytest.raises(WorkerError, match="frame too large"):
                await pending
            assert not running.done()
            done = wire.Chunk(rid, 0, [5] * 4, "xxxx", [1, 2, 3], True, "xxx", "length", {})
            await peer.send(wire.Updates([done]))
            await running
            await client.close()
    finally:
        peer.close()


async def test_a_refused_handshake_is_a_clear_error():
    endpoint = free_endpoint()
    peer = Peer(endpoint)
    try:
        with anyio.fail_after(30):
            opening = asyncio.create_task(Client.connect(endpoint, **HB))
            assert isinstance(await peer.recv(), wire.Hello)
            await peer.send(wire.Error(None, "secret", "wrong shared secret"))
            with pytest.raises(Exception, match="refused the handshake: secret"):
                await opening
    finally:
        peer.close()


def test_fake_processes_are_cleaned_up():
    """The helpers' own hygiene: a stopped fake is continued and killed."""
    with fake_worker(free_endpoint()) as proc:
        os.kill(proc.pid, signal.SIGSTOP)
    assert proc.returncode is not None
    stop(proc)


async def test_a_failing_background_task_reaches_the_streams_and_reconnects():
    endpoint = free_endpoint()
    peer = Peer(endpoint)
    try:
        with anyio.fail_after(30):
            client = await peer.connected(endpoint, **HB)
            task = asyncio.create_task(consume(client))
            await peer.next(wire.Submit)

            def broken(w, msg):  # stands for a bug in the client's frame handling
                raise RuntimeError("bug")

            client._refused = broken
            await peer.send(wire.Error(None, "frame", "anything"))
            with pytest.raises(WorkerError, match="lost track"):
                await task
            await peer.next(wire.Hello)  # a new connection greets
            await peer.send(peer.welcome())
            await client.wait_ready(10)
            await client.close()
    finally:
        peer.close()
