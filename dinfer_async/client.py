"""Client: asyncio access to worker processes over ZeroMQ.

    async with Client(model=None, workers=1) as client:
        async for chunk in client.stream(messages=[...], params=SamplingParams(...)):
            print(chunk.block, chunk.text)

The client either launches and supervises its workers (each a `dinfer-worker` process bound to
an ipc:// socket in a private directory) or attaches to running ones with `Client.connect`.

Background work (per worker: a supervisor, a frame reader, a socket-event reader, a heartbeat)
runs in asyncio tasks the client creates and keeps, never in a task group around the caller's
code, so opening, using and closing the client work from any task. Liveness: a launched worker
that exits is noticed at once; any worker that stops answering ZeroMQ's own heartbeats (ZMTP
PING/PONG, answered by the peer's I/O thread even during a long engine step) for
`heartbeat_timeout` seconds loses its connection. Either way its streams end with
WorkerDiedError (or WorkerUnresponsiveError), a launched worker is restarted with backoff up to
`max_restarts` times in a row, and an attached one is greeted again as soon as something answers
on its endpoint. Each request goes to the least-loaded healthy worker; each stream has a bounded
buffer in which, when full, consecutive chunks of the same block are merged (latest block state,
union of committed positions, concatenated stable text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar, cast

import msgspec
import zmq
import zmq.asyncio

from dinfer_async import placement, validation
from dinfer_async import protocol as wire
from dinfer_async.errors import (
    ClientClosedError,
    ConnectError,
    DinferError,
    DinferTimeoutError,
    InvalidRequestError,
    WorkerDiedError,
    WorkerError,
    WorkerMismatchError,
    WorkerUnresponsiveError,
)
from dinfer_async.params import SamplingParams
from dinfer_async.transport import secure_dealer
from dinfer_async.validation import Limits, check_request

T = TypeVar("T")
log = logging.getLogger("dinfer_async.worker")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0  # seconds between restarts: doubling, capped
STABLE_AFTER = 10.0  # a worker healthy this long has its count of restarts in a row reset
STDERR_TAIL = 20  # lines of a launched worker's stderr kept for error messages
DIR_PREFIX = "dinfer-"

# worker states; `healthy` is the only one that takes requests
STARTING, HEALTHY, RECONNECTING, RESTARTING, FAILED, CLOSED = (
    "starting",
    "healthy",
    "reconnecting",
    "restarting",
    "failed",
    "closed",
)


class Completion(msgspec.Struct):
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict


class _Inbox:
    """One request's bounded buffer of chunks (or the error that ends it)."""

    def __init__(self, limit: int):
        self.items: deque[wire.Chunk | Exception] = deque()
        self.limit = limit
        self.ready = asyncio.Event()
        self.started = False  # a chunk arrived: the worker accepted the request

    def put(self, item: wire.Chunk | Exception) -> None:
        last = self.items[-1] if self.items else None
        if isinstance(item, wire.Chunk):
            self.started = True
        if (
            len(self.items) >= self.limit
            and isinstance(item, wire.Chunk)
            and isinstance(last, wire.Chunk)
            and last.block == item.block
            and not last.final
        ):
            item.committed = sorted(set(last.committed) | set(item.committed))
            item.revised = sorted(set(last.revised) | set(item.revised))
            item.stable_text = last.stable_text + item.stable_text
            self.items[-1] = item
        else:
            self.items.append(item)
        self.ready.set()

    async def get(self) -> wire.Chunk | Exception:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception as seen (nobody may await a heartbeat's pong)."""
    if not future.cancelled():
        future.exception()


class _Worker:
    """One worker: its connection, its process when the client launched it, its requests."""

    def __init__(self, index: int, endpoint: str, owned: bool):
        self.index, self.endpoint, self.owned = index, endpoint, owned
        self.process: asyncio.subprocess.Process | None = None
        self.socket: zmq.asyncio.Socket | None = None
        self.monitor: zmq.asyncio.Socket | None = None
        self.welcome: wire.Welcome | None = None
        self.inflight: dict[str, _Inbox] = {}
        self.orphans: set[str] = set()  # requests failed on a lost connection, to abort later
        self.pongs: deque[asyncio.Future] = deque()
        self.state = STARTING
        self.failure: DinferError | None = None  # why it is FAILED
        self.restarts = 0  # restarts so far
        self.in_a_row = 0  # restarts since it was last stable
        self.last_heard = 0.0  # loop time of the last frame from it
        self.since = 0.0  # loop time of the last state change
        self.healthy_at = 0.0  # loop time of the last Welcome
        self.hello_at = 0.0  # loop time of the last Hello sent
        self.stderr: deque[str] = deque(maxlen=STDERR_TAIL)
        # this connection's reader, monitor and heartbeat
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def alive(self) -> bool:
        return self.state == HEALTHY

    @property
    def name(self) -> str:
        pid = f" (pid {self.welcome.pid})" if self.welcome else ""
        return f"worker {self.index} at {self.endpoint}{pid}"

    def fail_all(self, error: Exception) -> None:
        for inbox in self.inflight.values():
            inbox.put(error)
        self.inflight.clear()
        while self.pongs:
            pong = self.pongs.popleft()
            if not pong.done():
                pong.set_exception(error)


class _Stream:
    """What `Client.stream` returns: an async iterator over one request's chunks that is also an
    async context manager. The request is sent on the first `__anext__`; it is aborted on its
    worker when the stream is left early through `async with`, `aclose()`, cancellation, or when
    the stream object is garbage collected (a bare `break` cannot be seen while the object is
    still referenced: use `async with` or `contextlib.aclosing` then)."""

    def __init__(self, client: Client, request: dict, text_only: bool):
        self._client, self._request, self._text_only = client, request, text_only
        self._worker: _Worker | None = None
        self._rid = ""
        self._inbox: _Inbox | None = None
        self._done = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def __aiter__(self) -> _Stream:
        return self

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._end()

    async def aclose(self) -> None:
        self._end()

    async def __anext__(self) -> wire.Chunk | str:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._inbox is None:
                await self._submit()
            inbox = self._inbox
            assert inbox is not None, "_submit sets the inbox"
            while True:
                item = await inbox.get()
                if isinstance(item, Exception):
                    self._done = True
                    raise item
                if item.finish_reason is not None:
                    self._done = True
                    self._end()
                if not self._text_only:
                    return item
                if item.stable_text:
                    return item.stable_text
                if self._done:
                    raise StopAsyncIteration
        except BaseException:
            self._end()  # cancelled, or the request failed: nothing left to run on the worker
            raise

    async def _submit(self) -> None:
        client, r = self._client, self._request
        params = client._check(r["prompt"], r["messages"], r["token_ids"], r["params"])
        worker = client._pick()
        # _pick returned a healthy worker (no await since): only a connected worker is
        # welcomed, and its socket is closed only after it has left the healthy state
        assert worker.socket is not None, "a healthy worker has a socket"
        self._loop = asyncio.get_running_loop()
        self._worker, self._rid = worker, uuid.uuid4().hex
        self._inbox = _Inbox(client.stream_buffer)
        worker.inflight[self._rid] = self._inbox
        frame = wire.encode(
            wire.Submit(
                request_id=self._rid,
                params=params,
                prompt=r["prompt"],
                messages=r["messages"],
                token_ids=r["token_ids"],
            )
        )
        try:
            await _bounded(worker.socket.send(frame), client.heartbeat_timeout)
        except (asyncio.TimeoutError, zmq.ZMQError) as e:
            raise WorkerDiedError(f"could not send the request to {worker.name}: {e!r}") from e
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
            if cancelling is None or cancelling():
                raise  # the caller cancelled us (or, on 3.10, we cannot tell)
            # the send itself was cancelled: the supervisor closed the socket of a dying worker
            raise WorkerDiedError(f"{worker.name} went down while the request was sent") from None

    def _end(self) -> None:
        """Forget the request; abort it on its worker unless it already ended there."""
        worker, finished = self._worker, self._done
        self._done = True
        if worker is None or self._rid not in worker.inflight:
            return
        del worker.inflight[self._rid]
        if not finished:
            self._client._send_now(worker, wire.Abort(self._rid))

    def __del__(self) -> None:
        if self._done or self._worker is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to abort on
            self._loop.call_soon_threadsafe(self._end)


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
        heartbeat_timeout: float = 10.0,
        connect_timeout: float = 30.0,
        max_restarts: int = 5,
        server_key: str | None = None,
        client_key: str | None = None,
        tensor_parallel_size: int = 1,
        expert_parallel: bool | str = False,
        gpus: list[int] | None = None,
        steps_per_check: int | None = None,
        rank_timeout: float | None = None,
    ):
        """server_key / client_key: CURVE key files for remote workers (see dinfer-keys and
        README "Remote workers (CURVE)"): the worker's public key, this client's secret key.

        tensor_parallel_size T: each launched worker is a group of T processes sharing the
        model (README "Beyond one GPU"); expert_parallel: MoE models split their experts over
        them too (True or "all_reduce", or "all_to_all": see dinfer-worker
        --expert-parallel-dispatch). With device="cuda", worker i runs on gpus[i*T:(i+1)*T]
        (default: every visible GPU); too few GPUs is an InvalidRequestError here, before
        anything starts. rank_timeout: seconds a group's step may run before rank 0 declares a
        rank hung and the group is restarted (dinfer-worker --rank-timeout; None: its default).
        steps_per_check: the workers' decoding steps between host checks (None: their default;
        answers do not depend on it)."""
        if workers < 1:
            raise InvalidRequestError("workers", f"{workers!r} must be >= 1")
        validation.check_parallel(tensor_parallel_size, expert_parallel)
        validation.check_steps_per_check(steps_per_check)
        if rank_timeout is not None and not rank_timeout >= 0:
            raise InvalidRequestError(
                "rank_timeout", f"{rank_timeout!r} must be a number of seconds >= 0 (0: off)"
            )
        for name, value in (
            ("heartbeat_timeout", heartbeat_timeout),
            ("connect_timeout", connect_timeout),
            ("startup_timeout", startup_timeout),
        ):
            if not value > 0:
                raise InvalidRequestError(name, f"{value!r} must be a positive number of seconds")
        if max_restarts < 0:
            raise InvalidRequestError("max_restarts", f"{max_restarts!r} must be >= 0")
        self.model, self.device, self.dtype = model, device, dtype
        self.max_batch_size, self.threads = max_batch_size, threads
        self.stream_buffer, self.startup_timeout, self.secret = (
            stream_buffer,
            startup_timeout,
            secret,
        )
        self.heartbeat_timeout, self.connect_timeout = heartbeat_timeout, connect_timeout
        self.max_restarts = max_restarts
        self.server_key, self.client_key = server_key, client_key
        self._external = endpoints is not None
        self._count = len(endpoints) if endpoints else workers
        self._endpoints = endpoints
        self.tensor_parallel_size, self.expert_parallel = tensor_parallel_size, expert_parallel
        self.steps_per_check, self.rank_timeout = steps_per_check, rank_timeout
        # each launched worker's devices, one per rank (placement.place explains the choice)
        self._placement: list[list[str]] = []
        if not self._external:
            visible = placement.visible_gpus() if device == "cuda" and gpus is None else None
            self._placement = placement.place(device, workers, tensor_parallel_size, gpus, visible)
        self._devices_of: dict[str, list[str]] = {}  # endpoint -> its worker's devices
        self._workers: list[_Worker] = []
        self._dir: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # supervisors and stderr readers
        self._changed = asyncio.Event()  # set (and replaced) on every worker state change
        self._identity: tuple[str, str, int, int] | None = None
        self._opened = False
        self._closing = False
        self._close_task: asyncio.Task | None = None

    # ---- life cycle ----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, endpoint: str | list[str], secret: str = "", **kwargs) -> Client:
        """Attach to workers started separately with `dinfer-worker`; close with
        `await client.close()`. Raises ConnectError naming the endpoints that did not answer
        the handshake within `connect_timeout` seconds (default 30)."""
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not endpoints:
            raise InvalidRequestError("endpoint", "give at least one endpoint")
        client = cls(endpoints=endpoints, secret=secret, **kwargs)
        return await client.__aenter__()

    async def __aenter__(self) -> Client:
        if self._opened:
            return self
        self._opened = True
        self._changed = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        try:
            if not self._external:
                _remove_stale_dirs()
                self._dir = tempfile.mkdtemp(prefix=DIR_PREFIX)
                os.chmod(self._dir, 0o700)
                with open(os.path.join(self._dir, "pid"), "w") as f:
                    f.write(f"{os.getpid()}\n")
            for i in range(self._count):
                endpoint = (
                    self._endpoints[i]
                    if self._endpoints is not None
                    else f"ipc://{self._dir}/worker{i}.sock"
                )
                if self._placement:
                    self._devices_of[endpoint] = self._placement[i]
                worker = _Worker(i, endpoint, owned=not self._external)
                self._workers.append(worker)
                run = self._supervise(worker) if worker.owned else self._attach(worker)
                self._spawn(self._tasks, run)
            await self._until_started()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End every stream with ClientClosedError, stop background tasks and launched
        workers, remove sockets. Idempotent; safe from any task (concurrent calls all wait for
        the one shutdown, which a cancelled caller does not interrupt)."""
        if self._close_task is None:
            self._closing = True
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        closed = ClientClosedError("the client was closed")
        for w in self._workers:
            w.fail_all(closed)
            w.state = CLOSED
        self._notify()
        tasks = set(self._tasks)
        for w in self._workers:
            tasks |= w.tasks
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop_process(w) for w in self._workers))
        for w in self._workers:
            self._close_socket(w)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _until_started(self) -> None:
        """Wait until every worker is healthy; raise the first failure, or ConnectError."""
        timeout = self.connect_timeout if self._external else self.startup_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for w in self._workers:
                if w.state == FAILED:
                    assert w.failure is not None, "a worker is FAILED only with its failure set"
                    raise w.failure
            pending = [w for w in self._workers if w.state != HEALTHY]
            if not pending:
                return
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                names = ", ".join(w.endpoint for w in pending)
                what = "connect_timeout" if self._external else "startup_timeout"
                raise ConnectError(
                    f"no worker answered the handshake at {names} within {timeout:g} s: "
                    f"is a dinfer-worker running there? (raise {what} if it is still loading)"
                )
            await self._changed_within(left)

    def _spawn(
        self,
        tasks: set[asyncio.Task[Any]],
        run: Coroutine[Any, Any, T],
        worker: _Worker | None = None,
    ) -> asyncio.Task[T]:
        """A background task the client owns; if one of a worker's connection tasks fails (a
        bug), that worker's streams get a WorkerError and its connection is made anew."""
        task = asyncio.get_running_loop().create_task(run)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda t: self._report_crash(t, worker))
        return task

    def _report_crash(self, task: asyncio.Task, w: _Worker | None) -> None:
        if task.cancelled() or task.exception() is None:
            return
        logging.getLogger("dinfer_async").error(
            "a background task of the client failed", exc_info=task.exception()
        )
        if w is None or self._closing:
            return
        self._down(
            w, WorkerError(f"the client lost track of {w.name}: {task.exception()!r}"), RECONNECTING
        )
        if not w.owned:  # a launched worker is killed and restarted by its supervisor
            self._spawn(self._tasks, self._reconnect(w))

    async def _reconnect(self, w: _Worker) -> None:
        await self._disconnect(w)
        self._connect(w)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _changed_within(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await _bounded(self._changed.wait(), timeout)

    def _set_state(self, w: _Worker, state: str) -> None:
        if w.state in (CLOSED,) or w.state == state:
            return
        w.state, w.since = state, asyncio.get_running_loop().time()
        self._notify()

    def _down(self, w: _Worker, error: DinferError, state: str) -> None:
        """The worker's connection or process is gone: fail its streams, stop routing to it."""
        if w.state == CLOSED:
            return
        if w.inflight or w.state == HEALTHY:
            log.warning("%s", error)
        w.orphans |= set(w.inflight)
        w.fail_all(error)
        self._set_state(w, state)

    # ---- connections ---------------------------------------------------------------------------

    def _open_socket(self, endpoint: str) -> zmq.asyncio.Socket:
        """The one place a client socket is made and configured (not yet connected)."""
        assert self._ctx is not None, "sockets are made once the client is open"
        sock = secure_dealer(self._ctx.socket(zmq.DEALER), self.server_key, self.client_key)
        ms = min(int(self.heartbeat_timeout * 1000), 6_500_000)  # ZMTP's TTL field is 16-bit ds
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue frames for a connection not made yet
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, ms // 4))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, ms))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        return sock

    def _connect(self, w: _Worker) -> None:
        """Open the worker's socket with a monitor and start its reader and heartbeat tasks."""
        sock = self._open_socket(w.endpoint)
        w.monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
        )
        w.socket = sock
        sock.connect(w.endpoint)
        w.last_heard = asyncio.get_running_loop().time()
        self._spawn(w.tasks, self._read(w, sock), w)
        self._spawn(w.tasks, self._watch_socket(w, w.monitor), w)
        self._spawn(w.tasks, self._heartbeat(w, sock), w)

    async def _disconnect(self, w: _Worker) -> None:
        tasks = set(w.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close_socket(w)

    def _close_socket(self, w: _Worker) -> None:
        if w.socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                w.socket.disable_monitor()
            w.socket.close(linger=0)
            w.socket = None
        if w.monitor is not None:
            w.monitor.close(linger=0)
            w.monitor = None

    def _send_now(self, w: _Worker, msg: wire.Message) -> bool:
        """Send without waiting; False if the frame could not be queued."""
        if w.socket is None or w.socket.closed:
            return False
        # zmq.asyncio's send returns an asyncio.Future (its stub says only Awaitable)
        future = cast(
            "asyncio.Future[zmq.MessageTracker | None]",
            w.socket.send(wire.encode(msg), flags=zmq.NOBLOCK),
        )
        future.add_done_callback(_retrieve)
        return not (future.done() and future.exception() is not None)

    def _hello(self, w: _Worker) -> None:
        """Greet the worker; the send waits (bounded) for the connection's pipe to be ready."""
        if w.socket is None:
            return
        w.hello_at = asyncio.get_running_loop().time()
        frame = wire.encode(wire.Hello(protocol=wire.PROTOCOL_VERSION, secret=self.secret))
        send = _bounded(w.socket.send(frame), self.heartbeat_timeout)
        self._spawn(w.tasks, _quietly(send))

    async def _watch_socket(self, w: _Worker, monitor: zmq.asyncio.Socket) -> None:
        """Greet every new connection; a lost one fails the worker's streams."""
        while True:
            frames = await monitor.recv_multipart()
            event, _ = struct.unpack("=HI", frames[0][:6])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._hello(w)
            elif event == zmq.EVENT_DISCONNECTED:
                await self._lost(w)
            elif event == zmq.EVENT_MONITOR_STOPPED:
                return

    async def _lost(self, w: _Worker) -> None:
        if w.state not in (HEALTHY, STARTING) and not w.inflight:
            return
        if w.process is not None:  # give a dying process a moment: its exit is the better cause
            with contextlib.suppress(asyncio.TimeoutError):
                await _bounded(w.process.wait(), 0.5)
            if w.process.returncode is not None:
                return  # the supervisor reports the exit
        silent = asyncio.get_running_loop().time() - w.last_heard
        if silent >= 0.75 * self.heartbeat_timeout:
            error: WorkerDiedError = WorkerUnresponsiveError(
                f"{w.name} did not answer heartbeats for {self.heartbeat_timeout:g} s "
                "(stopped, hung or unreachable)"
            )
        else:
            error = WorkerDiedError(f"lost the connection to {w.name}")
        self._down(w, error, RECONNECTING)

    async def _heartbeat(self, w: _Worker, sock: zmq.asyncio.Socket) -> None:
        """Ping a quiet healthy worker, so `last_heard` tells a stopped worker from a killed one;
        re-greet a connection that has not been welcomed."""
        interval = max(0.05, self.heartbeat_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            quiet = loop.time() - w.last_heard
            if w.state == HEALTHY and quiet >= interval and len(w.pongs) < 100:
                self._ping(w)
            elif w.state in (STARTING, RECONNECTING) and loop.time() - w.hello_at >= interval * 4:
                self._hello(w)  # in case a Hello was lost with a connection

    def _ping(self, w: _Worker) -> asyncio.Future:
        pong = asyncio.get_running_loop().create_future()
        pong.add_done_callback(_retrieve)
        if self._send_now(w, wire.Ping()):
            w.pongs.append(pong)
        else:
            pong.set_exception(WorkerDiedError(f"could not ping {w.name}"))
        return pong

    async def _read(self, w: _Worker, sock: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await sock.recv()
            w.last_heard = loop.time()
            try:
                msg = wire.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("%s sent a frame that is not a valid message: %s", w.name, e)
                continue
            if isinstance(msg, wire.Updates):
                for chunk in msg.chunks:
                    inbox = w.inflight.get(chunk.request_id)
                    if inbox is not None:
                        inbox.put(chunk)
                        if chunk.finish_reason is not None:
                            del w.inflight[chunk.request_id]
            elif isinstance(msg, wire.Pong):
                if w.pongs:
                    pong = w.pongs.popleft()
                    if not pong.done():
                        pong.set_result(msg)
            elif isinstance(msg, wire.Welcome):
                self._welcomed(w, msg)
            elif isinstance(msg, wire.Error):
                self._refused(w, msg)
            else:
                log.warning("%s sent an unexpected %s", w.name, type(msg).__name__)

    def _welcomed(self, w: _Worker, msg: wire.Welcome) -> None:
        identity = (msg.model, msg.tokenizer, msg.eos_token_id, msg.mask_token_id)
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            model, tokenizer = self._identity[:2]
            w.failure = WorkerMismatchError(
                f"worker at {w.endpoint} serves model {msg.model!r} with tokenizer "
                f"{msg.tokenizer!r}, but this client's other workers serve {model!r} with "
                f"{tokenizer!r}: give one client workers of one model only"
            )
            log.error("%s", w.failure)
            self._down(w, WorkerDiedError(str(w.failure)), FAILED)
            return
        if w.welcome is not None and w.welcome.pid == msg.pid:
            for rid in w.orphans:  # same process, new connection: stop what it still runs for us
                self._send_now(w, wire.Abort(rid))
        w.orphans.clear()
        w.welcome, w.failure = msg, None
        w.healthy_at = asyncio.get_running_loop().time()
        self._set_state(w, HEALTHY)

    def _refused(self, w: _Worker, msg: wire.Error) -> None:
        """Route an Error frame: to its request, or (request_id None) to the worker's streams,
        a new handshake or the worker's failure; never dropped."""
        if msg.request_id is not None:
            inbox = w.inflight.pop(msg.request_id, None)
            if inbox is not None:
                inbox.put(
                    WorkerError(msg.message)
                    if msg.field == "engine"
                    else InvalidRequestError(msg.field, msg.message)
                )
            return
        if msg.field == "hello":  # a worker that does not know this connection (restarted)
            if w.state == HEALTHY or w.inflight:
                self._down(w, WorkerDiedError(f"{w.name} was restarted: {msg.message}"), STARTING)
            self._hello(w)
            return
        if w.state != HEALTHY:  # the answer to our Hello: refused (secret, protocol, ...)
            w.failure = DinferError(
                f"worker at {w.endpoint} refused the handshake: {msg.field}: {msg.message}"
            )
            self._down(w, WorkerDiedError(str(w.failure)), FAILED)
            return
        pending = [rid for rid, inbox in w.inflight.items() if not inbox.started]
        error = WorkerError(f"{w.name} rejected a frame: {msg.field}: {msg.message}")
        if not pending:
            log.warning("%s", error)
        for rid in pending:  # the frame was one of the requests it has not started
            w.inflight.pop(rid).put(error)

    async def _attach(self, w: _Worker) -> None:
        """An attached worker: connect once; ZeroMQ reconnects and every new connection is
        greeted, so a worker restarted on the endpoint is served again."""
        try:
            self._connect(w)
        except zmq.ZMQError as e:
            self._close_socket(w)
            w.failure = InvalidRequestError(
                "endpoint", f"{w.endpoint!r}: {e}; use tcp://HOST:PORT or ipc://PATH"
            )
            self._set_state(w, FAILED)

    # ---- launched workers ----------------------------------------------------------------------

    async def _supervise(self, w: _Worker) -> None:
        """Start the worker, watch it, restart it with backoff; give up after max_restarts."""
        loop = asyncio.get_running_loop()
        first = True
        while not self._closing:
            try:
                await self._launch(w)
            except DinferError as e:
                if first:  # the client's start fails with it
                    w.failure = e
                    self._set_state(w, FAILED)
                    return
                cause: DinferError = e
                log.warning("restart failed: %s", e)
            else:
                if not first:
                    log.info("%s is back (restart %d)", w.name, w.restarts)
                cause = await self._until_gone(w)
                if loop.time() - w.healthy_at >= STABLE_AFTER:
                    w.in_a_row = 0
            first = False
            await self._disconnect(w)
            await self._stop_process(w)
            if self._closing:
                return
            if w.in_a_row >= self.max_restarts:
                w.failure = WorkerError(
                    f"worker {w.index} was given up after {w.in_a_row} restarts in a row "
                    f"(max_restarts={self.max_restarts}); last: {cause}"
                )
                log.error("%s", w.failure)
                self._set_state(w, FAILED)
                return
            self._set_state(w, RESTARTING)
            await asyncio.sleep(min(BACKOFF_FIRST * 2**w.in_a_row, BACKOFF_MAX))
            w.in_a_row += 1
            w.restarts += 1

    def _worker_argv(self, endpoint: str) -> list[str]:
        devices = self._devices_of.get(endpoint, [self.device])
        cmd = [
            sys.executable,
            "-m",
            "workers.main",
            "--endpoint",
            endpoint,
            *placement.device_flags(devices),
            "--dtype",
            self.dtype,
            "--max-batch-size",
            str(self.max_batch_size),
            "--threads",
            str(self.threads),
            "--exit-with-parent",
        ]
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.expert_parallel:
            cmd.append("--enable-expert-parallel")
            if self.expert_parallel == "all_to_all":
                cmd += ["--expert-parallel-dispatch", "all_to_all"]
        if self.steps_per_check is not None:
            cmd += ["--steps-per-check", str(self.steps_per_check)]
        if self.rank_timeout is not None:
            cmd += ["--rank-timeout", f"{self.rank_timeout:g}"]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        return cmd

    async def _launch(self, w: _Worker) -> None:
        """Start the process and connect; return once welcomed. Raises WorkerError with the
        last line of its stderr if it exits first, ConnectError after startup_timeout."""
        path = w.endpoint[len("ipc://") :]
        if os.path.exists(path):
            os.unlink(path)
        self._set_state(w, STARTING)
        w.welcome = None
        w.stderr.clear()
        w.process = proc = await asyncio.create_subprocess_exec(
            *self._worker_argv(w.endpoint),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            limit=1 << 20,
        )
        self._spawn(self._tasks, self._forward_stderr(w, proc))
        self._connect(w)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        exited = loop.create_task(proc.wait())
        try:
            while w.state != HEALTHY:
                if w.state == FAILED:
                    assert w.failure is not None, "a worker is FAILED only with its failure set"
                    raise w.failure
                left = deadline - loop.time()
                if left <= 0:
                    raise ConnectError(
                        f"worker {w.index} did not answer within startup_timeout="
                        f"{self.startup_timeout:g} s"
                    )
                changed = loop.create_task(self._changed.wait())
                await asyncio.wait({exited, changed}, timeout=left, return_when="FIRST_COMPLETED")
                changed.cancel()
                if exited.done() and w.state != HEALTHY:
                    await self._drain_stderr(w)
                    raise WorkerError(self._exit_message(w, proc.returncode, "while starting"))
        finally:
            exited.cancel()

    def _exit_message(self, w: _Worker, code: int | None, when: str) -> str:
        """Says why; the last line of a starting worker's stderr is usually its error."""
        lines = [line for line in w.stderr if line.strip()] if when == "while starting" else []
        last = f": {lines[-1].strip()}" if lines else ""
        return f"{w.name} exited with code {code} {when}{last}"

    async def _until_gone(self, w: _Worker) -> WorkerDiedError:
        """Return once the healthy worker's process is gone: its exit, or the kill of a worker
        that stayed unreachable for heartbeat_timeout. Its streams are failed first."""
        proc = w.process
        assert proc is not None, "called once _launch has started the process"
        loop = asyncio.get_running_loop()
        tick = max(0.05, self.heartbeat_timeout / 4)
        exited = loop.create_task(proc.wait())
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=tick)
                stuck = w.state != HEALTHY and loop.time() - w.since >= self.heartbeat_timeout
                if stuck and proc.returncode is None:
                    log.warning("%s is unreachable: killing it", w.name)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        finally:
            exited.cancel()
        await self._drain_stderr(w)
        error = WorkerDiedError(f"{self._exit_message(w, proc.returncode, 'while serving')}")
        self._down(w, error, RESTARTING)
        return error

    async def _forward_stderr(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        """Each stderr line of a launched worker goes to the `dinfer_async.worker` logger."""
        stderr = proc.stderr
        assert stderr is not None, "_launch starts the process with stderr=PIPE"
        while True:
            try:
                raw = await stderr.readline()
            except ValueError:  # a line over the limit: take it in pieces
                raw = await stderr.read(1 << 16)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            w.stderr.append(line)
            # a starting worker's error line is the WorkerError _launch raises: log it once
            repeated = w.state == STARTING and line.startswith("dinfer-worker: error:")
            log.log(logging.DEBUG if repeated else logging.INFO, "worker %d: %s", w.index, line)

    async def _drain_stderr(self, w: _Worker) -> None:
        """Let the stderr reader catch up with a process that just exited (bounded)."""
        proc = w.process
        if proc is None or proc.stderr is None:
            return
        for _ in range(20):
            if proc.stderr.at_eof():
                return
            await asyncio.sleep(0.01)

    async def _stop_process(self, w: _Worker) -> None:
        proc = w.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 18)  # SIGCONT: a stopped process cannot act on SIGTERM
        with contextlib.suppress(asyncio.TimeoutError):
            await _bounded(proc.wait(), 5)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    # ---- health --------------------------------------------------------------------------------

    @property
    def workers_healthy(self) -> int:
        """How many workers take requests now."""
        return sum(w.state == HEALTHY for w in self._workers)

    @property
    def worker_states(self) -> list[str]:
        """Each worker's state: starting, healthy, reconnecting, restarting, failed or closed."""
        return [w.state for w in self._workers]

    @property
    def worker_devices(self) -> list[list[str]]:
        """Each worker's devices, one per rank of its group, as its handshake named them ([]
        for a worker not welcomed yet)."""
        return [list(w.welcome.devices) if w.welcome else [] for w in self._workers]

    @property
    def restarts(self) -> int:
        """Restarts of launched workers so far."""
        return sum(w.restarts for w in self._workers)

    async def wait_ready(self, timeout: float) -> None:
        """Return once at least one worker is healthy. Raises WorkerError if none can be (every
        worker failed), ClientClosedError after close, DinferTimeoutError after `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closing or not self._opened:
                raise ClientClosedError("the client is not open")
            if self.workers_healthy:
                return
            if all(w.state == FAILED for w in self._workers):
                raise WorkerError(self._why_failed())
            left = deadline - loop.time()
            if left <= 0:
                raise DinferTimeoutError(
                    f"no worker became healthy within {timeout:g} s ({self._describe()})"
                )
            await self._changed_within(left)

    def _why_failed(self) -> str:
        return "no worker can serve: " + "; ".join(str(w.failure) for w in self._workers)

    def _describe(self) -> str:
        return ", ".join(f"worker {w.index} {w.state}" for w in self._workers)

    # ---- requests ------------------------------------------------------------------------------

    @property
    def welcome(self) -> wire.Welcome | None:
        """The handshake of a worker (all of a client's workers serve one model)."""
        known = [w.welcome for w in self._workers if w.welcome is not None]
        return known[0] if known else None

    def _pick(self) -> _Worker:
        if self._closing or not self._opened:
            raise ClientClosedError(
                "the client is not open: use `async with Client(...)` or Client.connect"
            )
        healthy = [w for w in self._workers if w.state == HEALTHY]
        if healthy:
            return min(healthy, key=lambda w: len(w.inflight))
        if all(w.state == FAILED for w in self._workers):
            raise WorkerError(self._why_failed())
        raise WorkerDiedError(
            f"no worker is ready ({self._describe()}): retry after "
            "`await client.wait_ready(timeout)`"
        )

    def _check(self, prompt, messages, token_ids, params) -> SamplingParams:
        """The one request check (dinfer_async.validation), against the workers' limits."""
        limits = Limits.from_welcomes(w.welcome for w in self._workers)
        return check_request(prompt, messages, token_ids, params, limits)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        text_only: bool = False,
    ) -> _Stream:
        """Yield a Chunk after every step that changed the request (or, with text_only, each
        non-empty piece of newly stable text). The last chunk carries finish_reason and stats.
        Leaving `async with client.stream(...) as s:`, cancelling, or `aclose()` aborts the
        request on its worker (as does dropping the stream object after a `break`)."""
        request = dict(prompt=prompt, messages=messages, token_ids=token_ids, params=params)
        return _Stream(self, request, text_only)

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
        async with self.stream(
            prompt, messages=messages, token_ids=token_ids, params=params
        ) as chunks:
            async for chunk in chunks:
                assert isinstance(chunk, wire.Chunk)  # text_only is off: every item is a Chunk
                text.append(chunk.stable_text)
                if chunk.final:
                    blocks[chunk.block] = chunk.tokens
                last = chunk
        # the stream ended normally, so its last chunk carried finish_reason, and the worker
        # that sent it was welcomed, which sets the client's identity (never reset)
        assert last is not None and last.finish_reason is not None
        assert self._identity is not None
        eos = self._identity[2]
        ids = [t for b in sorted(blocks) for t in blocks[b]]
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return Completion(
            text="".join(text),
            token_ids=ids,
            finish_reason=last.finish_reason,
            stats=last.stats or {},
        )

    async def worker_load(self) -> list[int]:
        """Each worker's count of active requests, as the worker itself reports it (0 for a
        worker that is not healthy)."""
        pongs: list[asyncio.Future | None] = [
            self._ping(w) if w.state == HEALTHY else None for w in self._workers
        ]
        counts = []
        for pong in pongs:
            if pong is None:
                counts.append(0)
                continue
            try:
                counts.append((await _bounded(pong, self.heartbeat_timeout)).active)
            except asyncio.TimeoutError as e:
                raise WorkerUnresponsiveError("a worker did not answer a ping") from e
        return counts


async def _bounded(aw: Awaitable[T], timeout: float) -> T:
    """`asyncio.wait_for` without its Python 3.11 race (a cancel arriving as the awaited thing
    completes is swallowed, and the cancelled task runs on): raises asyncio.TimeoutError."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


async def _quietly(send: Awaitable) -> None:
    """A send whose failure needs no report (a lost connection is reported by the monitor)."""
    with contextlib.suppress(asyncio.TimeoutError, zmq.ZMQError):
        await send


def _remove_stale_dirs() -> None:
    """Remove private socket directories whose client is gone (a SIGKILLed client cannot)."""
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith(DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, "pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue  # not ours, or not a client's directory
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
