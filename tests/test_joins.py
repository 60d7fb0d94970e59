"""Issue 15 item 5a: requests start their block in a running round (at a host check) instead of
waiting for its slowest row: rows that ended a block, other cohorts, new arrivals. The layout
widens to hold them (the present rows' columns and cache move right). Tokens never change
(float64, every decoder and cache, against rounds that take no rows)."""

import itertools

import pytest
import torch

from dinfer_async import SamplingParams
from tests.tiny_models import random_prompts, tiny_family_model, tiny_model
from workers import iteration
from workers.iteration import Batch
from workers.scheduler import Finished, Scheduler, StepUpdate

MASK = 39
DECODERS = ["fixed", "threshold", "factor", "hierarchical", "credit", "joint"]
CACHES = ["none", "prefix", "dual", "vicinity"]
EXTRA = dict(
    fixed=dict(steps=12, temperature=0.7),
    threshold=dict(threshold=0.3),
    factor=dict(factor=2.5, remasking="random"),
    hierarchical=dict(threshold=0.5, low_threshold=0.15, soft_diffusion=True),
    credit=dict(threshold=0.3),
    joint=dict(threshold=0.4, edit_threshold=0.1, max_edit_steps=2),
)


def params(decoder: str, cache: str, gen_length: int, **kw) -> SamplingParams:
    base = dict(gen_length=gen_length, block_length=8, decoder=decoder, cache=cache, prefix_look=2)
    return SamplingParams(**{**base, **EXTRA[decoder], **kw}).validate()


def run(model, prompts, ps, joins, seeds=None, **kw):
    sched = Scheduler(model, report=False, joins=joins, **kw)
    seeds = seeds or [10 + i for i in range(len(prompts))]
    seqs = [sched.add(i, q, p, s) for i, (q, p, s) in enumerate(zip(prompts, ps, seeds))]
    with torch.no_grad():
        while sched.has_work():
            sched.step()
    return seqs, sched


def outcome(seqs):
    return [(s.window, s.forwards, s.committed, s.edits, s.finish_reason) for s in seqs]


@pytest.fixture
def moves(monkeypatch):
    """How far each join moved the present rows' columns."""
    seen: list[int] = []
    join = Batch.join

    def spy(self, seqs):
        seen.append(join(self, seqs))
        return seen[-1]

    monkeypatch.setattr(Batch, "join", spy)
    return seen


@pytest.mark.parametrize("decoder,cache", list(itertools.product(DECODERS, CACHES)))
def test_joins_give_the_same_tokens(decoder, cache, moves):
    """Batch 6, prompts of 2 to 21 tokens, windows of 8 to 32 (so rows end blocks and finish at
    different steps), 1 and 2 steps per check, with row chunks, with cohorts: the tokens,
    forwards, commits and edits of rounds that take no rows."""
    model = tiny_model(21)
    prompts = random_prompts(21, [2, 21, 3, 19, 12, 7], 40, MASK)
    ps = [params(decoder, cache, g) for g in (24, 8, 32, 16, 24, 32)]
    want, alone = run(model, prompts, ps, joins=False)
    assert alone.joined == 0
    joined = []
    variants = (
        dict(),
        dict(steps_per_check=2),
        dict(split_overhead=0, chunk_slots=50),
        dict(split_overhead=4, chunk_slots=50),  # cohorts: the others wait for their turn
    )
    for kw in variants:
        got, sched = run(model, prompts, ps, joins=True, **kw)
        assert outcome(got) == outcome(want), kw
        joined.append(sched.joined)
    if cache in ("dual", "vicinity"):  # their steps feed about the block: rows join
        assert joined[0] > 0 and joined[2] > 0, joined
        assert max(moves) > 0, "some join widened the layout"


def test_a_new_request_joins_at_the_next_check():
    """A request added while a long round runs starts at that round's next step (its first
    update comes with that step, long before the round would have ended) with the tokens it
    gets alone."""
    model = tiny_model(22)
    slow = params("fixed", "dual", 16, steps=16, temperature=0.0, early_stop=False)
    fast = params("threshold", "dual", 16)
    prompts = random_prompts(22, [9, 5], 40, MASK)
    sched = Scheduler(model)
    a = sched.add("slow", prompts[0], slow, 1)
    events = []
    with torch.no_grad():
        for _ in range(2):
            events.append(sched.step())
        b = sched.add("fast", prompts[1], fast, 2)
        while sched.has_work():
            events.append(sched.step())
    first_b = next(i for i, out in enumerate(events) if any(u.seq is b for u in out))
    assert first_b == 2, "b joined the round at the next step"
    assert sched.joined >= 1
    finished = {u.seq.id: i for i, out in enumerate(events) for u in out if isinstance(u, Finished)}
    assert finished["fast"] < finished["slow"]
    for s, p, seed in ((a, slow, 1), (b, fast, 2)):
        [solo], _ = run(model, [s.prompt], [p], joins=False, seeds=[seed])
        assert s.window == solo.window


def test_a_joined_row_aborted_leaves_the_others_alone():
    model = tiny_model(23)
    p = params("fixed", "dual", 16, steps=16, temperature=0.0, early_stop=False)
    prompts = random_prompts(23, [4, 6], 40, MASK)
    sched = Scheduler(model)
    a = sched.add("a", prompts[0], p, 1)
    with torch.no_grad():
        sched.step()
        b = sched.add("b", prompts[1], p, 2)
        out = sched.step()  # b joins at this step's check and runs its first step
        assert b in sched.round.seqs and [u.seq for u in out] == [a, b]
        sched.abort(b)
        while sched.has_work():
            out = sched.step()
            assert not any(u.seq is b for u in out)
    [solo], _ = run(model, [a.prompt], [p], joins=False, seeds=[1])
    assert a.window == solo.window and a.finish_reason == "length"
    assert b.finish_reason is None


def test_what_does_not_join():
    """Guided rows (cfg) never join nor take rows; a round takes no rows while another group
    or another cohort of its group waits (it ends, and they take turns). Tokens as without
    joins."""
    model = tiny_model(24)
    prompts = random_prompts(24, [5, 8, 3], 40, MASK)
    guided = [params("threshold", "dual", 16, cfg_scale=0.5)] * 3
    want, _ = run(model, prompts, guided, joins=False)
    got, sched = run(model, prompts, guided, joins=True)
    assert outcome(got) == outcome(want) and sched.joined == 0

    slow = params("fixed", "dual", 16, steps=16, temperature=0.0)
    other = SamplingParams(gen_length=16, block_length=4, cache="dual").validate()
    sched = Scheduler(model)
    sched.add("a", prompts[0], slow, 1)
    sched.add("c", prompts[1], other, 2)  # another group: block length 4
    with torch.no_grad():
        sched.step()
        late = sched.add("b", prompts[2], slow, 3)
        sched.step()
        assert sched.round.closed and late not in sched.round.seqs

    # a split group: the long prompt's cohort waits for its turn, so the round closes
    sched = Scheduler(model, split_overhead=4)
    for i, n in enumerate((2, 3, 30)):
        sched.add(i, random_prompts(30 + i, [n], 40, MASK)[0], slow, i)
    with torch.no_grad():
        sched.step()
        assert len(sched.round.seqs) == 2
        sched.add("new", prompts[2], slow, 9)
        sched.step()
        assert sched.round.closed and len(sched.round.seqs) == 2


@pytest.mark.parametrize("family", ["Dream", "llada2_moe"])
@pytest.mark.parametrize("cache", CACHES)
def test_other_families(family, cache):
    """Dream feeds the column before the block (logits shifted by one); LLaDA2 is block-causal
    (its caching policies keep rows per round; with no cache its rows join): the tokens of
    rounds that take no rows, with one forward a step and in row chunks."""
    model = tiny_family_model(family)
    prompts = random_prompts(26, [2, 17, 4, 15, 9, 3], 15, 15)
    ps = [
        SamplingParams(
            gen_length=g, block_length=8, threshold=0.5, cache=cache, prefix_look=2
        ).validate()
        for g in (8, 24, 16, 24, 8, 32)
    ]
    want, _ = run(model, prompts, ps, joins=False)
    joined = []
    for kw in (dict(), dict(split_overhead=0, chunk_slots=40)):
        got, sched = run(model, prompts, ps, joins=True, **kw)
        assert outcome(got) == outcome(want), kw
        joined.append(sched.joined)
    if family == "Dream" and cache in ("dual", "vicinity"):
        assert min(joined) > 0
    if family == "llada2_moe" and cache != "none":
        assert joined == [0, 0]


def test_streamed_updates_of_joined_rows():
    """Streaming (report=True): every request's updates cover each of its blocks once, in
    order, the last one final, as without joins."""
    model = tiny_model(27)
    prompts = random_prompts(27, [3, 14, 6, 10], 40, MASK)
    ps = [params("threshold", "dual", g) for g in (8, 24, 16, 32)]

    def stream(joins):
        sched = Scheduler(model, joins=joins)
        seqs = [sched.add(i, q, p, i) for i, (q, p) in enumerate(zip(prompts, ps))]
        finals: dict[int, list[tuple[int, list[int]]]] = {i: [] for i in range(len(seqs))}
        with torch.no_grad():
            while sched.has_work():
                for u in sched.step():
                    if isinstance(u, StepUpdate) and u.block_final:
                        finals[u.seq.id].append((u.block, u.block_tokens))
        return [s.window for s in seqs], finals, sched.joined

    want, want_finals, _ = stream(False)
    got, got_finals, joined = stream(True)
    assert got == want and got_finals == want_finals and joined > 0


def test_joins_can_be_switched_off_by_the_environment(monkeypatch):
    model = tiny_model(28)
    monkeypatch.setenv("DINFER_JOINS", "0")
    assert not Scheduler(model).joins and Scheduler(model, joins=True).joins
    monkeypatch.setenv("DINFER_JOINS", "maybe")
    with pytest.raises(ValueError, match="DINFER_JOINS"):
        Scheduler(model)
    monkeypatch.delenv("DINFER_JOINS")
    assert Scheduler(model).joins


@pytest.mark.parametrize("bound", [2.0, 100.0])
def test_a_round_whose_layout_would_widen_too_far_closes(bound, monkeypatch):
    """A layout never narrows while its round runs, so a row joins only while the layout
    stays within MAX_WIDENING times the longest present row's span; else the round closes and
    the next one is laid out for the rows it has."""
    monkeypatch.setattr(iteration, "MAX_WIDENING", bound)
    model = tiny_model(29)
    p = params("fixed", "dual", 8, steps=8, temperature=0.0)  # one block of 8 steps
    q = params("fixed", "dual", 32, steps=32, temperature=0.0)  # four
    prompts = random_prompts(29, [60, 2, 2], 40, MASK)
    sched = Scheduler(model)
    a = sched.add("a", prompts[0], p, 1)
    with torch.no_grad():
        sched.step()
        b = sched.add("b", prompts[1], q, 2)
        sched.step()
        assert b in sched.round.seqs, "b's 34 columns in a 92-column layout (a's 60 + 8 + 24)"
        while a.finish_reason is None:
            sched.step()
        c = sched.add("c", prompts[2], p, 3)
        out = sched.step()
        # a left: b's 34 and c's 10 columns in 92: beyond twice b's
        assert any(u.seq is c for u in out) == (bound > 2.0)
        if bound == 2.0:  # it closed (or ended with b's block), without c
            assert sched.round is None or sched.round.closed
        while sched.has_work():
            sched.step()
    for s, r, seed in ((a, p, 1), (b, q, 2), (c, p, 3)):
        [solo], _ = run(model, [s.prompt], [r], joins=False, seeds=[seed])
        assert s.window == solo.window
