"""The worker loop: a ZeroMQ ROUTER socket in front of one Engine's scheduler.

Between engine steps the worker drains its socket (submits, aborts, pings); each step's chunks
go out as one `Updates` frame per client. Anything a peer sends that is not a valid message, or
a request that fails validation, is answered with an `Error`; nothing a peer sends stops the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sys
from dataclasses import dataclass

import msgspec
import torch
import zmq

from dinfer_async import protocol as wire
from dinfer_async.errors import InvalidRequestError
from workers.engine import Engine
from workers.iteration import Sequence, StepUpdate
from workers.scheduler import Finished, Scheduler
from workers.stops import streamable


@dataclass
class Live:
    client: bytes  # ZeroMQ identity of the client that submitted it
    seq: Sequence
    emitted: str = ""  # stable text already sent


class Worker:
    def __init__(self, engine: Engine, endpoint: str, secret: str = ""):
        self.engine, self.secret = engine, secret
        self.scheduler = self.new_scheduler()
        self.live: dict[str, Live] = {}
        self.greeted: set[bytes] = set()
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        cfg = engine.config
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.max_gen_length = cfg.max_sequence_length // 2

    def new_scheduler(self) -> Scheduler:
        return Scheduler(self.engine.model, self.engine.max_batch_size, decode=self.engine.decode)

    def welcome(self) -> wire.Welcome:
        tok = self.engine.tokenizer
        return wire.Welcome(
            protocol=wire.PROTOCOL_VERSION,
            model=self.engine.name,
            tokenizer=f"{type(tok).__name__}:{len(tok)}",
            max_prompt_length=self.engine.config.max_sequence_length - 1,
            max_gen_length=self.max_gen_length,
            eos_token_id=self.eos_id,
            mask_token_id=self.mask_id,
            pid=os.getpid(),
        )

    # ---- the loop ------------------------------------------------------------------------------

    def serve(self, parent: int | None = None) -> None:
        """Loop forever; with `parent`, return once that process is gone (a SIGKILLed client
        cannot stop its workers, so they watch it)."""
        while parent is None or os.getppid() == parent:
            self.drain(timeout_ms=0 if self.scheduler.has_work() else 100)
            if self.scheduler.has_work():
                self.step()

    def close(self) -> None:
        endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.socket.close(linger=0)
        self.context.term()
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            for leftover in (path, os.path.dirname(path)):
                with contextlib.suppress(OSError):
                    os.unlink(leftover) if leftover == path else os.rmdir(leftover)

    def drain(self, timeout_ms: int) -> None:
        while self.socket.poll(timeout_ms):
            timeout_ms = 0
            frames = self.socket.recv_multipart()
            client, payload = frames[0], frames[-1]
            try:
                self.handle(client, payload)
            except Exception as e:  # a peer must never be able to stop the worker
                self.send(client, wire.Error(None, "frame", f"internal error: {e!r}"))

    def step(self) -> None:
        try:
            with torch.no_grad():
                updates = self.scheduler.step()
        except Exception as e:  # fail what was running, keep serving
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
                if (
                    chunk is None
                ):  # it finished without a step of its own (its batch-mates' abort ended the block)
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

    def handle(self, client: bytes, payload: bytes) -> None:
        try:
            msg = wire.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.send(client, wire.Error(None, "frame", f"not a valid message: {e}"))
            return
        if isinstance(msg, wire.Hello):
            if msg.protocol != wire.PROTOCOL_VERSION:
                self.send(
                    client,
                    wire.Error(
                        None,
                        "protocol",
                        f"worker speaks {wire.PROTOCOL_VERSION}, client {msg.protocol}",
                    ),
                )
            elif msg.secret != self.secret:
                self.send(client, wire.Error(None, "secret", "wrong shared secret"))
            else:
                self.greeted.add(client)
                self.send(client, self.welcome())
            return
        if client not in self.greeted:
            self.send(
                client, wire.Error(None, "hello", "send Hello (with the shared secret) first")
            )
        elif isinstance(msg, wire.Submit):
            self.submit(client, msg)
        elif isinstance(msg, wire.Abort):
            live = self.live.pop(msg.request_id, None)
            if live is not None:
                self.scheduler.abort(live.seq)
        elif isinstance(msg, wire.Ping):
            self.send(client, wire.Pong(active=len(self.live)))
        else:
            self.send(
                client, wire.Error(None, "type", f"a worker does not accept {type(msg).__name__}")
            )

    def submit(self, client: bytes, msg: wire.Submit) -> None:
        rid = msg.request_id
        try:
            if rid in self.live:
                raise InvalidRequestError("request_id", f"{rid!r} is already running")
            params = msg.params.validate(max_gen_length=self.max_gen_length)
            given = [x is not None for x in (msg.prompt, msg.messages, msg.token_ids)]
            if sum(given) != 1:
                raise InvalidRequestError(
                    "prompt", "give exactly one of prompt, messages or token_ids"
                )
            if msg.token_ids is not None:
                ids = msg.token_ids
            else:
                ids = self.engine.encode(prompt=msg.prompt, messages=msg.messages)
            self.engine.check_prompt(ids, params, "prompt")
        except InvalidRequestError as e:
            self.send(client, wire.Error(rid, e.field, e.reason))
            return
        except ValueError as e:
            self.send(client, wire.Error(rid, "prompt", str(e)))
            return
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.live[rid] = Live(client, self.scheduler.add(rid, ids, params, seed))

    def send(self, client: bytes, msg) -> None:
        # the client may be gone (or not reading); its requests are aborted when it says so
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([client, wire.encode(msg)], flags=zmq.NOBLOCK)

    # ---- chunks --------------------------------------------------------------------------------

    def chunk(self, live: Live, u) -> wire.Chunk:
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


def run_worker(
    model: str | None,
    endpoint: str,
    device: str,
    dtype: str,
    max_batch_size: int,
    secret: str,
    exit_with_parent: bool = False,
) -> None:
    parent = os.getppid() if exit_with_parent else None
    engine = Engine.from_pretrained(
        model, device=device, dtype=dtype, max_batch_size=max_batch_size
    )
    worker = Worker(engine, endpoint, secret)
    print(f"dinfer-worker: serving {engine.name} on {endpoint}", file=sys.stderr, flush=True)
    try:
        worker.serve(parent)
    finally:
        worker.close()
