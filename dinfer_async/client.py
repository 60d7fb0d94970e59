"""Client: asyncio access to worker processes over ZeroMQ.

    async with Client(model=None, workers=1) as client:
        async for chunk in client.stream(messages=[...], params=SamplingParams(...)):
            print(chunk.block, chunk.text)

The client either launches and supervises its workers (each a `dinfer-worker` process bound to
an ipc:// socket in a private directory) or attaches to running ones with `Client.connect`.
Each request is routed to the least-loaded worker; each worker socket has one reader task that
hands chunks to per-request buffers, so a slow consumer never blocks other streams or a worker.
When a buffer is full, consecutive chunks of the same block are merged (latest block state,
union of committed positions, concatenated stable text): memory stays bounded and no stable text
is lost. A worker that exits fails its in-flight streams with WorkerDiedError and is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import AsyncIterator

import anyio
import msgspec
import zmq
import zmq.asyncio

from dinfer_async import protocol as wire
from dinfer_async.errors import (
    ClientClosedError,
    DinferError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
)
from dinfer_async.params import SamplingParams
from dinfer_async.transport import secure_dealer

ROLES = ("system", "user", "assistant", "tool")


class Completion(msgspec.Struct):
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict


class _Inbox:
    """One request's bounded buffer of chunks (or the error that ends it)."""

    def __init__(self, limit: int):
        self.items: deque = deque()
        self.limit = limit
        self.ready = asyncio.Event()

    def put(self, item) -> None:
        last = self.items[-1] if self.items else None
        if (
            len(self.items) >= self.limit
            and isinstance(item, wire.Chunk)
            and isinstance(last, wire.Chunk)
            and last.block == item.block
            and not last.final
        ):
            item.committed = sorted(set(last.committed) | set(item.committed))
            item.stable_text = last.stable_text + item.stable_text
            self.items[-1] = item
        else:
            self.items.append(item)
        self.ready.set()

    async def get(self):
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


class _Worker:
    """One worker connection: socket, optional process, requests in flight."""

    def __init__(self, index: int, endpoint: str):
        self.index, self.endpoint = index, endpoint
        self.process: anyio.abc.Process | None = None
        self.socket: zmq.asyncio.Socket | None = None
        self.welcome: wire.Welcome | None = None
        self.inflight: dict[str, _Inbox] = {}
        self.pongs: asyncio.Queue = asyncio.Queue()
        self.alive = False

    def fail_all(self, error: Exception) -> None:
        for inbox in self.inflight.values():
            inbox.put(error)
        self.inflight.clear()


class Client:
    def __init__(
        self,
        model: str | None = None,
        workers: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 32,
        threads: int = 0,
        stream_buffer: int = 64,
        startup_timeout: float = 300.0,
        endpoints: list[str] | None = None,
        secret: str = "",
        server_key: str | None = None,
        client_key: str | None = None,
    ):
        if workers < 1:
            raise InvalidRequestError("workers", f"{workers!r} must be >= 1")
        self.model, self.device, self.dtype = model, device, dtype
        self.max_batch_size, self.threads = max_batch_size, threads
        self.stream_buffer, self.startup_timeout, self.secret = (
            stream_buffer,
            startup_timeout,
            secret,
        )
        self.server_key, self.client_key = server_key, client_key  # CURVE key files (remote)
        self._external = endpoints is not None
        self._count = len(endpoints) if endpoints else workers
        self._endpoints = endpoints
        self._workers: list[_Worker] = []
        self._dir: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, endpoint: str | list[str], secret: str = "", **kwargs) -> Client:
        """Attach to workers started separately with `dinfer-worker`; close with `await
        client.close()`."""
        client = cls(
            endpoints=[endpoint] if isinstance(endpoint, str) else list(endpoint),
            secret=secret,
            **kwargs,
        )
        return await client.__aenter__()

    async def __aenter__(self) -> Client:
        if self._tg is not None:
            return self
        self._ctx = zmq.asyncio.Context()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            if not self._external:
                self._dir = tempfile.mkdtemp(prefix="dinfer-")
                os.chmod(self._dir, 0o700)
            for i in range(self._count):
                endpoint = (
                    self._endpoints[i]
                    if self._endpoints is not None
                    else f"ipc://{self._dir}/worker{i}.sock"
                )
                worker = _Worker(i, endpoint)
                self._workers.append(worker)
                await self._start(worker)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reader tasks, end launched workers, remove sockets; in-flight streams get
        ClientClosedError."""
        if self._closing:
            return
        self._closing = True
        for w in self._workers:
            w.fail_all(ClientClosedError("the client was closed"))
            w.alive = False
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            with contextlib.suppress(BaseException):
                await self._tg.__aexit__(None, None, None)
        for w in self._workers:
            await self._stop_process(w)
            if w.socket is not None:
                w.socket.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _start(self, worker: _Worker) -> None:
        if not self._external:
            path = worker.endpoint[len("ipc://") :]
            if os.path.exists(path):
                os.unlink(path)
            cmd = [
                sys.executable,
                "-m",
                "workers.main",
                "--endpoint",
                worker.endpoint,
                "--device",
                self.device,
                "--dtype",
                self.dtype,
                "--max-batch-size",
                str(self.max_batch_size),
                "--threads",
                str(self.threads),
                "--exit-with-parent",
            ]
            if self.model is not None:
                cmd += ["--model", str(self.model)]
            worker.process = await anyio.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None
            )
        assert self._ctx is not None and self._tg is not None, "started in __aenter__"
        sock = secure_dealer(self._ctx.socket(zmq.DEALER), self.server_key, self.client_key)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(worker.endpoint)
        worker.socket = sock
        await sock.send(wire.encode(wire.Hello(protocol=wire.PROTOCOL_VERSION, secret=self.secret)))
        with anyio.fail_after(self.startup_timeout):
            while True:
                if worker.process is not None and worker.process.returncode is not None:
                    raise WorkerDiedError(
                        f"worker {worker.index} exited with {worker.process.returncode} while "
                        "starting"
                    )
                if await sock.poll(200):
                    msg = wire.decode(await sock.recv())
                    if isinstance(msg, wire.Welcome):
                        break
                    if isinstance(msg, wire.Error):
                        raise DinferError(
                            f"worker {worker.index} refused the handshake: {msg.field}: "
                            f"{msg.message}"
                        )
        worker.welcome, worker.alive = msg, True
        self._tg.start_soon(self._read, worker, sock)
        if worker.process is not None:
            self._tg.start_soon(self._watch, worker, worker.process)

    async def _stop_process(self, worker: _Worker) -> None:
        proc = worker.process
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        with anyio.move_on_after(5):
            await proc.wait()
            return
        proc.kill()
        await proc.wait()

    async def _read(self, worker: _Worker, sock) -> None:
        while True:
            try:
                frame = await sock.recv()
            except zmq.ZMQError:  # the socket was closed: this worker is being restarted or closed
                return
            except asyncio.CancelledError:
                if sock.closed:  # closing a socket cancels its pending receive
                    return
                raise
            try:
                msg = wire.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(msg, wire.Updates):
                for chunk in msg.chunks:
                    inbox = worker.inflight.get(chunk.request_id)
                    if inbox is not None:
                        inbox.put(chunk)
                        if chunk.finish_reason is not None:
                            worker.inflight.pop(chunk.request_id, None)
            elif isinstance(msg, wire.Pong):
                worker.pongs.put_nowait(msg)
            elif isinstance(msg, wire.Error) and msg.request_id is not None:
                inbox = worker.inflight.pop(msg.request_id, None)
                if inbox is not None:
                    error = (
                        WorkerError(msg.message)
                        if msg.field == "engine"
                        else InvalidRequestError(msg.field, msg.message)
                    )
                    inbox.put(error)

    async def _watch(self, worker: _Worker, proc) -> None:
        code = await proc.wait()
        if self._closing or worker.process is not proc:
            return
        worker.alive = False
        pid = worker.welcome.pid if worker.welcome is not None else "?"
        worker.fail_all(WorkerDiedError(f"worker {worker.index} (pid {pid}) exited with {code}"))
        if worker.socket is not None:
            worker.socket.close(linger=0)
        try:
            await self._start(worker)
        except Exception as e:  # stays dead; requests get WorkerDiedError from _pick
            print(f"dinfer-async: could not restart worker {worker.index}: {e}", file=sys.stderr)

    # ---- requests ------------------------------------------------------------------------------

    @property
    def welcome(self) -> wire.Welcome:
        welcome = self._workers[0].welcome
        assert welcome is not None, "the client is connected"
        return welcome

    def _pick(self) -> _Worker:
        alive = [w for w in self._workers if w.alive]
        if self._closing or self._tg is None:
            raise ClientClosedError(
                "the client is not open: use `async with Client(...)` or Client.connect"
            )
        if not alive:
            raise WorkerDiedError("no worker is running (restarting)")
        return min(alive, key=lambda w: len(w.inflight))

    def _check(self, prompt, messages, token_ids, params) -> SamplingParams:
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise InvalidRequestError(
                "prompt", "give exactly one of prompt (raw text), messages or token_ids"
            )
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise InvalidRequestError("prompt", "must be a non-empty string")
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise InvalidRequestError(
                    "messages", "must be a non-empty list of {role, content} objects"
                )
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError(
                        f"messages[{i}]", "must be an object with a string 'content'"
                    )
                if m.get("role") not in ROLES:
                    raise InvalidRequestError(
                        f"messages[{i}].role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}"
                    )
        if token_ids is not None and (
            not token_ids or not all(type(t) is int and t >= 0 for t in token_ids)
        ):
            raise InvalidRequestError(
                "token_ids", "must be a non-empty list of non-negative integers"
            )
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", "must be a SamplingParams")
        limit = min((w.welcome.max_gen_length for w in self._workers if w.welcome), default=None)
        return params.validate(max_gen_length=limit)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        text_only: bool = False,
    ) -> AsyncIterator[wire.Chunk | str]:
        """Yield a Chunk after every step that changed the request (or, with text_only, each
        non-empty piece of newly stable text). The last chunk carries finish_reason and stats.
        Leaving the loop early, or cancelling, aborts the request on its worker."""
        params = self._check(prompt, messages, token_ids, params)
        worker = self._pick()
        rid = uuid.uuid4().hex
        inbox = _Inbox(self.stream_buffer)
        worker.inflight[rid] = inbox
        submit = wire.Submit(
            request_id=rid, params=params, prompt=prompt, messages=messages, token_ids=token_ids
        )
        finished = False
        assert worker.socket is not None, "_pick returns a live worker"
        try:
            await worker.socket.send(wire.encode(submit))
            while True:
                item = await inbox.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                if not text_only:
                    yield item
                elif item.stable_text:
                    yield item.stable_text
                if finished:
                    return
        finally:
            worker.inflight.pop(rid, None)
            if not finished and worker.alive and worker.socket is not None:
                with contextlib.suppress(zmq.ZMQError):
                    worker.socket.send(wire.encode(wire.Abort(rid)), flags=zmq.NOBLOCK)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
    ) -> Completion:
        """Run one request to the end and return its Completion."""
        text: list[str] = []
        blocks: dict[int, list[int]] = {}
        last: wire.Chunk | None = None
        async for chunk in self.stream(
            prompt, messages=messages, token_ids=token_ids, params=params
        ):
            assert isinstance(chunk, wire.Chunk)  # not text_only
            text.append(chunk.stable_text)
            if chunk.final:
                blocks[chunk.block] = chunk.tokens
            last = chunk
        assert last is not None and last.finish_reason is not None, "a stream ends finished"
        eos = self.welcome.eos_token_id
        ids = [t for b in sorted(blocks) for t in blocks[b]]
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return Completion(
            text="".join(text),
            token_ids=ids,
            finish_reason=last.finish_reason,
            stats=last.stats or {},
        )

    async def worker_load(self) -> list[int]:
        """Each worker's count of active requests, as the worker itself reports it."""
        counts = []
        for w in self._workers:
            if not w.alive:
                counts.append(0)
                continue
            assert w.socket is not None, "a live worker has a socket"
            await w.socket.send(wire.encode(wire.Ping()))
            with anyio.fail_after(10):
                counts.append((await w.pongs.get()).active)
        return counts
