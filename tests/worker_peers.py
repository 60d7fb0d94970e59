"""Helpers for worker tests: a Worker serving on a thread of the test process, and a plain
synchronous DEALER peer that speaks the wire protocol (no Client: a test controls every frame)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import zmq

from dinfer_async import protocol as wire
from dinfer_async.params import SamplingParams
from dinfer_async.transport import secure_dealer
from workers.worker import Worker

FAST = SamplingParams(gen_length=32, block_length=32)
SLOW = SamplingParams(
    gen_length=256, block_length=8, decoder="fixed", steps=256, cache="none", early_stop=False
)
ASK = [{"role": "user", "content": "reverse planet"}]
CONTEXT = zmq.Context()  # not Context.instance(): that singleton is shared with zmq.asyncio's


@contextlib.contextmanager
def serving(worker: Worker) -> Iterator[Worker]:
    """Run worker.serve() on a thread; stop, join and close it on exit."""
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(60)
        worker.close()


class Peer:
    def __init__(
        self,
        endpoint: str,
        routing_id: bytes | None = None,
        server_key: str | None = None,
        client_key: str | None = None,
    ):
        self.sock = CONTEXT.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        secure_dealer(self.sock, server_key, client_key)
        self.sock.connect(endpoint)

    def send(self, msg: wire.Message, wait: bool = True) -> None:
        """With wait=False a frame that cannot be queued (no connection completed its handshake,
        so a DEALER would block) is dropped."""
        with contextlib.suppress(zmq.Again):
            self.sock.send(wire.encode(msg), 0 if wait else zmq.NOBLOCK)

    def recv(self, timeout: float = 30.0) -> wire.Message | None:
        """The next message, or None if nothing came within `timeout` seconds."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return wire.decode(self.sock.recv())

    def hello(self, secret: str = "", timeout: float = 30.0) -> wire.Message | None:
        self.send(wire.Hello(protocol=wire.PROTOCOL_VERSION, secret=secret))
        return self.recv(timeout)

    def submit(self, rid: str, params: SamplingParams = FAST, **request) -> None:
        self.send(wire.Submit(request_id=rid, params=params, **request))

    def finish(self, rid: str, timeout: float = 60.0) -> wire.Chunk | wire.Error | None:
        """Read until request `rid` ends: its last Chunk, its Error, or None on a silent wait."""
        while True:
            msg = self.recv(timeout)
            if msg is None:
                return None
            if isinstance(msg, wire.Error) and msg.request_id == rid:
                return msg
            if isinstance(msg, wire.Updates):
                for chunk in msg.chunks:
                    if chunk.request_id == rid and chunk.finish_reason is not None:
                        return chunk

    def close(self) -> None:
        self.sock.close(linger=0)
