"""Tests over a real gloo group: each rank's results as JSON in a folder, read back in order."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from workers.parallel.group import launch


def report(out: str | Path, rank: int, results: dict) -> None:
    """What a rank function hands back to the test (call it last in the rank)."""
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def run_ranks(fn: Callable[..., None], size: int, out: str | Path) -> list[dict]:
    """fn(rank, size, out) in `size` processes; each rank's `report`, in rank order."""
    launch(fn, size, str(out))
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(size)]
