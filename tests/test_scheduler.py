"""Continuous batching: mixed requests share forwards, join at block boundaries, leave when done,
and never change each other's tokens."""

from types import SimpleNamespace

import pytest
import torch

from dinfer_async import SamplingParams
from tests.tiny_models import random_prompts, tiny_model
from workers.scheduler import Finished, Scheduler, denoise

MASK, EOS = 11, 1


def model():
    return tiny_model(31, vocab_size=12, embedding_size=16, mask_token_id=MASK, std=0.7)


MIXED = [
    SamplingParams(gen_length=24, block_length=8, decoder="threshold", threshold=0.5, cache="dual"),
    SamplingParams(
        gen_length=16,
        block_length=8,
        decoder="fixed",
        steps=8,
        cache="dual",
        temperature=0.8,
        early_stop=False,
    ),
    SamplingParams(
        gen_length=32, block_length=8, decoder="credit", threshold=0.6, cache="dual", cfg_scale=0.5
    ),
    SamplingParams(
        gen_length=24,
        block_length=8,
        decoder="hierarchical",
        cache="dual",
        soft_diffusion=True,
        suppress_eos=True,
    ),
    SamplingParams(
        gen_length=16, block_length=8, decoder="factor", cache="dual", remasking="random"
    ),
    SamplingParams(
        gen_length=16, block_length=4, decoder="threshold", cache="none"
    ),  # another group
]


def test_mixed_requests_batched_equal_each_alone():
    m = model()
    prompts = random_prompts(31, [5, 9, 2, 7, 3, 6], MASK, MASK)
    seeds = [5, 6, 7, 8, 9, 10]
    params = [p.validate() for p in MIXED]
    together = [s.window for s in denoise(m, prompts, params, seeds)]
    alone = [denoise(m, [p], [q], [s])[0].window for p, q, s in zip(prompts, params, seeds)]
    assert together == alone


def test_rounds_share_one_forward_and_finished_requests_leave():
    m = model()
    calls = []
    original = m.forward
    m.forward = lambda ids, *a, **k: (calls.append(ids.shape[0]), original(ids, *a, **k))[1]
    sched = Scheduler(m, max_batch_size=8)
    params = [
        SamplingParams(
            gen_length=32, block_length=8, decoder="fixed", steps=16, cache="none", early_stop=e
        ).validate()
        for e in (False, False, True)
    ]
    prompts = random_prompts(43, [4, 6, 3], MASK, MASK)  # the third stops at EOS in its first block
    seqs = [sched.add(i, p, q, 0) for i, (p, q) in enumerate(zip(prompts, params))]
    finished = []
    while sched.has_work():
        finished += [u.seq.id for u in sched.step() if isinstance(u, Finished)]
    assert sorted(finished) == [0, 1, 2]
    assert calls[0] == 3, "all three requests run in the first forward"
    assert len(calls) == 16, "the fixed schedule: 4 steps per block, 4 blocks"
    assert EOS in seqs[2].window[:8] and seqs[2].forwards == 4
    assert calls[4] == 2, "the early-stopped request left the batch after its first block"
    assert [s.forwards for s in seqs[:2]] == [16, 16]


def test_a_request_joining_mid_run_is_unaffected():
    m = model()
    p = SamplingParams(
        gen_length=24, block_length=8, threshold=0.4, cache="dual", temperature=0.5
    ).validate()
    prompts = random_prompts(33, [5, 8], MASK, MASK)
    sched = Scheduler(m)
    first = sched.add("first", prompts[0], p, 1)
    for _ in range(3):
        sched.step()
    late = sched.add("late", prompts[1], p, 2)
    while sched.has_work():
        sched.step()
    assert first.window == denoise(m, [prompts[0]], p, [1])[0].window
    assert late.window == denoise(m, [prompts[1]], p, [2])[0].window
    assert late.finish_reason and first.finish_reason


def test_aborted_request_leaves_and_sends_nothing_more():
    m = model()
    p = SamplingParams(
        gen_length=32, block_length=8, decoder="fixed", steps=32, cache="dual", early_stop=False
    ).validate()
    sched = Scheduler(m)
    a = sched.add("a", [3, 4, 5], p, 0)
    b = sched.add("b", [6, 7], p, 0)
    sched.step()
    sched.abort(a)
    seen = set()
    while sched.has_work():
        seen |= {u.seq.id for u in sched.step()}
    assert seen == {"b"} and b.finish_reason == "length"
    assert a.finish_reason is None and sched.active == 0


def test_abort_mid_block_drops_the_row_before_the_next_step():
    """The others keep their tokens; the next forward has fewer rows (cache rows compacted)."""
    m = model()
    calls = []
    original = m.forward
    m.forward = lambda ids, *a, **k: (calls.append(ids.shape[0]), original(ids, *a, **k))[1]
    params = [
        SamplingParams(
            gen_length=16,
            block_length=16,
            decoder=d,
            steps=16,
            cache=c,
            early_stop=False,
            cfg_scale=g,
        ).validate()
        for d, c, g in [
            ("fixed", "dual", 0.0),
            ("credit", "dual", 0.5),
            ("fixed", "dual", 0.3),
            ("fixed", "dual", 0.0),
        ]
    ]
    prompts = random_prompts(36, [4, 6, 3, 5], MASK, MASK)
    sched = Scheduler(m)
    seqs = [sched.add(i, p, q, 7) for i, (p, q) in enumerate(zip(prompts, params))]
    for _ in range(3):
        sched.step()
    sched.abort(seqs[1])
    sched.step()
    assert calls[-1] == 3 + 1, "three rows left, one of them guided"
    while sched.has_work():
        sched.step()
    for i in (0, 2, 3):
        assert seqs[i].window == denoise(m, [prompts[i]], params[i], [7])[0].window
    assert seqs[1].finish_reason is None


def test_rows_done_with_the_block_leave_the_forwards():
    """A row whose block is decoded stops costing compute before the slowest row is done; its
    tokens and the others' equal each request decoded alone."""
    m = model()
    rows = []
    original = m.forward
    m.forward = lambda ids, *a, **k: (rows.append(ids.shape[0]), original(ids, *a, **k))[1]
    fast = SamplingParams(
        gen_length=16,
        block_length=8,
        decoder="threshold",
        threshold=0.01,
        cache="dual",
        early_stop=False,
    ).validate()
    slow = SamplingParams(
        gen_length=16, block_length=8, decoder="fixed", steps=16, cache="dual", early_stop=False
    ).validate()
    prompts = random_prompts(37, [4, 6, 5], MASK, MASK)
    params = [fast, slow, fast]
    seqs = denoise(m, prompts, params, [0, 1, 2])
    assert rows[:2] == [3, 1], (
        "after one step the two threshold rows (tau 0.01 commits all) are gone"
    )
    for p, q, seq, seed in zip(prompts, params, seqs, [0, 1, 2]):
        assert seq.window == denoise(m, [p], q, [seed])[0].window


@pytest.mark.parametrize("decoder", ["fixed", "threshold", "hierarchical", "credit"])
def test_queued_steps_between_host_checks_change_nothing(decoder):
    """steps_per_check > 1 queues steps without looking at the rows; tokens and per-request
    stats (forwards counted only while a row had work) are the same as checking every step."""
    m = model()
    prompts = random_prompts(38, [4, 7, 2, 5], MASK, MASK)
    params = SamplingParams(
        gen_length=24, block_length=8, decoder=decoder, threshold=0.6, cache="dual"
    ).validate()
    runs = [denoise(m, prompts, params, [0, 1, 2, 3], steps_per_check=n) for n in (1, 3, 8)]
    for seqs in runs[1:]:
        assert [s.window for s in seqs] == [s.window for s in runs[0]]
        assert [(s.forwards, s.committed, s.finish_reason) for s in seqs] == [
            (s.forwards, s.committed, s.finish_reason) for s in runs[0]
        ]


class ScriptedModel(torch.nn.Module):
    """Logits by answer position (RoPE position - prompt length): 0 -> token 5 and 1 -> EOS, both
    certain; every later position token 7 with a confidence under 0.3, growing with the position
    (so a threshold decoder commits them one a step, the last first)."""

    logit_shift = 0
    block_causal = False

    def __init__(self, prompt_length: int, vocab: int = 12):
        super().__init__()
        self.prompt_length = prompt_length
        self.config = SimpleNamespace(
            mask_token_id=MASK,
            eos_token_id=EOS,
            vocab_size=vocab,
            max_sequence_length=256,
            n_layers=1,
            n_kv_heads=1,
            head_dim=2,
        )
        self.lm_head_weight = torch.zeros(vocab, 2, dtype=torch.float64)
        self.embed_weight = torch.zeros(vocab, 2, dtype=torch.float64)

    def forward(self, ids, positions, key_mask=None, logit_columns=None, **kwargs):
        answer = positions - self.prompt_length
        logits = torch.zeros(*ids.shape, self.config.vocab_size, dtype=torch.float64)
        logits[..., 5] += 20.0 * (answer == 0)
        logits[..., EOS] += 20.0 * (answer == 1)
        logits[..., 7] += 0.1 * answer * (answer > 1)
        return logits if logit_columns is None else logits[:, logit_columns]


@pytest.mark.parametrize("steps_per_check", [1, 3])
def test_early_stop_ends_the_block_once_the_answer_is_final(steps_per_check):
    """An EOS committed with everything before it committed: the answer cannot change, so the
    block ends there (the positions after the EOS become EOS) instead of decoding the rest."""
    prompt = [2, 3, 4]
    runs = {}
    for early_stop in (True, False):
        params = SamplingParams(
            gen_length=16,
            block_length=8,
            decoder="threshold",
            threshold=0.9,
            cache="none",
            early_stop=early_stop,
        ).validate()
        [seq] = denoise(
            ScriptedModel(len(prompt)), [prompt], params, [0], steps_per_check=steps_per_check
        )
        runs[early_stop] = seq
    stopped, decoded = runs[True], runs[False]
    assert stopped.answer(EOS) == decoded.answer(EOS) == [5]
    assert stopped.window == [5] + [EOS] * 15 and stopped.finish_reason == "eos"
    assert stopped.forwards == 1 and stopped.committed == 8
    # without it every position is decoded: 1 + 6 forwards for the first block, 8 for the second
    # (and with early stop before this change, the first block's 7)
    assert decoded.forwards == 15


def test_the_last_block_ends_once_its_answer_part_is_committed():
    """A block-causal model's window runs past the answer to its last block's end: once every
    answer position there is committed, the rest cannot change the answer and is not decoded."""
    prompt = [2, 3, 4]  # with block_length 8: the prompt's tail of 3 opens the window

    class BlockCausal(ScriptedModel):
        block_causal = True

        def forward(self, ids, positions, key_mask=None, logit_columns=None, **kwargs):
            logits = super().forward(ids, positions, key_mask, logit_columns, **kwargs)
            answer = positions if logit_columns is None else positions[:, logit_columns]
            answer = answer - self.prompt_length
            certain = (answer >= 0) & (answer < 8)  # the answer: token 5, no EOS
            logits[..., 5] += 20.0 * certain
            logits[..., EOS] -= 20.0 * certain
            return logits

    params = SamplingParams(
        gen_length=8, block_length=8, decoder="threshold", threshold=0.9, cache="none"
    ).validate()
    [seq] = denoise(BlockCausal(len(prompt)), [prompt], params, [0])
    assert seq.answer(EOS) == [5] * 8 and seq.finish_reason == "length"
    # block 0: the tail and answer 0-4 in one step; block 1: answer 5-7 in one step, where its
    # 5 positions past the answer used to take 5 more (one forced commit a step)
    assert seq.forwards == 2


def test_fixed_schedule_with_more_steps_than_positions_ends_when_none_is_left():
    """16 steps for each 8-token block: the schedule's last 8 commit nothing (LLaDA's sampler
    runs them anyway); a block ends when no mask is left, with the same tokens."""
    from workers.reference import reference_generate

    m = model()
    prompts = random_prompts(12, [5, 9], MASK, MASK)
    kw = dict(gen_length=16, block_length=8, steps=32)
    params = SamplingParams(decoder="fixed", cache="none", early_stop=False, **kw).validate()
    seqs = denoise(m, prompts, params, [0, 1])
    want, calls = reference_generate(m, prompts, mask_id=MASK, eos_id=EOS, seeds=[0, 1], **kw)
    assert [s.generated() for s in seqs] == want
    assert calls == 32 and [s.forwards for s in seqs] == [16, 16]
