"""What a peer can cost a worker: frame size (MAXMSGSIZE), prompt size before tokenization, and
tokenization beside the step loop (a long prompt does not stall other streams)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import zmq

from dinfer_async import protocol as wire
from dinfer_async.validation import CHARS_PER_TOKEN, frame_bytes_limit
from tests.worker_peers import ASK, CONTEXT, FAST, SLOW, Peer, serving
from workers.worker import Worker


@pytest.fixture(scope="module")
def engine():
    from workers import Engine

    return Engine.from_pretrained(None)


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_300_mb_frame_from_a_stranger_costs_the_worker_nothing(tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    cmd = [sys.executable, "-m", "workers.main", "--endpoint", endpoint, "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    good = Peer(endpoint)
    try:
        welcome = good.hello(timeout=120)
        assert isinstance(welcome, wire.Welcome)
        assert welcome.max_prompt_chars == welcome.max_prompt_length * CHARS_PER_TOKEN
        assert welcome.max_frame_bytes == frame_bytes_limit(welcome.max_prompt_length)
        good.submit("warm", messages=ASK)
        assert isinstance(good.finish("warm"), wire.Chunk)
        before = peak_rss(proc.pid)

        stranger = CONTEXT.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        events = stranger.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        stranger.connect(endpoint)
        big = bytes(300 * 2**20)
        stranger.send(big, copy=False)
        assert events.poll(60_000), "the worker must drop the connection"
        stranger.disable_monitor()
        events.close(linger=0)
        stranger.close(linger=0)
        del big

        good.submit("after", messages=ASK)
        assert isinstance(good.finish("after"), wire.Chunk)  # still serving
        grown = peak_rss(proc.pid) - before
        assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"
        assert proc.poll() is None
    finally:
        good.close()
        proc.terminate()
        proc.wait(30)


class CountingWorker(Worker):
    """Counts steps and tokenizations; a prompt "GATED" is tokenized only after the step loop
    has made `gate_steps` more steps (it never would if tokenizing blocked the loop)."""

    gate_steps = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0
        self.tokenized: list[str | None] = []
        self.steps_while_gated: int | None = None
        self.admitted_on: set[str] = set()

    def step(self) -> None:
        self.steps += 1
        super().step()

    def tokenize(self, prompt, messages):
        self.tokenized.append(prompt)
        if prompt == "GATED":
            start = self.steps
            for _ in range(3000):  # at most ~30 s: a bound, the test fails if it is reached
                if self.steps >= start + self.gate_steps:
                    break
                time.sleep(0.01)
            self.steps_while_gated = self.steps - start
        return super().tokenize(prompt, messages)

    def admit(self, client, rid, ids, params, field):
        self.admitted_on.add(threading.current_thread().name)
        super().admit(client, rid, ids, params, field)


def test_a_prompt_being_tokenized_does_not_stall_other_streams(engine, tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    with serving(CountingWorker(engine, endpoint)) as worker:
        running, long = Peer(endpoint), Peer(endpoint)
        assert isinstance(running.hello(), wire.Welcome)
        assert isinstance(long.hello(), wire.Welcome)
        running.submit("running", messages=ASK, params=SLOW)  # 256 steps
        assert isinstance(running.recv(), wire.Updates)
        long.submit("long", prompt="GATED")
        done = long.finish("long")
        assert isinstance(done, wire.Chunk) and done.finish_reason
        assert worker.steps_while_gated >= CountingWorker.gate_steps  # the loop kept stepping
        updates = 0
        while (msg := running.recv(0)) is not None:
            updates += isinstance(msg, wire.Updates)
        assert updates >= CountingWorker.gate_steps  # ...and the running stream got them
        tokenizer_threads = {n for n in worker.admitted_on if n.startswith("dinfer-tokenize")}
        assert worker.admitted_on and not tokenizer_threads  # admitted on the loop thread
        running.close()
        long.close()


def test_prompt_length_is_bounded_before_tokenization(engine, tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    with serving(CountingWorker(engine, endpoint, max_prompt_chars=500)) as worker:
        peer = Peer(endpoint)
        welcome = peer.hello()
        assert welcome.max_prompt_chars == 500
        cases = [
            ("long", dict(prompt="x" * 501), "prompt"),
            ("chat", dict(messages=[{"role": "user", "content": "y" * 300}] * 2), "messages"),
        ]
        for rid, request, field in cases:
            peer.submit(rid, **request)
            refused = peer.finish(rid)
            assert isinstance(refused, wire.Error) and refused.field == field
            assert "characters" in refused.message
        assert worker.tokenized == []  # refused without tokenizing
        peer.submit("fits", prompt="x" * 500)  # at the bound: tokenized, then within tokens
        assert isinstance(peer.finish("fits"), wire.Chunk)
        assert worker.tokenized == ["x" * 500]
        peer.close()


def test_the_worker_refuses_what_the_shared_check_refuses(engine, tmp_path):
    """Frames a raw peer can send (msgpack carries 2**64 - 1, bytes, maps with int keys)."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    with serving(Worker(engine, endpoint)):
        peer = Peer(endpoint)
        assert isinstance(peer.hello(), wire.Welcome)
        cases = [
            (dict(token_ids=[2**64 - 1]), "token_ids"),
            (dict(token_ids=[10**6]), "token_ids"),
            (dict(messages=[{"role": "user", "content": "x", "raw": b"\xff"}]), "messages[0].raw"),
            (dict(messages=[{"role": "user", "content": "x", "m": {1: 2}}]), "messages[0].m"),
            (dict(prompt="a", token_ids=[1]), "prompt"),
        ]
        for i, (request, field) in enumerate(cases):
            peer.submit(f"r{i}", **request)
            refused = peer.finish(f"r{i}")
            assert isinstance(refused, wire.Error) and refused.field == field, refused
        peer.submit("ok", token_ids=[5, 6, 7], params=FAST)
        assert isinstance(peer.finish("ok"), wire.Chunk)
        peer.close()


def test_max_frame_bytes_is_the_sockets_limit(engine, tmp_path):
    worker = Worker(engine, f"ipc://{tmp_path}/w.sock", max_frame_bytes=300_000)
    try:
        assert worker.socket.getsockopt(zmq.MAXMSGSIZE) == 300_000
        assert worker.welcome().max_frame_bytes == 300_000
    finally:
        worker.close()
    default = Worker(engine, f"ipc://{tmp_path}/d.sock")
    try:
        expected = frame_bytes_limit(engine.config.max_sequence_length - 1)
        assert default.socket.getsockopt(zmq.MAXMSGSIZE) == expected
    finally:
        default.close()


def test_the_worker_schedules_with_the_engines_settings(tmp_path):
    """dinfer-worker --steps-per-check (and the Engine's other scheduling settings) reach the
    scheduler the worker serves with, not only Engine.generate's."""
    from workers.engine import Engine

    engine = Engine.from_pretrained(None, steps_per_check=3, chunk_slots=0, cuda_graphs="static")
    worker = Worker(engine, f"ipc://{tmp_path}/w.sock")
    try:
        scheduler = worker.scheduler
        assert scheduler.steps_per_check == 3 and scheduler.graphs is engine.graphs is not None
    finally:
        worker.close()
