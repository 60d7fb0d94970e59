"""Continuous batching at each request's block boundaries.

A round decodes blocks for its rows, one forward per `step()`: requests of the same block
length and cache policy (their prompts, windows, blocks, decoders and temperatures may differ).
A row done with its block leaves the round at the next host check and its block ends at once: a
request whose block held EOS (with early_stop), or whose window is complete, finishes then, not
when the round's slowest row is done. At the next step the others start their next block in the
same round, as new arrivals do (`joins`; BlockRound.join), while nothing else waits: another
group, a row that may not join (guidance; a policy with per-round state), or another cohort.
Where rows of a group differ so much in layout (prompt lengths, blocks) that their padding costs
more than a forward's fixed cost, the group is split into cohorts that take turns
(workers/cohorts.py), and a round's full forwards run in row chunks over their own columns
(Batch.run_full); `padding()` reports the padding waste of every step. Groups with different
block lengths or cache policies take turns, one round each. Each group has one cache policy
object for as long as it has requests; the scheduler tells it when a request leaves.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dinfer_async.params import SamplingParams
from dinfer_async.validation import check_steps_per_check
from workers.cache import CachePolicy, policy_class
from workers.cohorts import CPU_CHUNK_SLOTS, CPU_FORWARD_OVERHEAD
from workers.cohorts import split as cohorts_split
from workers.graphs import StepGraphs, resolve_mode
from workers.iteration import BlockRound, Sequence, StepUpdate
from workers.kv_cache import KVCache
from workers.shared import until_eos
from workers.stops import Decode, cut_at_stop

if TYPE_CHECKING:
    from workers.interfaces import DiffusionModel

GroupKey = tuple[Hashable, ...]


@dataclass
class Finished:
    seq: Sequence


def default_steps_per_check(value: int | None = None) -> int:
    """`value`, or $DINFER_STEPS_PER_CHECK when None (1 when unset)."""
    if value is not None:
        check_steps_per_check(value)
        return value
    text = os.environ.get("DINFER_STEPS_PER_CHECK", "1")
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ValueError(f"DINFER_STEPS_PER_CHECK={text!r}: set an integer >= 1 or unset it")
    return steps


def default_joins(value: bool | None = None) -> bool:
    """`value`, or $DINFER_JOINS when None (on when unset)."""
    if value is not None:
        return value
    text = os.environ.get("DINFER_JOINS", "1").strip().lower()
    named = {"": True, "1": True, "on": True, "0": False, "off": False}
    if text not in named:
        raise ValueError(f"DINFER_JOINS={text!r}: set 1 or 0, or unset it")
    return named[text]


def group_key(params: SamplingParams, block_causal: bool) -> GroupKey:
    """Requests that can share a forward: same block length and cache policy class, and the
    same parameters of that policy (its own `group_key`)."""
    cls = policy_class(params.cache, block_causal)
    return (params.block_length, cls, *cls.group_key(params))


class Scheduler:
    def __init__(
        self,
        model: DiffusionModel,
        max_batch_size: int = 32,
        report: bool = True,
        steps_per_check: int | None = None,
        decode: Decode | None = None,
        split_overhead: float | None = None,
        chunk_slots: int | None = None,
        cuda_graphs: bool | str | StepGraphs | None = None,
        joins: bool | None = None,
    ):
        """report: produce a StepUpdate per request at each host check (streaming); without
        it, updates come only at block ends. steps_per_check: steps between host checks, see
        BlockRound (None: $DINFER_STEPS_PER_CHECK, else 1; 1 suits CPUs, where a check costs
        nothing and a step after a block is done costs a forward; more hides GPU latency).
        decode: token ids -> text, for requests with stop strings. split_overhead: a forward's
        fixed cost in token slots, for splitting a group into cohorts that take turns where
        their padding costs more (workers/cohorts.py); None: CPU_FORWARD_OVERHEAD on a CPU, 0
        (never split) elsewhere, where a forward is launch-bound and the split is unmeasured,
        and for block-causal models (a round's first step feeds only what is not stored).
        chunk_slots: a round's full forwards run in row chunks of at most this many token
        slots, each over its rows' own columns (Batch.run_full); None: CPU_CHUNK_SLOTS on a
        CPU, 0 (one forward) elsewhere. cuda_graphs: a block's steps after its first run as
        static-shape steps, CUDA graphs on a GPU (workers/graphs.py: True/"on", "static" or
        False/"off"; None: $DINFER_CUDA_GRAPHS, off when unset; a StepGraphs: those graphs and
        their KV storage, kept across schedulers). Opt-in: unchecked on a GPU. joins: requests
        of the round's group start their block in it at a host check (Scheduler._join); False:
        only when a round starts; None: $DINFER_JOINS, on when unset."""
        self.model = model
        self.max_batch_size = max_batch_size
        self.report = report
        self.steps_per_check = default_steps_per_check(steps_per_check)
        self.decode = decode
        cfg = model.config
        self.mask_id: int = cfg.mask_token_id
        self.eos_id: int = cfg.eos_token_id
        self.device = model.lm_head_weight.device
        if isinstance(cuda_graphs, StepGraphs):
            self.graphs: StepGraphs | None = cuda_graphs
        else:
            mode = resolve_mode(cuda_graphs)
            self.graphs = None if mode == "off" else StepGraphs(self.device, mode)
        # one storage for every policy: one round runs at a time
        dtype = model.lm_head_weight.dtype
        if self.graphs is None:
            self.kv = KVCache(cfg, self.device, dtype)
        else:
            self.kv = self.graphs.kv_cache(cfg, self.device, dtype)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[GroupKey, list[Sequence]] = {}
        self.policies: dict[GroupKey, CachePolicy] = {}  # one per group in `running`
        self.round: BlockRound | None = None
        self.round_key: GroupKey = ()
        self.apart: set[Sequence] = set()  # rows of the round's group in other cohorts
        if split_overhead is None:
            cpu = self.device.type == "cpu" and not model.block_causal
            split_overhead = CPU_FORWARD_OVERHEAD if cpu else 0
        self.split_overhead = split_overhead
        if chunk_slots is None:
            chunk_slots = CPU_CHUNK_SLOTS if self.device.type == "cpu" else 0
        self.chunk_slots = chunk_slots
        self.rounds = 0  # rounds started
        self.steps = 0  # steps run (on a GPU, where block forwards are launch-bound: its time)
        self.last_ran: dict[Sequence, int] = {}  # the round each request last ran in (or joined)
        self.steps_per_block: dict[GroupKey, float] = {}  # a running mean of blocks' steps
        self.joins = default_joins(joins)
        self.joined = 0  # requests that started a block in a running round
        # padding waste over every forward so far: token slots fed, and the real ones among them
        self.fed = 0
        self.fed_real = 0

    def add(self, id: Any, prompt: list[int], params: SamplingParams, seed: int) -> Sequence:
        seq = Sequence.create(id, prompt, params, seed, self.mask_id, self.model.block_causal)
        seq.admitted_at = time.perf_counter()
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """The request leaves at the next block boundary; its updates stop now."""
        seq.aborted = True

    @property
    def active(self) -> int:
        return len(self.waiting) + sum(map(len, self.running.values()))

    def has_work(self) -> bool:
        return self.round is not None or self.active > 0

    def takes_rows(self) -> bool:
        """The next step starts a round or may take rows into the running one (joins)."""
        round = self.round
        return round is None or (self.joins and round.checked and not round.closed)

    def step(self) -> list[StepUpdate | Finished]:
        """One forward for the current round (starting one if needed)."""
        if self.round is not None and any(s.aborted for s in self.round.seqs):
            # aborted requests leave before the next step, not at the block's end
            pending = self._drop_aborted(self.round)
            if self.round is not None and self.round.finished:
                return [*pending, *self._end_round()]
        if self.round is None and not self._start_round():
            return []
        assert self.round is not None
        if self.takes_rows():
            self._join(self.round)
        self.steps += 1
        updates: list[StepUpdate | Finished] = [u for u in self.round.step() if not u.seq.aborted]
        policy = self.policies[self.round_key]
        for seq in self.round.left:  # done with the block before the slowest row: ends now
            finished = self._end_block(seq, policy)
            if finished is not None:
                updates.append(finished)
        if any(s.finish_reason for s in self.round.left):
            self.running[self.round_key] = [
                s for s in self.running[self.round_key] if not s.finish_reason
            ]
        if self.round.finished:
            updates += self._end_round()
        return updates

    def _join(self, round: BlockRound) -> None:
        """Before a step, at a host check: requests of the round's group at a block boundary
        (rows that left it, new arrivals) start their block in it now instead of waiting for
        its slowest row (BlockRound.joinable); not the other cohorts of a split group (their
        refresh is cheaper in their own round). If another group or a request that may not
        join is waiting, the round takes no rows from then on: it ends after its present rows,
        and the others have their turn."""
        self._admit()
        key = self.round_key
        if any(rows for k, rows in self.running.items() if k != key):
            round.closed = True
        if round.closed:
            return
        inside = set(round.seqs)
        ready = [s for s in self.running[key] if s not in inside and not s.aborted]
        ready.sort(key=lambda s: self.last_ran.get(s, 0))  # the longest waiting first
        # rows the cohort split put apart from this round wait for their own
        joining = round.joinable([s for s in ready if s not in self.apart])
        if len(joining) < len(ready):  # the others go first
            round.closed = True
        elif joining:
            round.join(joining)
            self.joined += len(joining)
            for seq in joining:
                self.last_ran[seq] = self.rounds

    def _drop_aborted(self, round: BlockRound) -> list[StepUpdate | Finished]:
        """Aborted rows leave the round; returned: the others' updates if that ends it."""
        pending: list[StepUpdate | Finished] = list(
            round.drop({i for i, s in enumerate(round.seqs) if s.aborted})
        )
        if not self._remove_aborted(self.round_key) or not round.seqs:
            self._count(round)
            self.round = None
        return pending

    def _remove_aborted(self, key: GroupKey) -> bool:
        """Aborted requests leave group `key`; False if that leaves it empty (it is gone)."""
        policy = self.policies[key]
        for seq in self.running[key]:
            if seq.aborted:
                policy.leave(seq)
                self.last_ran.pop(seq, None)
        self.running[key] = [s for s in self.running[key] if not s.aborted]
        return self._keep_group(key)

    def _keep_group(self, key: GroupKey) -> bool:
        if self.running[key]:
            return True
        del self.running[key]
        del self.policies[key]
        return False

    def _admit(self) -> None:
        while self.waiting and sum(map(len, self.running.values())) < self.max_batch_size:
            seq = self.waiting.popleft()
            if seq.aborted:
                continue
            key = group_key(seq.params, self.model.block_causal)
            if key not in self.running:
                cls = policy_class(seq.params.cache, self.model.block_causal)
                self.policies[key] = cls(seq.params, self.kv)
            self.running.setdefault(key, []).append(seq)
            self.last_ran[seq] = self.rounds

    def _start_round(self) -> bool:
        self._admit()
        for key in list(self.running):
            self._remove_aborted(key)
        if not self.running:
            return False
        key = next(iter(self.running))  # oldest group first; it moves to the back after its round
        seqs = self.running.pop(key)
        self.running[key] = seqs
        self.round_key = key
        self.round = BlockRound(
            self.model,
            self._cohort(key, seqs),
            self.policies[key],
            self.report,
            self.steps_per_check,
            self.chunk_slots,
            self.graphs,
        )
        self.rounds += 1
        cohort = set(self.round.seqs)
        self.apart = {s for s in seqs if s not in cohort}  # the group's other cohorts
        for seq in self.round.seqs:
            self.last_ran[seq] = self.rounds
        return True

    def _cohort(self, key: GroupKey, seqs: list[Sequence]) -> list[Sequence]:
        """The rows of group `key` that run this round: its cohort (workers/cohorts.py) holding
        the request that has waited longest since it last ran."""
        if self.split_overhead <= 0 or len(seqs) < 2:
            return seqs
        policy = self.policies[key]
        K = seqs[0].params.block_length
        cohorts = cohorts_split(
            seqs,
            self.model.block_causal,
            self.split_overhead,
            self.steps_per_block.get(key, 2.0),
            lambda start, length: policy.step_width(start, length, K),
        )
        return min(cohorts, key=lambda c: min(self.last_ran.get(s, 0) for s in c))

    def _count(self, round: BlockRound) -> None:
        self.fed += round.batch.fed
        self.fed_real += round.batch.fed_real

    def padding(self) -> dict[str, float]:
        """Per-step padding waste so far: token slots fed through the model, the real ones
        among them, and the wasted fraction."""
        return {
            "tokens_fed": self.fed,
            "tokens_real": self.fed_real,
            "padding_waste": 1 - self.fed_real / max(self.fed, 1),
        }

    def _end_round(self) -> list[Finished]:
        assert self.round is not None
        key, round = self.round_key, self.round
        policy = self.policies[key]
        done = [f for seq in round.seqs if (f := self._end_block(seq, policy)) is not None]
        self._count(round)
        if round.block_steps:  # the steps its rows' blocks took (none if all were aborted)
            steps = sum(round.block_steps) / len(round.block_steps)
            mean = self.steps_per_block.get(key, steps)
            self.steps_per_block[key] = 0.75 * mean + 0.25 * steps
        self.running[key] = [s for s in self.running[key] if not s.finish_reason]
        self._keep_group(key)
        self.round = None
        return done

    def _end_block(self, seq: Sequence, policy: CachePolicy) -> Finished | None:
        """`seq`'s block is in its window: move it to the next block, or finish it (EOS with
        early_stop, a stop string, the window's end). Finished ones leave the group's policy."""
        lo, hi = seq.span(seq.block)
        seq.block += 1
        if seq.params.stop and self._finish_at_stop(seq, hi):
            pass  # the answer is cut before the stop string
        elif seq.params.early_stop and self.eos_id in seq.window[lo:hi]:
            cut = seq.window.index(self.eos_id, seq.skip)
            seq.window[cut:] = [self.eos_id] * (len(seq.window) - cut)
            seq.finish_reason = "eos"
        elif seq.block == seq.num_blocks:
            seq.finish_reason = "eos" if self.eos_id in seq.generated() else "length"
        if not seq.finish_reason:
            return None
        policy.leave(seq)
        self.last_ran.pop(seq, None)
        seq.seconds = time.perf_counter() - seq.admitted_at
        return None if seq.aborted else Finished(seq)

    def _finish_at_stop(self, seq: Sequence, decoded: int) -> bool:
        """Finish `seq` with "stop" if its answer so far (window up to `decoded`) holds a stop
        string: the answer is cut before it and the rest of the window becomes EOS."""
        if self.decode is None or not seq.params.stop:
            raise ValueError("stop strings need a Scheduler with decode=")
        answer = until_eos(seq.window[seq.skip : decoded], self.eos_id)
        cut = cut_at_stop(answer, seq.params.stop, self.decode)
        if cut is None:
            return False
        end = seq.skip + cut.tokens
        seq.window[end:] = [self.eos_id] * (len(seq.window) - end)
        seq.finish_reason, seq.stop_text = "stop", cut.text
        return True


def denoise(
    model: DiffusionModel,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    seeds: list[int],
    max_batch_size: int = 64,
    steps_per_check: int | None = None,
    decode: Decode | None = None,
    split_overhead: float | None = None,
    stats: dict[str, float] | None = None,
    chunk_slots: int | None = None,
    cuda_graphs: bool | str | StepGraphs | None = None,
    joins: bool | None = None,
) -> list[Sequence]:
    """Run `prompts` to completion (params: one for all, or one per prompt); results in order.
    `stats`, if given, receives the run's padding waste, rounds, steps and joins
    (Scheduler.padding, .rounds, .steps, .joined)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    scheduler = Scheduler(
        model,
        max_batch_size,
        report=False,
        steps_per_check=steps_per_check,
        decode=decode,
        split_overhead=split_overhead,
        chunk_slots=chunk_slots,
        cuda_graphs=cuda_graphs,
        joins=joins,
    )
    before = dict(scheduler.graphs.counts) if scheduler.graphs is not None else {}
    seqs = [
        scheduler.add(i, p, q, s)
        for i, (p, q, s) in enumerate(zip(prompts, per_prompt, seeds, strict=True))
    ]
    with torch.no_grad():
        while scheduler.has_work():
            scheduler.step()
    if stats is not None:
        stats.update(
            scheduler.padding(),
            rounds=scheduler.rounds,
            steps=scheduler.steps,
            joined=scheduler.joined,
        )
        if scheduler.graphs is not None:
            counts = scheduler.graphs.counts.items()
            stats.update({f"steps_{k}": v - before[k] for k, v in counts})
    return seqs
