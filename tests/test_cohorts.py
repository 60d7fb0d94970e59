"""Issue 15 item 5a: rows of a group split into cohorts where padding costs more than it saves,
rows done with a block end it at once; tokens never change (float64, every decoder and cache)."""

import itertools

import pytest
import torch

from dinfer_async import SamplingParams
from tests.tiny_models import random_prompts, tiny_family_model, tiny_model
from workers.cohorts import layout, round_cost, split
from workers.iteration import Sequence
from workers.scheduler import Finished, Scheduler, StepUpdate

MASK = 39
DECODERS = ["fixed", "threshold", "factor", "hierarchical", "credit", "joint"]
CACHES = ["none", "prefix", "dual", "vicinity"]


def seq(prompt_length: int, block: int = 0, gen_length: int = 16) -> Sequence:
    p = SamplingParams(gen_length=gen_length, block_length=8).validate()
    s = Sequence.create(None, [2] * prompt_length, p, 0, MASK)
    s.block = block
    return s


def block_only(start: int, length: int) -> int:
    return 8


def test_split_separates_rows_whose_padding_costs_more_than_a_forward():
    short, long = [seq(3), seq(4)], [seq(40), seq(41)]
    rows = [short[0], long[0], short[1], long[1]]
    cohorts = split(rows, False, overhead=8, steps=2, step_width=block_only)
    assert sorted(map(len, cohorts)) == [2, 2]
    assert {id(s) for s in cohorts[0]} in ({id(s) for s in short}, {id(s) for s in long})
    assert cohorts[0][0] is rows[0], "cohorts keep the rows' order, the first row's cohort first"
    together = round_cost(4, 41, 41 + 8 + 8, 8, 2, block_only)
    apart = round_cost(2, 4, 20, 8, 2, block_only) + round_cost(2, 41, 57, 8, 2, block_only)
    assert apart < together


def test_split_keeps_similar_rows_together_and_can_be_switched_off():
    rows = [seq(10), seq(11), seq(12)]
    assert split(rows, False, overhead=8, steps=2, step_width=block_only) == [rows]
    far = [seq(3), seq(60)]
    assert split(far, False, overhead=0, steps=2, step_width=block_only) == [far]
    assert len(split(far, False, overhead=8, steps=2, step_width=block_only)) == 2


def test_rows_at_different_blocks_are_laid_out_by_their_block():
    assert layout(seq(5, block=0), False) == (5, 8)
    assert layout(seq(5, block=1), False) == (13, 0)
    assert layout(seq(5, block=1), True) == (13, 0)
    rows = [seq(5, 0, gen_length=48), seq(5, 4, gen_length=48)]
    assert len(split(rows, False, overhead=4, steps=2, step_width=block_only)) == 2


def params(decoder: str, cache: str) -> SamplingParams:
    extra = dict(
        fixed=dict(steps=12, temperature=0.7),
        threshold=dict(threshold=0.3),
        factor=dict(factor=2.5, remasking="random"),
        hierarchical=dict(threshold=0.5, low_threshold=0.15, soft_diffusion=True),
        credit=dict(threshold=0.3, cfg_scale=0.5),
        joint=dict(threshold=0.4, edit_threshold=0.1, max_edit_steps=2),
    )[decoder]
    base = dict(gen_length=24, block_length=8, decoder=decoder, cache=cache, prefix_look=2)
    return SamplingParams(**{**base, **extra}).validate()


def run(
    model, prompts, p, split_overhead, steps_per_check=1, seeds=None, chunk_slots=0, joins=False
):
    sched = Scheduler(
        model,
        report=False,
        split_overhead=split_overhead,
        steps_per_check=steps_per_check,
        chunk_slots=chunk_slots,
        joins=joins,
    )
    seeds = seeds or [10 + i for i in range(len(prompts))]
    seqs = [sched.add(i, q, p, seed) for i, (q, seed) in enumerate(zip(prompts, seeds))]
    with torch.no_grad():
        while sched.has_work():
            sched.step()
    return seqs, sched


@pytest.mark.parametrize("decoder,cache", list(itertools.product(DECODERS, CACHES)))
def test_cohorts_give_the_same_tokens(decoder, cache):
    """Ragged prompts (2 to 21 tokens), batch 5: split into cohorts, full forwards in row chunks
    over their own columns, 2 steps per check: the tokens, forwards, commits and edits equal one
    lockstep round per block in one forward a step."""
    model = tiny_model(12)
    prompts = random_prompts(12, [2, 21, 3, 19, 20], 40, MASK)
    p = params(decoder, cache)
    stats = lambda s: (s.window, s.forwards, s.committed, s.edits, s.finish_reason)
    want, lockstep = run(model, prompts, p, 0)
    for split_overhead, chunk_slots in ((4, 0), (0, 50), (4, 50)):
        got, new = run(model, prompts, p, split_overhead, 2, chunk_slots=chunk_slots)
        assert [stats(s) for s in got] == [stats(s) for s in want]
        assert new.padding()["padding_waste"] < lockstep.padding()["padding_waste"]
        if split_overhead:
            assert new.rounds > lockstep.rounds, "the long and short prompts ran apart"


@pytest.mark.parametrize("family", ["Dream", "llada2_moe"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_chunked_full_forwards_on_other_families(family, cache):
    """Dream's shifted logits (the column before the block is fed), LLaDA2's block-causal mask
    (cache "none" runs it chunked): the same tokens in row chunks."""
    model = tiny_family_model(family)
    prompts = random_prompts(16, [2, 17, 4, 15], 15, 15)
    p = SamplingParams(gen_length=16, block_length=8, threshold=0.5, cache=cache).validate()
    want, _ = run(model, prompts, p, 0)
    got, sched = run(model, prompts, p, 0, chunk_slots=40)
    assert [s.window for s in got] == [s.window for s in want]
    assert sched.padding()["padding_waste"] < 0.2


def test_padding_waste_is_counted_per_step():
    model = tiny_model(13)
    p = SamplingParams(
        gen_length=8, block_length=8, decoder="fixed", steps=2, cache="dual", early_stop=False
    ).validate()
    _, sched = run(model, [[3, 4, 5, 6], [7, 8]], p, 0)
    # step 0 feeds the whole 4 + 8 columns of both rows, step 1 the block: 2 + 0 pads
    assert sched.padding()["tokens_fed"] == 2 * 12 + 2 * 8
    assert sched.padding()["tokens_real"] == 12 + 10 + 2 * 8


def test_a_row_done_early_finishes_before_the_slowest_row():
    """A request whose block ends in one step finishes at that step's check (its Finished comes
    first), not when its batch-mate's slow block is done; tokens as alone."""
    model = tiny_model(14)
    fast = SamplingParams(
        gen_length=8, block_length=8, decoder="threshold", threshold=0.01, cache="dual"
    ).validate()
    slow = SamplingParams(
        gen_length=8, block_length=8, decoder="fixed", steps=8, cache="dual"
    ).validate()
    prompts = random_prompts(14, [4, 5], 40, MASK)
    sched = Scheduler(model, split_overhead=0)
    a = sched.add("fast", prompts[0], fast, 1)
    b = sched.add("slow", prompts[1], slow, 2)
    events = []
    with torch.no_grad():
        while sched.has_work():
            events.append(sched.step())
    finished_at = {
        u.seq.id: i for i, out in enumerate(events) for u in out if isinstance(u, Finished)
    }
    assert finished_at == {"fast": 0, "slow": 7}
    assert any(isinstance(u, StepUpdate) and u.seq is a and u.block_final for u in events[0])
    for s, q, seed in ((a, fast, 1), (b, slow, 2)):
        alone, _ = run(model, [s.prompt], q, 0, seeds=[seed])
        assert s.window == alone[0].window


def test_aborting_a_whole_cohort_leaves_the_others_running():
    model = tiny_model(15)
    p = SamplingParams(
        gen_length=16, block_length=8, decoder="fixed", steps=16, cache="dual", early_stop=False
    ).validate()
    prompts = random_prompts(15, [2, 24, 3], 40, MASK)
    sched = Scheduler(model, split_overhead=4, joins=False)  # the long row would join the round
    seqs = [sched.add(i, q, p, 10 + i) for i, q in enumerate(prompts)]
    sched.step()
    running = sched.round.seqs
    assert 0 < len(running) < 3, "the long prompt runs apart from the short ones"
    for s in running:
        sched.abort(s)
    with torch.no_grad():
        while sched.has_work():
            sched.step()
    left = [s for s in seqs if s not in running]
    assert all(s.finish_reason in ("eos", "length") for s in left)
    assert all(s.finish_reason is None for s in running)
    for s in left:
        alone, _ = run(model, [s.prompt], p, 0, seeds=[10 + s.id])
        assert s.window == alone[0].window
