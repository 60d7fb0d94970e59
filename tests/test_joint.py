"""The "joint" decoder (LLaDA2.1 token editing) against its plain single-request reference
(workers/reference.py: reference_joint), in float64: batched, ragged, with both cache policies a
block-causal model has, mixed with other decoders in one forward; and the stream it produces
(revised offsets, confidence, stable text only from finished blocks)."""

import pytest
import torch

from dinfer_async import SamplingParams
from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import JOINT_PRESETS
from tests.tiny_models import Recorder, random_prompts, tiny_family_model, tiny_model
from workers.bundled import MODEL_DIR
from workers.engine import Engine
from workers.reference import reference_joint
from workers.scheduler import Scheduler, denoise
from workers.tokenizer import load_tokenizer
from workers.worker import Live, Worker

PROMPT_LENGTHS = [6, 1, 9, 8, 13]  # with block_length 4 or 8: prompt tails of every size
CASES = {
    "speedy-like": dict(threshold=0.5, edit_threshold=0.0, max_edit_steps=4),
    "sampled": dict(threshold=0.3, edit_threshold=0.2, max_edit_steps=2, temperature=0.8),
}


def llada2():
    model = tiny_family_model("llada2_moe", seed=3)
    return model, model.config.mask_token_id, model.config.eos_token_id


def reference(model, mask, eos, prompts, seeds, **kw):
    return [
        reference_joint(model, p, mask_id=mask, eos_id=eos, seed=s, **kw)
        for p, s in zip(prompts, seeds)
    ]


def engine_run(model, prompts, seeds, **kw):
    params = SamplingParams(decoder="joint", **kw).validate()
    return denoise(model, prompts, params, seeds)


@pytest.mark.parametrize("cache", ["none", "dual"])  # dual: the block-causal cache
@pytest.mark.parametrize("case", sorted(CASES))
def test_llada2_joint_equals_reference(cache, case):
    model, mask, eos = llada2()
    prompts = random_prompts(12, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    seeds = [3, 1, 4, 1, 5]
    kw = dict(gen_length=16, block_length=4, early_stop=case == "sampled", **CASES[case])
    seqs = engine_run(model, prompts, seeds, cache=cache, **kw)
    want = reference(model, mask, eos, prompts, seeds, **kw)
    assert [s.generated() for s in seqs] == [w[0] for w in want]
    assert [(s.forwards, s.edits) for s in seqs] == [(w[1], w[2]) for w in want]
    assert sum(s.edits for s in seqs) > 0, "the case should make the decoder edit"


def test_joint_and_other_decoders_share_forwards():
    """Rows with threshold, joint and fixed in one batch: each row decodes what it decodes alone,
    and the batch runs as one forward per step (rows of every decoder in each)."""
    model, mask, eos = llada2()
    prompts = random_prompts(13, [5, 9, 3, 7], model.config.vocab_size - 1, mask)
    common = dict(gen_length=8, block_length=4, cache="dual", early_stop=False)
    params = [
        SamplingParams(decoder="threshold", threshold=0.5, **common),
        SamplingParams(decoder="joint", threshold=0.5, edit_threshold=0.0, **common),
        SamplingParams(decoder="fixed", steps=8, **common),
        SamplingParams(decoder="joint", threshold=0.4, edit_threshold=0.1, **common),
    ]
    params = [p.validate() for p in params]
    recorder = Recorder(model)
    together = denoise(recorder, prompts, params, [0, 1, 2, 3])
    assert max(ids.shape[0] for ids in recorder.inputs) == 4
    alone = [denoise(model, [q], [p], [s])[0] for q, p, s in zip(prompts, params, range(4))]
    assert [s.generated() for s in together] == [s.generated() for s in alone]
    for i in (1, 3):
        kw = {k: getattr(params[i], k) for k in ("threshold", "edit_threshold", "max_edit_steps")}
        want = reference_joint(
            model, prompts[i], mask_id=mask, eos_id=eos, seed=i, gen_length=8, block_length=4, **kw
        )
        assert (together[i].generated(), together[i].forwards, together[i].edits) == want
    assert together[1].edits + together[3].edits > 0


@pytest.mark.parametrize("traits", [{}, {"logit_shift": 1}], ids=["llada", "shifted"])
def test_joint_on_bidirectional_families_equals_reference(traits):
    """An option on any family: a LLaDA-format model (and a shifted one, as Dream) without cache."""
    model = tiny_model(7, vocab_size=12, embedding_size=16, mask_token_id=11)
    model.__class__ = type("As", (type(model),), traits)
    prompts = random_prompts(3, [6, 1, 9], 11, 11)
    kw = dict(gen_length=16, block_length=8, threshold=0.4, edit_threshold=0.1, max_edit_steps=3)
    seqs = engine_run(model, prompts, [0, 1, 2], cache="none", early_stop=False, **kw)
    want = reference(model, 11, 1, prompts, [0, 1, 2], **kw)
    assert [(s.generated(), s.forwards, s.edits) for s in seqs] == want
    assert sum(s.edits for s in seqs) > 0


def test_without_edits_joint_is_threshold():
    """edit_threshold 1 (no probability passes it) and no edit rounds: the threshold decoder's
    tokens and forwards exactly, so the extra machinery changes nothing else."""
    model, mask, _ = llada2()
    prompts = random_prompts(14, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    kw = dict(gen_length=16, block_length=4, threshold=0.5, cache="dual")
    joint = engine_run(model, prompts, [0] * 5, edit_threshold=1.0, max_edit_steps=0, **kw)
    plain = denoise(model, prompts, SamplingParams(decoder="threshold", **kw).validate(), [0] * 5)
    assert [(s.generated(), s.forwards, s.edits) for s in joint] == [
        (s.generated(), s.forwards, 0) for s in plain
    ]


def test_edit_rounds_are_bounded():
    """With editing on every top-token change, a block never needs more than its masks' steps
    plus max_edit_steps forwards."""
    model, mask, _ = llada2()
    prompts = random_prompts(15, PROMPT_LENGTHS, model.config.vocab_size - 1, mask)
    for rounds in (0, 1, 3):
        seqs = engine_run(
            model,
            prompts,
            [0] * 5,
            gen_length=16,
            block_length=4,
            threshold=0.99,
            edit_threshold=0.0,
            max_edit_steps=rounds,
            early_stop=False,
            cache="none",
        )
        for s in seqs:
            assert s.forwards <= s.num_blocks * (4 + rounds)


def test_stream_revises_and_stable_text_covers_finished_blocks():
    """Chunks name the offsets an edit changed (and they did change); confidence follows the
    block's tokens; stable text comes only with final blocks and adds up to the answer."""
    model, mask, eos = llada2()
    engine = Engine(model, tokenizer=load_tokenizer(MODEL_DIR))
    worker = Worker.__new__(Worker)  # the chunk building only: no socket
    worker.engine, worker.mask_id, worker.eos_id = engine, mask, eos
    params = SamplingParams(
        decoder="joint", gen_length=16, block_length=4, threshold=0.5, edit_threshold=0.0
    ).validate()
    prompts = random_prompts(16, [5, 8], model.config.vocab_size - 1, mask)
    scheduler = Scheduler(model, report=True)
    lives = [Live(b"c", scheduler.add(i, p, params, 0)) for i, p in enumerate(prompts)]
    last: dict[tuple[int, int], list[int]] = {}
    revisions = 0
    with torch.no_grad():
        while scheduler.has_work():
            for u in scheduler.step():
                if not hasattr(u, "block_tokens"):
                    continue
                chunk = worker.chunk(lives[u.seq.id], u)
                before = last.get((u.seq.id, u.block), [mask] * len(u.block_tokens))
                for j in chunk.revised:
                    assert before[j] not in (mask, chunk.tokens[j])
                assert all(before[j] == mask for j in chunk.committed)
                revisions += len(chunk.revised)
                assert chunk.confidence is not None and len(chunk.confidence) == len(chunk.tokens)
                for token, p in zip(chunk.tokens, chunk.confidence):
                    assert (p == 0) if token == mask else (0 < p <= 1)
                if chunk.stable_text:
                    assert chunk.final
                last[(u.seq.id, u.block)] = chunk.tokens
    assert revisions > 0
    for live in lives:
        assert live.emitted == engine.decode(live.seq.answer(eos))
        assert live.seq.stats(eos)["edits"] > 0


def test_params_presets_and_validation():
    speedy, quality = SamplingParams.preset("speedy"), SamplingParams.preset("quality", seed=3)
    assert (speedy.decoder, speedy.threshold, speedy.edit_threshold) == ("joint", 0.5, 0.0)
    assert (quality.threshold, quality.edit_threshold, quality.seed) == (0.7, 0.5, 3)
    assert speedy.max_edit_steps == quality.max_edit_steps == 16 and speedy.revises
    assert set(JOINT_PRESETS) == {"speedy", "quality"} and not SamplingParams().revises
    for bad in (dict(edit_threshold=-0.1), dict(edit_threshold=1.5), dict(edit_threshold="x")):
        with pytest.raises(InvalidRequestError, match="edit_threshold"):
            SamplingParams(decoder="joint", **bad).validate()
    with pytest.raises(InvalidRequestError, match="max_edit_steps"):
        SamplingParams(decoder="joint", max_edit_steps=-1).validate()
    with pytest.raises(InvalidRequestError, match="preset"):
        SamplingParams.preset("fast")


def test_bundled_model_joint_equals_reference():
    """The LLaDA-format bundled model (float64, no cache) with the quality preset: the engine's
    batch equals the reference one prompt at a time, edits included."""
    from workers.bundled import tasks

    engine = Engine.from_pretrained(None, dtype="float64")
    cfg = engine.config
    prompts = [engine.encode(messages=ex.messages) for ex in tasks.held_out(1)[:2]]
    params = SamplingParams.preset("quality", gen_length=32, cache="none", early_stop=False)
    seqs = denoise(engine.model, prompts, params.validate(), [0, 0])
    kw = dict(gen_length=32, block_length=32, threshold=0.7, edit_threshold=0.5)
    want = reference(engine.model, cfg.mask_token_id, cfg.eos_token_id, prompts, [0, 0], **kw)
    assert [(s.generated(), s.forwards, s.edits) for s in seqs] == want
