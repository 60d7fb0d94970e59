"""Serving under tensor parallel: rank 0 takes the requests, every rank runs the same scheduler.

Rank 0 (the one with the socket) calls a `Leader` as it would its Scheduler; the Leader records
arrivals and aborts and broadcasts them to the other ranks just before each step, so every
rank's scheduler sees the same requests at the same step boundaries. The other ranks run
`follow`. Nothing else crosses: the merged confidences are the same on every rank, so their
schedulers make the same decisions, and only rank 0 reports updates.

An idle rank 0 calls `keepalive` now and then: the followers, waiting inside a collective, then
never meet the process group's timeout, and a rank that died is noticed (the collective fails)
before a request needs it.
"""

from __future__ import annotations

import time
from typing import Any

from dinfer_async.params import SamplingParams
from workers.iteration import Sequence
from workers.parallel.group import TensorParallel
from workers.scheduler import Finished, Scheduler, StepUpdate

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

    def add(self, id: Any, prompt: list[int], params: SamplingParams, seed: int) -> Sequence:
        self.events.append(("add", id, prompt, params, seed))
        return self.scheduler.add(id, prompt, params, seed)

    def abort(self, seq: Sequence) -> None:
        self.events.append(("abort", seq.id))
        self.scheduler.abort(seq)

    def step(self) -> list[StepUpdate | Finished]:
        self.tp.broadcast([(STEP, self.events)])
        self.events, self.last = [], time.monotonic()
        return self.scheduler.step()

    def keepalive(self) -> None:
        """A collective without a step (rank 0 has nothing to run): see the module docstring."""
        self.tp.broadcast([(IDLE, self.events)])
        self.events, self.last = [], time.monotonic()

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
