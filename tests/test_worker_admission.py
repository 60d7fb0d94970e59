"""A burst of requests starts in one round (the worker waits for tokenizations in flight before a
round's first step), as the same prompts would in one Engine.generate call, with the same
answers."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from dinfer_async import SamplingParams
from dinfer_async import protocol as wire
from tests.worker_peers import FAST, Peer
from workers.worker import Worker

PROMPTS = ["reverse planet", "sort 3 1 2", "add 12 30", "reverse stone", "count a in abca"]


@pytest.fixture(scope="module")
def engine():
    from workers import Engine

    return Engine.from_pretrained(None, max_batch_size=8)


class RoundWorker(Worker):
    """Records the number of requests each round starts with; each tokenization takes 50 ms
    more, so they finish one by one (without the wait, the first would start a round alone)."""

    admit_window = 30.0  # a bound only: the wait ends when the tokenizations are done

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds: list[int] = []

    def step(self) -> None:
        if self.scheduler.round is None:
            self.rounds.append(min(self.scheduler.active, self.scheduler.max_batch_size))
        super().step()

    def tokenize(self, prompt, messages):
        time.sleep(0.05)
        return super().tokenize(prompt, messages)


@contextlib.contextmanager
def serving(worker_class, engine, tmp_path):
    """(worker, peer): a worker of `worker_class` serving on a thread, a peer that said hello."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    worker = worker_class(engine, endpoint)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    peer = Peer(endpoint)
    try:
        assert isinstance(peer.hello(), wire.Welcome)
        yield worker, peer
    finally:
        worker.stop()
        thread.join(60)
        worker.close()
        peer.close()


def test_a_burst_of_requests_starts_in_one_round(engine, tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    worker = RoundWorker(engine, endpoint)
    peer = Peer(endpoint)
    try:
        peer.send(wire.Hello(protocol=wire.PROTOCOL_VERSION))
        for i, prompt in enumerate(PROMPTS):
            peer.submit(str(i), messages=[{"role": "user", "content": prompt}])
        time.sleep(0.5)  # setup, not a timing check: the frames reach the worker's socket
        thread = threading.Thread(target=worker.serve, daemon=True)
        thread.start()
        assert isinstance(peer.recv(), wire.Welcome)
        texts: dict[str, str] = {}
        parts: dict[str, list[str]] = {}
        while len(texts) < len(PROMPTS):
            msg = peer.recv()
            assert isinstance(msg, wire.Updates), msg
            for chunk in msg.chunks:
                parts.setdefault(chunk.request_id, []).append(chunk.stable_text)
                if chunk.finish_reason:
                    texts[chunk.request_id] = "".join(parts[chunk.request_id])
        assert worker.rounds[0] == len(PROMPTS)  # one round for the whole burst
        prompts = [engine.encode(messages=[{"role": "user", "content": p}]) for p in PROMPTS]
        want = [r.text for r in engine.generate(prompts, FAST)]
        assert [texts[str(i)] for i in range(len(PROMPTS))] == want
    finally:
        worker.stop()
        if "thread" in locals():
            thread.join(60)
        worker.close()
        peer.close()


def test_the_wait_is_bounded_and_ends_with_the_tokenizations(engine, tmp_path):
    """A tokenization slower than the window: the round starts without it; it joins later."""

    class SlowTokenizer(RoundWorker):
        admit_window = 0.05

        def tokenize(self, prompt, messages):
            time.sleep(0.5)
            return super().tokenize(prompt, messages)

    with serving(SlowTokenizer, engine, tmp_path) as (_, peer):
        peer.submit("slow", prompt="SLOW")
        done = peer.finish("slow")
        assert isinstance(done, wire.Chunk) and done.finish_reason


def test_a_burst_arriving_mid_round_joins_it_in_one_step(engine, tmp_path):
    """Requests sent while a long request runs join its round together, at one step (the
    worker waits for their tokenizations before a step that may take rows), not one a step."""

    class JoinWorker(RoundWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.joined: list[int] = []  # rows that joined at each step

        def step(self) -> None:
            before = self.scheduler.joined
            super().step()
            self.joined.append(self.scheduler.joined - before)

    long = SamplingParams(
        gen_length=64, block_length=8, decoder="fixed", steps=64, cache="dual", early_stop=False
    )
    burst = SamplingParams(gen_length=16, block_length=8, cache="dual")
    with serving(JoinWorker, engine, tmp_path) as (worker, peer):
        peer.submit("long", long, messages=[{"role": "user", "content": "reverse planet"}])
        first = peer.recv()
        assert isinstance(first, wire.Updates), first
        for i, prompt in enumerate(PROMPTS[1:]):
            peer.submit(str(i), burst, messages=[{"role": "user", "content": prompt}])
        ended: set[str] = set()
        while len(ended) < len(PROMPTS):
            msg = peer.recv()
            assert isinstance(msg, wire.Updates), msg
            ended |= {c.request_id for c in msg.chunks if c.finish_reason}
        assert worker.rounds[0] == 1, "the long request started alone"
        assert sorted(worker.joined, reverse=True)[:2] == [len(PROMPTS) - 1, 0]
