"""Serving under tensor parallel: rank 0 takes the requests, every rank runs the same scheduler.

Rank 0 (the one with the socket) calls a `Leader` as it would its Scheduler; the Leader records
arrivals and aborts and broadcasts them to the other ranks just before each step, so every
rank's scheduler sees the same requests at the same step boundaries. The other ranks run
`follow`. Nothing else crosses: the merged confidences are the same on every rank, so their
schedulers make the same decisions, and only rank 0 reports updates.

An idle rank 0 calls `keepalive` now and then: the followers, waiting inside a collective, then
never meet the process group's timeout, and a rank that died is noticed (the collective fails)
before a request needs it.

A rank that hangs without dying (stopped, deadlocked, a wedged device) fails no collective: rank 0
waits in the next one until the process group's 24 h timeout, and its ZeroMQ thread still
answers the client's heartbeats. `watch_steps` bounds that wait: rank 0's Leader notes when each
step (or keepalive) began, and a step still running after `timeout` seconds ends the process with
the group-failure code, so whoever started the group (the Client) restarts it. The group's first
collective is not bounded: it waits for the other ranks to finish loading the model.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dinfer_async.params import SamplingParams
from workers.iteration import Sequence
from workers.parallel.group import TensorParallel
from workers.parallel.ranks import FAILED_EXIT
from workers.scheduler import Finished, Scheduler, StepUpdate

log = logging.getLogger("dinfer.worker")
# an event: ("add", id, prompt, params, seed) or ("abort", id)
Event = tuple[Any, ...]
# what rank 0 broadcasts: ("step", events), ("idle", events), or None (stop)
STEP, IDLE = "step", "idle"


class Leader:
    """Rank 0's scheduler: a Scheduler whose add/abort are replayed on the other ranks."""

    def __init__(self, scheduler: Scheduler, tp: TensorParallel):
        self.scheduler, self.tp = scheduler, tp
        self.events: list[Event] = []
        self.last = time.monotonic()  # of the last collective
        self.busy_since: float | None = None  # when the step (or keepalive) now running began
        self.met = False  # the group has completed a collective (every rank is in `follow`)

    def add(self, id: Any, prompt: list[int], params: SamplingParams, seed: int) -> Sequence:
        self.events.append(("add", id, prompt, params, seed))
        return self.scheduler.add(id, prompt, params, seed)

    def abort(self, seq: Sequence) -> None:
        self.events.append(("abort", seq.id))
        self.scheduler.abort(seq)

    def step(self) -> list[StepUpdate | Finished]:
        try:
            self._send(STEP)
            return self.scheduler.step()
        finally:
            self.busy_since = None

    def keepalive(self) -> None:
        """A collective without a step (rank 0 has nothing to run): see the module docstring."""
        try:
            self._send(IDLE)
        finally:
            self.busy_since = None

    def _send(self, kind: str) -> None:
        """Broadcast the events; from then on the step is watched (busy_since). The group's
        first collective is not: rank 0 serves once it has loaded, and the other ranks join
        it when they have (a slower disk, a download), which is no hung step."""
        if self.met:
            self.busy_since = time.monotonic()
        self.tp.broadcast([(kind, self.events)])
        self.events, self.last, self.met = [], time.monotonic(), True
        self.busy_since = self.last

    def stop(self) -> None:
        """Release the followers (they return from `follow`)."""
        self.tp.broadcast([None])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def __getattr__(self, name: str) -> Any:  # the rest of the Scheduler, unchanged
        return getattr(self.scheduler, name)


def follow(scheduler: Scheduler, tp: TensorParallel) -> None:
    """A rank other than 0: replay rank 0's events and step with it until it stops."""
    seqs: dict[Any, Sequence] = {}
    while True:
        received: list[Any] = tp.broadcast([None])
        if received[0] is None:
            return
        kind, events = received[0]
        for event in events:
            if event[0] == "add":
                _, id, prompt, params, seed = event
                seqs[id] = scheduler.add(id, prompt, params, seed)
            else:
                seq = seqs.pop(event[1], None)
                if seq is not None:
                    scheduler.abort(seq)
        if kind != STEP:
            continue
        scheduler.step()
        for id in [i for i, s in seqs.items() if s.finish_reason is not None]:
            del seqs[id]


def _stalled(leader: Leader, timeout: float, size: int) -> None:
    """The default end of a stalled group: one line, then exit at once (the main thread is
    inside a collective that will not return; the ranks this process started die with it)."""
    log.error(
        "a step of the group of %d ranks has not completed in %.0f s (--rank-timeout): a rank "
        "is hung; the group stops",
        size,
        timeout,
    )
    logging.shutdown()
    sys.stderr.flush()
    os._exit(FAILED_EXIT)


def watch_steps(
    current: Callable[[], Any],
    timeout: float,
    size: int,
    on_stall: Callable[[Leader, float, int], None] = _stalled,
) -> threading.Thread:
    """Rank 0: a daemon thread that calls on_stall once a step of the Leader `current()` returns
    has run `timeout` seconds (see the module docstring). `current` is read at each look, so a
    worker that replaces its scheduler is still watched."""

    def watch() -> None:
        poll = min(1.0, timeout / 10)
        while True:
            time.sleep(poll)
            leader = current()
            since = getattr(leader, "busy_since", None)
            if since is not None and time.monotonic() - since > timeout:
                on_stall(leader, timeout, size)
                return

    thread = threading.Thread(target=watch, name="dinfer-steps", daemon=True)
    thread.start()
    return thread
