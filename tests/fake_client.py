"""A stand-in for dinfer_async.Client, so dinfer-batch's own logic is tested without workers: it
answers each request with its text reversed, and a test scripts its faults."""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Callable

import anyio

from dinfer_async.client import Completion


class FakeClient:
    """`answer(text, attempt)` may raise (a fault on that try) or return None (serve it);
    `ready()` may raise (no worker becomes ready); `start_error` fails the start-up."""

    answer: Callable[[str, int], None] = staticmethod(lambda text, attempt: None)
    ready: Callable[[], None] = staticmethod(lambda: None)
    start_error: Exception | None = None
    delay: float = 0.0
    last: FakeClient | None = None

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.welcome = types.SimpleNamespace(model="fake")
        self.tries: Counter = Counter()
        self.waits = 0
        self.inflight = self.peak = 0
        self.closed = False
        type(self).last = self

    async def __aenter__(self) -> FakeClient:
        if self.start_error is not None:
            raise self.start_error
        return self

    async def __aexit__(self, *exc) -> None:
        self.closed = True

    async def wait_ready(self, timeout: float) -> None:
        self.waits += 1
        self.ready()

    async def generate(self, prompt=None, *, messages=None, params=None) -> Completion:
        text = prompt if prompt is not None else messages[-1]["content"]
        self.tries[text] += 1
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await anyio.sleep(self.delay)
            self.answer(text, self.tries[text])
        finally:
            self.inflight -= 1
        tokens = len(text)
        stats = {
            "forwards": 2,
            "tokens": tokens,
            "committed": 32,
            "prompt_tokens": 7,
            "seconds": 0.01,
        }
        return Completion(text[::-1], list(range(tokens)), "eos", stats)


def use(monkeypatch, **attributes) -> type[FakeClient]:
    """Make dinfer-batch use a FakeClient subclass with these attributes."""
    import dinfer_async.client as client_module

    fake = type("Fake", (FakeClient,), {k: _wrap(v) for k, v in attributes.items()})
    monkeypatch.setattr(client_module, "Client", fake)
    return fake


def _wrap(value):
    return staticmethod(value) if callable(value) and not isinstance(value, type) else value
