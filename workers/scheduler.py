"""Continuous batching at block granularity.

Requests wait until a block boundary, then join a round with every running request of the same
block length and cache policy (their prompts, windows, decoders and temperatures may differ).
A round decodes one block for all its rows, one forward per `step()`; at its end, requests whose
block held EOS (with early_stop) or whose window is complete leave at once. Groups with
different block lengths or cache policies take turns, one round each.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from workers.cache import KVCache, make_cache
from workers.iteration import BlockRound, Sequence, StepUpdate
from workers.reference import until_eos
from workers.stops import Decode, cut_at_stop


@dataclass
class Finished:
    seq: Sequence


def group_key(params) -> tuple:
    """Requests that can share a forward: same block length and cache policy."""
    look = (params.prefix_look, params.after_look) if params.cache == "vicinity" else ()
    return (params.block_length, params.cache, *look)


class Scheduler:
    def __init__(
        self,
        model,
        max_batch_size: int = 32,
        report: bool = True,
        steps_per_check: int = 1,
        decode: Decode | None = None,
    ):
        """report: produce a StepUpdate per request per step (streaming); without it, updates
        come only at block ends and a step syncs the host once. decode: token ids -> text, for
        requests with stop strings."""
        self.model, self.max_batch_size, self.report = model, max_batch_size, report
        self.decode = decode
        self.steps_per_check = (
            steps_per_check  # see BlockRound; 1 suits CPUs, more hides GPU latency
        )
        cfg = model.config
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.device = model.lm_head_weight.device
        self.kv = KVCache(
            cfg, self.device, model.lm_head_weight.dtype
        )  # shared: one round at a time
        self.waiting: deque[Sequence] = deque()
        self.running: dict[tuple, list[Sequence]] = {}
        self.round: BlockRound | None = None
        self.round_key: tuple | None = None

    def add(self, id, prompt: list[int], params, seed: int) -> Sequence:
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

    def step(self) -> list[StepUpdate | Finished]:
        """One forward for the current round (starting one if needed)."""
        if self.round is not None and any(s.aborted for s in self.round.seqs):
            # aborted requests leave before the next step, not at the block's end
            self._drop_aborted()
            if self.round is not None and self.round.finished:
                return self._end_round()
        if self.round is None and not self._start_round():
            return []
        updates: list[StepUpdate | Finished] = [u for u in self.round.step() if not u.seq.aborted]
        if self.round.finished:
            updates += self._end_round()
        return updates

    def _drop_aborted(self) -> None:
        key = self.round_key
        self.round.drop({i for i, s in enumerate(self.round.seqs) if s.aborted})
        self.running[key] = [s for s in self.running[key] if not s.aborted]
        if not self.running[key]:
            del self.running[key]
            self.round = self.round_key = None

    def _admit(self) -> None:
        while self.waiting and sum(map(len, self.running.values())) < self.max_batch_size:
            seq = self.waiting.popleft()
            if not seq.aborted:
                self.running.setdefault(group_key(seq.params), []).append(seq)

    def _start_round(self) -> bool:
        self._admit()
        for key in list(self.running):
            self.running[key] = [s for s in self.running[key] if not s.aborted]
            if not self.running[key]:
                del self.running[key]
        if not self.running:
            return False
        key = next(iter(self.running))  # oldest group first; it moves to the back after its round
        seqs = self.running.pop(key)
        self.running[key] = seqs
        self.round_key = key
        self.round = BlockRound(
            self.model,
            seqs,
            make_cache(seqs[0].params, self.kv, self.model.block_causal),
            self.report,
            self.steps_per_check,
        )
        return True

    def _end_round(self) -> list[Finished]:
        done: list[Finished] = []
        seqs = self.running[self.round_key]
        for seq in seqs:
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
            if seq.finish_reason:
                seq.kv = None
                seq.seconds = time.perf_counter() - seq.admitted_at
                if not seq.aborted:
                    done.append(Finished(seq))
        self.running[self.round_key] = [s for s in seqs if not s.finish_reason]
        if not self.running[self.round_key]:
            del self.running[self.round_key]
        self.round = self.round_key = None
        return done

    def _finish_at_stop(self, seq: Sequence, decoded: int) -> bool:
        """Finish `seq` with "stop" if its answer so far (window up to `decoded`) holds a stop
        string: the answer is cut before it and the rest of the window becomes EOS."""
        if self.decode is None:
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
    model,
    prompts: list[list[int]],
    params,
    seeds: list[int],
    max_batch_size: int = 64,
    steps_per_check: int = 1,
    decode: Decode | None = None,
) -> list[Sequence]:
    """Run `prompts` to completion (params: one for all, or one per prompt); results in order."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    scheduler = Scheduler(
        model, max_batch_size, report=False, steps_per_check=steps_per_check, decode=decode
    )
    seqs = [
        scheduler.add(i, p, q, s)
        for i, (p, q, s) in enumerate(zip(prompts, per_prompt, seeds, strict=True))
    ]
    with torch.no_grad():
        while scheduler.has_work():
            scheduler.step()
    return seqs
