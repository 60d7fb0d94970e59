"""Tensor parallel 2 (two gloo processes on this machine) against one process, in float64: the
same tokens through Engine for every family, decoder, cache policy and temperature listed here.

One launch runs every case (starting processes costs more than the cases); each test then
compares one case's answers, from both ranks, with a single process's.
"""

from __future__ import annotations

import pytest
import torch

from dinfer_async import SamplingParams
from dinfer_async.errors import InvalidRequestError
from tests.ranks import report, run_ranks
from tests.tiny_models import IdTokenizer, random_prompts, tiny_family_model, tiny_model
from workers.engine import Engine
from workers.parallel.group import TensorParallel
from workers.parallel.layers import AbsentExpert
from workers.parallel.shard import head_split
from workers.parallel.spmd import Leader, follow
from workers.scheduler import Scheduler

SIZE = 2


MODELS = {
    "llada": lambda: tiny_family_model("llada", seed=3),
    # one key/value head for two ranks (replicated), a tied embedding padded past the vocabulary
    "llada_kv1_tied": lambda: tiny_model(
        5, n_kv_heads=1, vocab_size=13, embedding_size=16, mask_token_id=12, weight_tying=True
    ),
    "llada2_moe": lambda: tiny_family_model("llada2_moe", seed=3),
    "Dream": lambda: tiny_family_model("Dream", seed=3),
    "lladamoe": lambda: tiny_family_model("lladamoe", seed=3),
    # a dense layer, and a shared expert off the layer, besides the routed ones
    "lladamoe_ep": lambda: tiny_family_model(
        "lladamoe", seed=4, moe_layer_freq=[0, 1], shared_expert_intermediate_size=10
    ),
    "llada2_moe_ep": lambda: tiny_family_model("llada2_moe", seed=3),
}
EXPERT_PARALLEL = ("lladamoe_ep", "llada2_moe_ep")

COMMON = dict(gen_length=16, early_stop=False)
PARAMS = {
    "fixed-none-greedy": dict(decoder="fixed", cache="none", block_length=8, steps=8),
    "fixed-dual-sampled": dict(
        decoder="fixed", cache="dual", block_length=4, steps=16, temperature=0.8
    ),
    "threshold-dual-greedy": dict(decoder="threshold", threshold=0.7, cache="dual", block_length=8),
    "threshold-vicinity-sampled": dict(
        decoder="threshold", threshold=0.6, cache="vicinity", block_length=8, temperature=0.9
    ),
    "fixed-vicinity-cfg": dict(
        decoder="fixed", cache="vicinity", block_length=8, steps=8, cfg_scale=0.5
    ),
    "credit-dual-sampled": dict(
        decoder="credit", threshold=0.8, cache="dual", block_length=8, temperature=0.7
    ),
    "hierarchical-prefix-soft": dict(
        decoder="hierarchical", cache="prefix", block_length=8, soft_diffusion=True
    ),
}
LIGHT = ("fixed-none-greedy", "threshold-vicinity-sampled")  # enough for the variant model
# fixed and threshold decoders x dual (LLaDA2: its block-causal cache) and vicinity caches
FOUR = ("fixed-dual-sampled", "threshold-dual-greedy", "threshold-vicinity-sampled")
FOUR += ("fixed-vicinity-cfg",)
CASES = [
    (model, case)
    for model in MODELS
    for case in (PARAMS if model == "llada" else LIGHT if model == "llada_kv1_tied" else FOUR)
]


def run_case(engine: Engine, model: str, case: str) -> list[list[int]]:
    vocab, mask = engine.config.vocab_size, engine.config.mask_token_id
    prompts: list[list[int] | str] = list(random_prompts(11, [6, 1, 9], vocab, mask))
    params = [SamplingParams(**COMMON, **PARAMS[case], seed=s) for s in (1, 2, 3)]
    return [r.token_ids for r in engine.generate(prompts, params)]


def confidence_case(tp: TensorParallel | None) -> dict[str, list]:
    """sampling.predict on random logits (the full ones, or this rank's shard of them)."""
    from workers.sampling import predict

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3
    logits[0, 0, 4] = logits[0, 0, 9] = 50.0  # a tie across the shards: the lower id wins
    if tp is not None:
        logits = logits[..., tp.vocab_start : tp.vocab_stop]
    seeds = torch.tensor([5, 6, 7])
    out: dict[str, list] = {}
    for name, temp in (("greedy", None), ("sampled", torch.tensor([0.0, 0.7, 1.5]))):
        token, prob = predict(logits, temp, seeds)
        out[name] = [token.tolist(), prob.tolist()]
    return out


def scripted(scheduler: Scheduler | Leader, vocab: int, mask: int) -> dict[str, list[int]]:
    """Requests arriving and one aborted between steps, as a worker sees them; the answers."""
    prompts = random_prompts(4, [5, 8, 3], vocab, mask)
    common = dict(gen_length=16, block_length=4, cache="dual", early_stop=False)
    params = SamplingParams(**common, temperature=0.5).validate()
    fixed = SamplingParams(**common, decoder="fixed", steps=8).validate()
    a = scheduler.add("a", prompts[0], params, seed=1)
    b = scheduler.add("b", prompts[1], fixed, seed=2)
    for _ in range(3):
        scheduler.step()
    c = scheduler.add("c", prompts[2], params, seed=3)
    scheduler.step()
    scheduler.abort(b)
    while scheduler.has_work():
        scheduler.step()
    return {s.id: s.generated() for s in (a, c)} | {"b": [int(b.finish_reason is None)]}


# the Engine's scheduling options together (a served worker's Engine.new_scheduler)
COMBINED = dict(steps_per_check=3, cuda_graphs="static", split_overhead=16, chunk_slots=64)


def combined(scheduler: Scheduler | Leader, vocab: int, mask: int) -> dict[str, list]:
    """`scripted` with ragged prompts (cohorts, row chunks), a stop string and an abort mid-check;
    the answers and finish reasons."""
    prompts = random_prompts(4, [5, 60, 3, 40], vocab, mask)
    common = dict(gen_length=16, block_length=4, cache="dual", early_stop=False)
    params = SamplingParams(**common, temperature=0.5).validate()
    fixed = SamplingParams(**common, decoder="fixed", steps=8).validate()
    stop = SamplingParams(**common, decoder="threshold", threshold=0.5, stop=["6 2 6"]).validate()
    seqs = [scheduler.add("a", prompts[0], params, 1), scheduler.add("b", prompts[1], fixed, 2)]
    seqs.append(scheduler.add("d", prompts[3], stop, 4))
    for _ in range(3):
        scheduler.step()
    seqs.append(scheduler.add("c", prompts[2], params, 3))
    scheduler.step()
    scheduler.abort(seqs[1])
    while scheduler.has_work():
        scheduler.step()
    # an aborted request's window is what it held when it left: not an answer
    return {s.id: [[] if s.aborted else s.generated(), s.finish_reason, s.stop_text] for s in seqs}


def _routed(module: torch.nn.Module) -> bool:
    """A routed expert, held (GatedMLP) or not (AbsentExpert)."""
    return isinstance(module, AbsentExpert) or type(module).__name__ == "GatedMLP"


def _rank(rank: int, size: int, out: str) -> None:
    from dataclasses import replace

    from workers.parallel.group import join, set_current
    from workers.parallel.layers import split

    results: dict[str, object] = {}
    for model, case in CASES:
        ep = model in EXPERT_PARALLEL
        engine = Engine(
            MODELS[model](), IdTokenizer(), tensor_parallel_size=size, expert_parallel=ep
        )
        results[f"{model}/{case}"] = run_case(engine, model, case)
        kept = [not isinstance(m, AbsentExpert) for m in engine.model.modules() if _routed(m)]
        results[f"{model}/experts kept"] = [sum(kept), len(kept)]
    engine = Engine(MODELS["llada"](), IdTokenizer(), tensor_parallel_size=size)
    scheduler = Scheduler(engine.model, report=True)
    assert engine.tensor_parallel is not None
    if rank == 0:
        leader = Leader(scheduler, engine.tensor_parallel)
        results["spmd"] = scripted(leader, engine.config.vocab_size, engine.config.mask_token_id)
        leader.stop()
    else:
        follow(scheduler, engine.tensor_parallel)
    engine = Engine(MODELS["llada"](), IdTokenizer(), tensor_parallel_size=size, **COMBINED)
    assert engine.tensor_parallel is not None
    if rank == 0:
        leader = Leader(engine.new_scheduler(), engine.tensor_parallel)
        cfg = engine.config
        results["combined"] = combined(leader, cfg.vocab_size, cfg.mask_token_id)
        leader.stop()
    else:
        follow(engine.new_scheduler(), engine.tensor_parallel)
    lo, hi = split(11, size, rank)
    tp = replace(join(size), vocab_start=lo, vocab_stop=hi)
    set_current(tp)
    results["confidence"] = confidence_case(tp)
    report(out, rank, results)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    return run_ranks(_rank, SIZE, out)


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}/{c}" for m, c in CASES])
def test_tensor_parallel_tokens_equal_one_process(parallel, model, case):
    single = run_case(Engine(MODELS[model](), IdTokenizer()), model, case)
    assert any(single), "the case must generate something to compare"
    for rank in range(SIZE):
        assert parallel[rank][f"{model}/{case}"] == single, f"rank {rank}"


def test_expert_parallel_keeps_a_share_of_the_experts(parallel):
    for model in EXPERT_PARALLEL:
        kept, total = parallel[0][f"{model}/experts kept"]
        assert 0 < kept < total, model  # the shared/dense MLPs are kept, half the routed ones
    kept, total = parallel[0]["lladamoe/experts kept"]
    assert kept == total  # without expert_parallel every rank keeps them all


def test_rank_zero_broadcasts_arrivals_and_aborts(parallel):
    engine = Engine(MODELS["llada"](), IdTokenizer())
    cfg = engine.config
    single = scripted(Scheduler(engine.model, report=True), cfg.vocab_size, cfg.mask_token_id)
    assert single["b"] == [1]  # b was aborted before its end
    assert parallel[0]["spmd"] == single


def test_served_scheduling_options_under_tensor_parallel(parallel):
    """Cohorts, row chunks, 3 steps per check and static steps, with arrivals, an abort and a
    stop string, replayed on rank 1: rank 0's answers equal one process's, and eager's."""
    cfg = Engine(MODELS["llada"](), IdTokenizer()).config
    want = combined(
        Engine(MODELS["llada"](), IdTokenizer(), split_overhead=0, chunk_slots=0).new_scheduler(),
        cfg.vocab_size,
        cfg.mask_token_id,
    )
    assert want["d"][1] == "stop" and want["b"][1] is None  # the stop string cut, b aborted
    assert parallel[0]["combined"] == want


def test_sharded_confidence_equals_full(parallel):
    full = confidence_case(None)
    for rank in range(SIZE):
        for name in ("greedy", "sampled"):
            tokens, probs = parallel[rank]["confidence"][name]
            assert tokens == full[name][0], (rank, name)
            assert torch.allclose(torch.tensor(probs), torch.tensor(full[name][1]), rtol=1e-12)
    assert full["greedy"][0][0][0] == 4  # the tie went to the lower id


def test_tensor_parallel_needs_a_group():
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 needs torch.distributed"):
        Engine(tiny_model(0), IdTokenizer(), tensor_parallel_size=2)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        Engine(tiny_model(0), IdTokenizer(), tensor_parallel_size=0)


def test_head_split_replicates_and_refuses():
    def split_for(rank: int, size: int, heads: int, kv: int):
        tp = TensorParallel(None, rank, size)  # type: ignore[arg-type]
        return head_split(heads, kv, tp)

    assert split_for(1, 2, 6, 2) == ([3, 4, 5], [1])
    assert split_for(3, 4, 8, 2) == ([6, 7], [1])  # 2 key/value heads over 4 ranks: replicated
    with pytest.raises(ValueError, match="does not divide the model's 6 attention heads"):
        split_for(0, 4, 6, 2)
    with pytest.raises(ValueError, match="one must divide"):
        split_for(0, 4, 12, 3)
