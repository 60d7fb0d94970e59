"""Prometheus metrics of dinfer-serve (prometheus-client, one registry per app).

Counters and histograms are fed by the request handlers from each request's final stats;
worker load is asked of the workers (Client.worker_load) when /metrics is scraped. Worker
restarts: `dinfer_worker_restarts` where the client counts them (`Client.restarts`), and always
the WorkerDiedError that requests see (`dinfer_worker_died_errors_total`).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WINDOW = 10.0  # seconds over which dinfer_tokens_per_second is averaged


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dinfer_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.running = Gauge(
            "dinfer_requests_running", "generation requests in flight at the server", registry=r
        )
        self.waiting = Gauge(
            "dinfer_queue_depth",
            "generation requests submitted to a worker that have no output yet",
            registry=r,
        )
        self.worker_active = Gauge(
            "dinfer_worker_active_requests",
            "requests each worker is running, as it reports (read at scrape time)",
            ["worker"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dinfer_prompt_tokens", "prompt tokens (when the worker reports them)", registry=r
        )
        self.tokens = Counter("dinfer_generation_tokens", "answer tokens generated", registry=r)
        self.forwards = Counter(
            "dinfer_forwards", "model forwards that had work for a request, summed", registry=r
        )
        self.tokens_per_forward = Histogram(
            "dinfer_tokens_per_forward",
            "committed positions per forward, per request",
            buckets=(1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=r,
        )
        self.ttft = Histogram(
            "dinfer_time_to_first_token_seconds",
            "from the request's arrival to its first stable text",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.latency = Histogram(
            "dinfer_request_seconds",
            "from the request's arrival to its last chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.died = Counter(
            "dinfer_worker_died_errors",
            "requests ended by their worker's death (the client restarts the worker)",
            registry=r,
        )
        self.aborted = Counter(
            "dinfer_requests_aborted", "requests whose HTTP client went away first", registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()
        Gauge(
            "dinfer_tokens_per_second",
            f"answer tokens per second over the last {WINDOW:.0f} s",
            registry=r,
        ).set_function(self._rate)

    def watch_client(self, client: object) -> None:
        """Worker restarts as the client counts them, where it does (`Client.restarts`)."""
        if isinstance(getattr(client, "restarts", None), int):
            Gauge(
                "dinfer_worker_restarts",
                "restarts of the workers so far, as the client counts them",
                registry=self.registry,
            ).set_function(lambda: client.restarts)  # type: ignore[attr-defined]

    def finished(self, stats: dict | None) -> None:
        """A request's final stats."""
        stats = stats or {}
        tokens = int(stats.get("tokens", 0))
        self.tokens.inc(tokens)
        self.prompt_tokens.inc(int(stats.get("prompt_tokens", 0)))
        self.forwards.inc(int(stats.get("forwards", 0)))
        if stats.get("forwards"):
            self.tokens_per_forward.observe(float(stats.get("tokens_per_forward", 0.0)))
        now = time.monotonic()
        self._recent.append((now, tokens))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()

    def _rate(self) -> float:
        self._trim(time.monotonic())
        return sum(n for _, n in self._recent) / WINDOW

    def render(self, loads: list[int] | None) -> bytes:
        for i, load in enumerate(loads or []):
            self.worker_active.labels(worker=str(i)).set(load)
        return generate_latest(self.registry)
