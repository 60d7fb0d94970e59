"""The worker loop: a ZeroMQ ROUTER socket in front of one Engine's scheduler.

Between engine steps the worker drains its socket (submits, aborts, pings); each step's chunks
go out as one `Updates` frame per client. Anything a peer sends that is not a valid message, or
a request that fails validation, is answered with an `Error`; nothing a peer sends stops the loop.

What a peer can cost the worker is bounded:
- a greeting (Hello, with the shared secret when one is set) belongs to the connection that sent
  it: the worker keys it by the connection's file descriptor (ZeroMQ's SRCFD) and forgets it when
  a socket monitor reports that connection closed, so another socket that reuses the routing id
  gets nothing without its own Hello. A closed connection's requests are aborted.
- frames longer than `max_frame_bytes` are dropped by ZeroMQ (MAXMSGSIZE) before they are read;
  prompts longer than `max_prompt_chars` are refused before they are tokenized.
- tokenization runs on a thread beside the step loop, so a long prompt never stalls other
  streams; its result is admitted on the loop thread.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import msgspec
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from dinfer_async import protocol as wire
from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams
from dinfer_async.transport import secure_router
from dinfer_async.validation import Limits, check_request
from workers.engine import Engine
from workers.iteration import Sequence, StepUpdate
from workers.parallel.spmd import Leader, follow
from workers.scheduler import Finished, Scheduler
from workers.stops import streamable

if TYPE_CHECKING:
    from workers.iteration import Sequence

log = logging.getLogger("dinfer.worker")
MAX_FRAMES_PER_DRAIN = 1000  # then step: a flood of frames cannot starve running streams
KEEPALIVE = 2.0  # seconds an idle rank 0 of a group waits before a keepalive collective
# how long a round's start waits for tokenizations in flight (collect): about a tokenization or
# two of a chat prompt, small against a forward
ADMIT_WINDOW_S = 0.005
MONITORED = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class GroupFailed(Exception):
    """A collective of the tensor-parallel group failed (a rank is gone): every rank stops, so
    the group is restarted as one."""


@dataclass
class Live:
    client: bytes  # ZeroMQ routing id of the client that submitted it
    seq: Sequence  # the scheduler's record of the request
    emitted: str = ""  # stable text already sent


@dataclass
class Pending:
    """A request whose prompt is being tokenized off the loop."""

    client: bytes
    params: SamplingParams
    field: str  # "prompt" or "messages": what an error about its length names
    future: Future


class Worker:
    admit_window: float = ADMIT_WINDOW_S  # seconds; see collect

    def __init__(
        self,
        engine: Engine,
        endpoint: str,
        secret: str = "",
        *,
        max_prompt_chars: int | None = None,
        max_frame_bytes: int | None = None,
        curve_secret_key: str | None = None,
        authorized_clients: str | None = None,
        devices: list[str] | None = None,
    ):
        """curve_secret_key: a `.key_secret` file; the socket then speaks CURVE only, and with
        authorized_clients (a directory of client `.key` files) admits only those clients.
        devices: each rank's device (named in the Welcome); default the engine's one.
        A tensor-parallel engine (rank 0 of its group) gets a scheduler whose arrivals and
        aborts are replayed on the other ranks (workers.parallel.spmd.Leader)."""
        self.engine, self.secret = engine, secret
        self.devices = devices or [str(engine.model.lm_head_weight.device)]
        self.group_failed = False  # a collective failed: nothing left to release at close
        self.scheduler = self.new_scheduler()
        self.live: dict[str, Live] = {}
        self.pending: dict[str, Pending] = {}
        self.greeted: set[tuple[int, bytes]] = set()  # (connection fd, routing id)
        cfg = engine.config
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.max_gen_length = cfg.max_sequence_length // 2
        self.limits = Limits.for_model(
            cfg.vocab_size,
            cfg.max_sequence_length - 1,
            self.max_gen_length,
            max_prompt_chars,
            max_frame_bytes,
        )
        self.max_prompt_length = cfg.max_sequence_length - 1
        self.max_prompt_chars: int = self.limits.max_prompt_chars or 0
        self.max_frame_bytes: int = self.limits.max_frame_bytes or 0
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="dinfer-tokenize")
        self.wake_r, self.wake_w = os.pipe()  # a finished tokenization wakes the loop
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.context = zmq.Context()
        self.auth = None
        self.socket = self.context.socket(zmq.ROUTER)
        self.monitor: zmq.Socket | None = None
        try:
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
            if curve_secret_key is not None:
                self.auth = secure_router(self.socket, curve_secret_key, authorized_clients)
            self.monitor = self.socket.get_monitor_socket(MONITORED)
            self.socket.bind(endpoint)
        except BaseException:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(self.wake_r, zmq.POLLIN)

    @property
    def endpoint(self) -> str:
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def new_scheduler(self) -> Scheduler:
        scheduler = self.engine.new_scheduler()
        tp = self.engine.tensor_parallel
        # a Leader is a Scheduler to the loop (its __getattr__ forwards the rest)
        return scheduler if tp is None else cast("Scheduler", Leader(scheduler, tp))

    def welcome(self) -> wire.Welcome:
        tok = self.engine.tokenizer
        return wire.Welcome(
            protocol=wire.PROTOCOL_VERSION,
            model=self.engine.name,
            tokenizer=f"{type(tok).__name__}:{len(tok)}",
            max_prompt_length=self.max_prompt_length,
            max_gen_length=self.max_gen_length,
            eos_token_id=self.eos_id,
            mask_token_id=self.mask_id,
            pid=os.getpid(),
            vocab_size=self.engine.config.vocab_size,
            max_prompt_chars=self.max_prompt_chars,
            max_frame_bytes=self.max_frame_bytes,
            devices=self.devices,
        )

    # ---- the loop ------------------------------------------------------------------------------

    def serve(self, parent: int | None = None) -> None:
        """Loop until stop(); with `parent`, also return once that process is gone (a SIGKILLed
        client cannot stop its workers, so they watch it)."""
        while not self.stopping and (parent is None or os.getppid() == parent):
            self.drain(timeout_ms=0 if self.scheduler.has_work() else 100)
            self.collect()
            if self.scheduler.has_work():
                self.step()
            elif isinstance(self.scheduler, Leader):
                self.keepalive(self.scheduler)

    def keepalive(self, leader: Leader) -> None:
        if time.monotonic() - leader.last < KEEPALIVE:
            return
        try:
            leader.keepalive()
        except Exception as e:
            self.group_failed = True
            raise GroupFailed(f"the tensor-parallel group failed while idle: {e!r}") from e

    def stop(self) -> None:
        """Make serve() return after its current step (safe from any thread)."""
        self.stopping = True
        self._wake()

    def close(self) -> None:
        if isinstance(self.scheduler, Leader) and not self.group_failed:
            release(self.scheduler)
        try:
            endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            endpoint = ""
        # wait for a running tokenization (bounded by max_prompt_chars) so that its wake-up
        # never writes to a closed pipe whose number the process has reused
        self.tokenizing.shutdown(wait=True, cancel_futures=True)
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.context.term()
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.wake_r = self.wake_w = -1
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            private = os.path.basename(os.path.dirname(path)).startswith("dinfer-")
            for leftover in (path, os.path.dirname(path)) if private else (path,):
                with contextlib.suppress(OSError):
                    os.unlink(leftover) if leftover == path else os.rmdir(leftover)

    def drain(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for something to do, then handle what is queued."""
        self.poller.poll(timeout_ms)
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.watch_connections()
        for _ in range(MAX_FRAMES_PER_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.watch_connections()  # a close queued before this frame is seen first
            client, payload = frames[0].bytes, frames[-1]
            try:
                fd = payload.get(zmq.SRCFD)
            except zmq.ZMQError:
                fd = -1
            try:
                self.handle(client, fd, payload.bytes)
            except Exception as e:  # a peer must never be able to stop the worker
                log.warning(
                    "internal error on a frame: %r", e, exc_info=log.isEnabledFor(logging.DEBUG)
                )
                self.send(client, wire.Error(None, "frame", f"internal error: {e!r}"))

    def watch_connections(self) -> None:
        """Forget the greetings (and abort the requests) of connections that closed."""
        while self.monitor is not None:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_DISCONNECTED:
                gone = {c for f, c in self.greeted if f == fd}
                self.greeted = {(f, c) for f, c in self.greeted if f != fd}
                for client in gone:
                    self.abort_client(client)
            elif kind != zmq.EVENT_ACCEPTED:
                log.info("a peer failed the handshake (%s)", zmq.Event(kind).name)

    def abort_client(self, client: bytes) -> None:
        for rid in [r for r, p in self.pending.items() if p.client == client]:
            self.pending.pop(rid).future.cancel()
        for rid in [r for r, live in self.live.items() if live.client == client]:
            self.scheduler.abort(self.live.pop(rid).seq)

    def step(self) -> None:
        try:
            with torch.no_grad():
                updates = self.scheduler.step()
        except Exception as e:  # fail what was running, keep serving
            if isinstance(self.scheduler, Leader):  # the ranks may disagree now: all stop
                self.group_failed = True
                raise GroupFailed(f"the tensor-parallel group failed in a step: {e!r}") from e
            log.error("engine step failed: %r", e, exc_info=log.isEnabledFor(logging.DEBUG))
            for rid, failed in list(self.live.items()):
                self.send(failed.client, wire.Error(rid, "engine", f"engine step failed: {e!r}"))
            self.live.clear()
            self.scheduler = self.new_scheduler()
            return
        by_client: dict[bytes, list[wire.Chunk]] = {}
        chunks: dict[str, wire.Chunk] = {}
        for u in updates:
            live = self.live.get(u.seq.id)
            if live is None:
                continue
            if isinstance(u, Finished):
                chunk = chunks.get(u.seq.id)
                if chunk is None:  # it finished without a step of its own (a batch-mate's abort)
                    chunk = self.final_chunk(live)
                    by_client.setdefault(live.client, []).append(chunk)
                by_client.setdefault(live.client, [])[:0] = self.finish(live, chunk)
                chunk.finish_reason, chunk.stats = u.seq.finish_reason, u.seq.stats(self.eos_id)
                del self.live[u.seq.id]
                continue
            chunk = self.chunk(live, u)
            chunks[u.seq.id] = chunk
            by_client.setdefault(live.client, []).append(chunk)
        for client, items in by_client.items():
            self.send(client, wire.Updates(items))

    # ---- messages ------------------------------------------------------------------------------

    def handle(self, client: bytes, fd: int, payload: bytes) -> None:
        try:
            msg = wire.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.send(client, wire.Error(None, "frame", f"not a valid message: {e}"))
            return
        if isinstance(msg, wire.Hello):
            self.hello(client, fd, msg)
        elif (fd, client) not in self.greeted:
            rid = getattr(msg, "request_id", None)
            self.send(
                client,
                wire.Error(
                    rid if isinstance(rid, str) else None,
                    "hello",
                    "this connection has not said Hello: send Hello (with the shared secret) "
                    "first, and again after reconnecting",
                ),
            )
        elif isinstance(msg, wire.Submit):
            self.submit(client, msg)
        elif isinstance(msg, wire.Abort):
            self.abort(msg.request_id)
        elif isinstance(msg, wire.Ping):
            self.send(client, wire.Pong(active=len(self.live) + len(self.pending)))
        else:
            self.send(
                client, wire.Error(None, "type", f"a worker does not accept {type(msg).__name__}")
            )

    def hello(self, client: bytes, fd: int, msg: wire.Hello) -> None:
        if msg.protocol != wire.PROTOCOL_VERSION:
            self.send(
                client,
                wire.Error(
                    None,
                    "protocol",
                    f"worker speaks protocol {wire.PROTOCOL_VERSION}, client {msg.protocol}; "
                    "install the same dinfer-async version on both",
                ),
            )
        elif not hmac.compare_digest(msg.secret.encode(), self.secret.encode()):
            self.send(client, wire.Error(None, "secret", "wrong shared secret"))
        else:
            self.greeted.add((fd, client))
            self.send(client, self.welcome())

    def abort(self, rid: str) -> None:
        pending = self.pending.pop(rid, None)
        if pending is not None:
            pending.future.cancel()
        live = self.live.pop(rid, None)
        if live is not None:
            self.scheduler.abort(live.seq)

    def submit(self, client: bytes, msg: wire.Submit) -> None:
        rid = msg.request_id
        try:
            if rid in self.live or rid in self.pending:
                raise InvalidRequestError("request_id", f"{rid!r} is already running")
            params = check_request(msg.prompt, msg.messages, msg.token_ids, msg.params, self.limits)
        except InvalidRequestError as e:
            self.send(client, wire.Error(rid, e.field, e.reason))
            return
        if msg.token_ids is not None:
            self.admit(client, rid, msg.token_ids, params, "token_ids")
            return
        future = self.tokenizing.submit(self.tokenize, msg.prompt, msg.messages)
        field = "prompt" if msg.prompt is not None else "messages"
        self.pending[rid] = Pending(client, params, field, future)
        future.add_done_callback(lambda _: self._wake())

    def tokenize(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Runs on the tokenizer thread."""
        return self.engine.encode(prompt=prompt, messages=messages)

    def collect(self) -> None:
        """Admit the requests whose tokenization finished (on the loop thread). When the next
        step starts a round and there is room in it, first wait (up to `admit_window`) for the
        tokenizations in flight, draining the frames that arrive meanwhile: a burst of requests
        then starts in one round, as it would in one `Engine.generate` call, instead of the
        first arrival running a round alone while the rest wait for the next block boundary.
        The same where the next step may take rows into the running round (Scheduler.joins):
        a burst joins it in one step, with one refresh forward, not one straggler a step."""
        self._admit_tokenized()
        if not self.pending or not self.scheduler.takes_rows():
            return
        deadline = time.perf_counter() + self.admit_window
        while self.pending and self.scheduler.active < self.scheduler.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0 or self.stopping:
                break
            self.drain(timeout_ms=max(1, round(left * 1000)))  # a finished tokenization wakes it
            self._admit_tokenized()

    def _admit_tokenized(self) -> None:
        for rid in [r for r, p in self.pending.items() if p.future.done()]:
            p = self.pending.pop(rid)
            try:
                ids = p.future.result()
            except InvalidRequestError as e:
                self.send(p.client, wire.Error(rid, e.field, e.reason))
            except ValueError as e:  # e.g. a tokenizer without a chat template
                self.send(p.client, wire.Error(rid, p.field, str(e)))
            except Exception as e:
                self.send(p.client, wire.Error(rid, p.field, f"tokenization failed: {e!r}"))
            else:
                self.admit(p.client, rid, ids, p.params, p.field)

    def admit(
        self, client: bytes, rid: str, ids: list[int], params: SamplingParams, field: str
    ) -> None:
        try:
            self.engine.check_prompt(ids, params, field)
        except InvalidRequestError as e:
            self.send(client, wire.Error(rid, e.field, e.reason))
            return
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.live[rid] = Live(client, self.scheduler.add(rid, ids, params, seed))

    def send(self, client: bytes, msg: wire.Message) -> None:
        # a client that is gone (or not reading) loses the frame; its requests end with its
        # connection
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([client, wire.encode(msg)], flags=zmq.NOBLOCK)

    def _wake(self) -> None:
        if self.wake_w < 0:
            return
        with contextlib.suppress(OSError):  # full (a wake is already pending)
            os.write(self.wake_w, b"\0")

    # ---- chunks --------------------------------------------------------------------------------

    def chunk(self, live: Live, u: StepUpdate) -> wire.Chunk:
        seq = u.seq
        # a block that may still be revised (decoder "joint") is not stable until it is final
        block_tokens = [] if seq.params.revises and not u.block_final else u.block_tokens
        window = seq.window[seq.skip : seq.span(u.block)[0]] + block_tokens
        stable = window[: window.index(self.mask_id)] if self.mask_id in window else window
        if self.eos_id in stable:
            stable = stable[: stable.index(self.eos_id)]
        text = self.engine.tokenizer.decode(stable, skip_special_tokens=True)
        while text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            text = text[:-1]
        if seq.params.stop:
            text = streamable(text, seq.params.stop)
        new = text[len(live.emitted) :] if text.startswith(live.emitted) else ""
        live.emitted += new
        return wire.Chunk(
            request_id=seq.id,
            block=u.block,
            tokens=u.block_tokens,
            text=self.block_text(u.block_tokens),
            committed=u.newly_committed,
            final=u.block_final,
            stable_text=new,
            revised=u.revised,
            confidence=u.confidence,
        )

    def finish(self, live: Live, last: wire.Chunk) -> list[wire.Chunk]:
        """Settle a finished request's stream: `last` (its final chunk) gets the stable text
        still held back (a tail that might have begun a stop string) and, when a stop string cut
        the answer, the block as cut; blocks before it that the cut reached are sent again
        (returned), so every final block's tokens match the answer."""
        seq = live.seq
        if seq.stop_text is not None:
            text = seq.stop_text
        else:
            text = self.engine.decode(seq.answer(self.eos_id))
        if text.startswith(live.emitted):
            last.stable_text += text[len(live.emitted) :]
            live.emitted = text
        if seq.finish_reason != "stop":
            return []
        last.tokens = seq.window[slice(*seq.span(last.block))]
        last.text = self.block_text(last.tokens)
        end = seq.skip + len(seq.answer(self.eos_id))  # the window is EOS from here on
        again = []
        for block in range(last.block):
            lo, hi = seq.span(block)
            if hi > end:
                tokens = seq.window[lo:hi]
                again.append(
                    wire.Chunk(seq.id, block, tokens, self.block_text(tokens), [], True, "")
                )
        return again

    def final_chunk(self, live: Live) -> wire.Chunk:
        seq = live.seq
        block = seq.block - 1
        lo, hi = seq.span(block)
        return self.chunk(live, StepUpdate(seq, block, seq.window[lo:hi], [], True))

    def block_text(self, tokens: list[int]) -> str:
        """The block's text with each undecided position shown as MASK_TEXT."""
        parts = []
        for is_mask, group in itertools.groupby(tokens, key=lambda t: t == self.mask_id):
            run = list(group)
            parts.append(
                wire.MASK_TEXT * len(run)
                if is_mask
                else self.engine.tokenizer.decode(run, skip_special_tokens=True)
            )
        return "".join(parts)


def release(leader: Leader, wait: float = 2.0) -> None:
    """Let the followers return from `follow` (they exit 0); bounded, since a rank that is gone
    would keep the collective waiting."""
    thread = threading.Thread(target=_quietly_stop, args=(leader,), daemon=True)
    thread.start()
    thread.join(wait)


def _quietly_stop(leader: Leader) -> None:
    with contextlib.suppress(Exception):
        leader.stop()


class Follower:
    """A rank other than 0 of a group: no socket; it replays rank 0's arrivals and steps."""

    endpoint = ""

    def __init__(self, engine: Engine, devices: list[str]):
        assert engine.tensor_parallel is not None, "a follower is one rank of a group"
        self.engine, self.devices, self.tp = engine, devices, engine.tensor_parallel
        self.scheduler = engine.new_scheduler()

    def serve(self, parent: int | None = None) -> None:
        log.debug("rank %d follows rank 0", self.tp.rank)
        try:
            with torch.no_grad():
                follow(self.scheduler, self.tp)
        except Exception as e:
            raise GroupFailed(
                f"the group's collective failed (rank 0 or another rank is gone): {e!r}"
            ) from e

    def close(self) -> None:
        pass
