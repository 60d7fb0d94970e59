"""Which rows of a group share a round: split where padding costs more than it saves.

A round lays its rows out so their current blocks share columns: every row is as long as the
longest left part (prompt and decided blocks) plus the block plus the longest right part (the
rest of the window). Rows of very different lengths, or at different blocks, then compute many
padding slots. Splitting them into cohorts that take turns costs a forward's fixed overhead per
step per extra cohort and saves their padding; `split` picks the cheapest partition of the rows
sorted by layout (exact over contiguous runs, by dynamic programming). Tokens never depend on it:
each row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.iteration import Sequence

# a forward's fixed cost in token slots, measured on the 2-core CPU with the bundled model
# (benchmarks/forward_scaling.py: 1 row of a 32-token block 1.7-1.9 ms, 19 us per extra slot)
CPU_FORWARD_OVERHEAD = 64
# the token slots of a full forward this CPU computes fastest per slot (one thread, CPU time:
# 32-35 us a slot at 4-16 rows of 100 tokens, 38 at 4 rows of 300, 44 at 16 rows of 300; chunk
# sizes 512 to 2,500 compared end to end in benchmarks/RESULTS.md, issue 15)
CPU_CHUNK_SLOTS = 1024


def layout(seq: Sequence, block_causal: bool) -> tuple[int, int]:
    """(left, right): the row's token counts before and after its current block in a round."""
    K = seq.params.block_length
    left = len(seq.prompt) + seq.block * K
    right = len(seq.seen_after_block(block_causal))
    return left, right


def round_cost(
    rows: int,
    block_start: int,
    length: int,
    overhead: float,
    steps: float,
    step_width: Callable[[int, int], int],
) -> float:
    """Token slots (plus `overhead` per forward) of a round of `rows` rows laid out to `length`
    columns with the block at `block_start`: one full forward, then steps - 1 forwards feeding
    step_width(block_start, length) slots per row."""
    return steps * overhead + rows * length + (steps - 1) * rows * step_width(block_start, length)


def split(
    seqs: list[Sequence],
    block_causal: bool,
    overhead: float,
    steps: float,
    step_width: Callable[[int, int], int],
) -> list[list[Sequence]]:
    """The cohorts of `seqs` with the lowest total round_cost (one cohort when overhead <= 0
    or there is nothing to gain), each in the order of `seqs`."""
    if overhead <= 0 or len(seqs) < 2:
        return [seqs]
    K = seqs[0].params.block_length
    shapes = {id(s): layout(s, block_causal) for s in seqs}
    order = sorted(seqs, key=lambda s: shapes[id(s)])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        left = right = 0
        for i in range(j - 1, -1, -1):  # the last cohort is order[i:j]
            a, b = shapes[id(order[i])]
            left, right = max(left, a), max(right, b)
            cost = best[i] + round_cost(j - i, left, left + K + right, overhead, steps, step_width)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[Sequence]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    rank = {id(s): r for r, s in enumerate(seqs)}
    cohorts = [sorted(g, key=lambda s: rank[id(s)]) for g in groups]
    return sorted(cohorts, key=lambda g: rank[id(g[0])])
