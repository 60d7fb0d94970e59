"""Wall-clock timing shared by the CPU benchmark scripts (run as `python
benchmarks/<script>.py`)."""

from __future__ import annotations

import time


def seconds_per_call(fn, repeat: int, warmup: int = 1) -> float:
    """Mean seconds per call of `fn` over `repeat` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    begin = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - begin) / repeat
