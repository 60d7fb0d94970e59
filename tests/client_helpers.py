"""Shared pieces of the client's life-cycle and liveness tests: fake worker processes (no model,
no torch: tests/fake_worker.py), a client that launches them, and an in-test peer socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TypeVar

import zmq
import zmq.asyncio

from dinfer_async import Client
from dinfer_async import protocol as wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = TypeVar("M", bound=wire.Message)
FAKE = [sys.executable, os.path.join(ROOT, "tests", "fake_worker.py")]


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class FakeClient(Client):
    """A Client whose launched workers are fake ones; `fake_args(launch)` gives the extra flags
    of the launch-th start (0 = first) of any worker."""

    def __init__(self, *args, fake_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake_args = fake_args or (lambda launch: [])
        self.launches = 0

    def _worker_argv(self, endpoint: str) -> list[str]:
        extra = self.fake_args(self.launches)
        self.launches += 1
        return [*FAKE, "--endpoint", endpoint, *extra]


@contextlib.contextmanager
def fake_worker(endpoint: str, *args: str) -> Iterator[subprocess.Popen]:
    """A fake worker started by hand (as if with dinfer-worker); killed (and continued, in case
    a test stopped it) on exit."""
    proc = subprocess.Popen(
        [*FAKE, "--endpoint", endpoint, *args], cwd=ROOT, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Peer:
    """A ROUTER socket the test drives by hand, to send the client exact frames."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.client: bytes = b""

    async def recv(self) -> wire.Message:
        self.client, payload = await self.sock.recv_multipart()
        return wire.decode(payload)

    async def send(self, msg: wire.Message) -> None:
        await self.sock.send_multipart([self.client, wire.encode(msg)])

    async def next(self, kind: type[M]) -> M:
        """The next message of `kind`, skipping others (heartbeat pings may come first)."""
        while not isinstance(msg := await self.recv(), kind):
            pass
        return msg

    async def connected(self, endpoint: str, **kwargs) -> Client:
        """`Client.connect(endpoint, **kwargs)`, answered with a Welcome by this peer."""
        opening = asyncio.create_task(Client.connect(endpoint, **kwargs))
        assert isinstance(await self.recv(), wire.Hello)
        await self.send(self.welcome())
        return await opening

    def welcome(self, model: str = "fake") -> wire.Welcome:
        return wire.Welcome(wire.PROTOCOL_VERSION, model, f"fake:{model}", 1000, 256, 1, 2, 1)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False
