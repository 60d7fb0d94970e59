"""The reference sampler's published properties (it is the oracle for every fast path)."""

import pytest
import torch

from tests.tiny_models import Recorder, random_prompts, tiny_model
from workers.reference import reference_generate, transfer_counts

MASK, EOS = 39, 1


def test_transfer_counts_split_as_evenly_as_possible():
    assert transfer_counts(8, 3) == [3, 3, 2]
    assert transfer_counts(32, 32) == [1] * 32
    assert transfer_counts(5, 7) == [1, 1, 1, 1, 1, 0, 0]
    assert sum(transfer_counts(17, 4)) == 17


@pytest.mark.parametrize("steps,gen,block", [(16, 16, 8), (10, 16, 8), (6, 24, 8), (4, 12, 12)])
def test_forwards_commits_and_frozen_tokens(steps, gen, block):
    """Exactly `steps` forwards; each step of a block commits its scheduled count, only inside the
    current block; committed tokens and the prompt never change."""
    model = Recorder(tiny_model(1))
    prompts = random_prompts(1, [5, 9, 3], 40, MASK)
    out, forwards = reference_generate(
        model, prompts, mask_id=MASK, eos_id=EOS, gen_length=gen, block_length=block, steps=steps
    )
    assert forwards == steps == len(model.inputs)
    P = max(map(len, prompts))
    final = torch.tensor([[MASK] * (P - len(p)) + p + o for p, o in zip(prompts, out)])
    states = model.inputs + [final]
    per_block = steps // (gen // block)
    for t in range(steps):
        before, after = states[t], states[t + 1]
        for i, p in enumerate(prompts):
            assert before[i, P - len(p) : P].tolist() == p
        changed = before != after
        assert not (changed & (before != MASK)).any(), "a committed token changed"
        block_index, step = divmod(t, per_block)
        lo, hi = P + block_index * block, P + (block_index + 1) * block
        assert not changed[:, :lo].any() and not changed[:, hi:].any(), (
            "committed outside the block"
        )
        expected = transfer_counts(block, per_block)[step]
        assert changed.sum(-1).tolist() == [expected] * len(prompts)
    assert all(MASK not in o for o in out)


@pytest.mark.parametrize(
    "temperature,remasking",
    [(0.0, "low_confidence"), (0.8, "low_confidence"), (0.0, "random"), (1.3, "random")],
)
def test_batch_equals_each_alone(temperature, remasking):
    model = tiny_model(2)
    prompts = random_prompts(2, [7, 2, 11, 4], 40, MASK)
    seeds = [11, 12, 13, 14]
    kw = dict(
        mask_id=MASK,
        eos_id=EOS,
        gen_length=16,
        block_length=8,
        steps=8,
        temperature=temperature,
        remasking=remasking,
    )
    together, _ = reference_generate(model, prompts, seeds=seeds, **kw)
    alone = [reference_generate(model, [p], seeds=[s], **kw)[0][0] for p, s in zip(prompts, seeds)]
    assert together == alone
    if temperature > 0 or remasking == "random":  # the seed matters
        other, _ = reference_generate(model, prompts, seeds=[s + 100 for s in seeds], **kw)
        assert other != together


def test_greedy_first_step_commits_the_most_confident_prediction():
    """Checked by hand against the model's own logits: the first commit is the argmax at the
    block position whose top probability is highest."""
    model = tiny_model(3)
    prompt = random_prompts(3, [6], 40, MASK)[0]
    ids = torch.tensor([prompt + [MASK] * 8])
    pos = torch.arange(ids.shape[1])[None]
    logits = model(ids, pos, None)[0, 6:].double()
    logits[:, MASK] = -torch.inf
    probs = logits.softmax(-1)
    best = int(probs.max(-1).values.argmax())
    rec = Recorder(model)
    reference_generate(
        rec, [prompt], mask_id=MASK, eos_id=EOS, gen_length=8, block_length=8, steps=8
    )
    after_first = rec.inputs[1][0, 6:]
    assert (after_first != MASK).sum() == 1
    assert int(after_first[best]) == int(probs[best].argmax())


def test_cfg_runs_an_unconditional_copy_with_the_prompt_masked():
    rec = Recorder(tiny_model(4))
    prompts = random_prompts(4, [5, 3], 40, MASK)
    out_cfg, forwards = reference_generate(
        rec, prompts, mask_id=MASK, eos_id=EOS, gen_length=8, block_length=8, steps=4, cfg_scale=1.5
    )
    first = rec.inputs[0]
    assert first.shape[0] == 4 and forwards == 4
    assert (first[2:, :5] == MASK).all() and (first[:2, 5:] == MASK).all()
    plain, _ = reference_generate(
        tiny_model(4), prompts, mask_id=MASK, eos_id=EOS, gen_length=8, block_length=8, steps=4
    )
    assert plain != out_cfg


def test_suppress_eos_never_emits_eos():
    model = tiny_model(5, vocab_size=6, embedding_size=8, mask_token_id=5)
    prompts = random_prompts(5, [3, 4], 5, 5)
    kw = dict(mask_id=5, eos_id=EOS, gen_length=16, block_length=8, steps=16)
    plain, _ = reference_generate(model, prompts, **kw)
    assert any(EOS in o for o in plain), "the test needs a model that emits EOS"
    suppressed, _ = reference_generate(model, prompts, suppress_eos=True, **kw)
    assert all(EOS not in o and 5 not in o for o in suppressed)
