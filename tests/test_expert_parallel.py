"""Expert parallel 2 (two gloo processes) against one process, in float64, under both dispatches:
the MoE block alone on random inputs (ragged token counts, a rank with no tokens, every pair
routed to one rank's experts), and whole generations through Engine with the all-to-all dispatch
for LLaDA-MoE and LLaDA2 (fixed and threshold decoders, the dual cache, which LLaDA2 runs as its
block-causal cache, a batch of ragged prompts).

One launch runs every case (starting processes costs more than the cases).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dinfer_async import SamplingParams
from dinfer_async.errors import InvalidRequestError
from dinfer_kernels.options import configured
from tests.ranks import report, run_ranks
from tests.test_tensor_parallel import COMMON
from tests.test_tensor_parallel import PARAMS as TP_PARAMS
from tests.tiny_models import IdTokenizer, random_prompts, tiny_family_model
from workers.engine import Engine
from workers.parallel.shard import EP_DISPATCHES, ep_dispatch

SIZE = 2


MODELS = {
    # a dense layer and a shared expert off the layer (tensor-parallel), besides the routed ones
    "lladamoe": lambda: tiny_family_model(
        "lladamoe", seed=4, moe_layer_freq=[0, 1], shared_expert_intermediate_size=10
    ),
    # the first layer dense, a shared expert inside the MoE block, block-causal attention
    "llada2_moe": lambda: tiny_family_model("llada2_moe", seed=3),
}
# three of the tensor-parallel test's decoding cases
PARAMS = {
    case: TP_PARAMS[case]
    for case in ("fixed-none-greedy", "fixed-dual-sampled", "threshold-dual-greedy")
}
# (model, params, dispatch, routed-experts path): the tiny models take the dense path by default
CASES = [(model, case, "all_to_all", "auto") for model in MODELS for case in PARAMS] + [
    (model, "threshold-dual-greedy", dispatch, "loop")
    for model in MODELS
    for dispatch in EP_DISPATCHES
]
MOE_PATHS = ("dense", "loop")  # the block alone: both torch paths of kernels.routed_experts


def run_case(engine: Engine, case: str) -> list[list[int]]:
    vocab, mask = engine.config.vocab_size, engine.config.mask_token_id
    prompts: list[list[int] | str] = list(random_prompts(11, [6, 1, 9], vocab, mask))
    params = [SamplingParams(**COMMON, **PARAMS[case], seed=s) for s in (1, 2, 3)]
    return [r.token_ids for r in engine.generate(prompts, params)]


def moe_block(family: str, towards: int | None) -> torch.nn.Module:
    """A float64 MoE block of `family`'s tiny model ("lladamoe5": 5 experts, an uneven split).
    towards=r: expert biases that send every (token, choice) pair to rank r's experts (the
    other rank receives none)."""
    if family.startswith("lladamoe"):
        extra = dict(num_experts=5) if family == "lladamoe5" else {}
        model = tiny_family_model("lladamoe", seed=5, moe_router_enable_expert_bias=True, **extra)
        block = model.blocks[0].mlp
    else:
        block = tiny_family_model(family, seed=5).blocks[1].mlp
    if towards is not None:
        E = len(block.experts)
        bias = block.expert_bias if family == "lladamoe" else block.gate.expert_bias
        half = E // SIZE  # rank r owns experts [r * half, (r + 1) * half)
        with torch.no_grad():
            bias.fill_(-10.0)
            bias[towards * half : (towards + 1) * half] = 0.0
    return block


SHAPES = {"2x5": (2, 5), "1x7": (1, 7), "1x1": (1, 1)}  # 10, 7 (ragged) and 1 token (a rank idle)
LAYER_CASES = [
    (family, shape, towards)
    for family in MODELS
    for shape in SHAPES
    for towards in (None, 0, 1)
    if towards is None or shape == "1x7"
] + [("lladamoe5", "1x7", None)]


def layer_key(family: str, shape: str, towards: int | None, dispatch: str, path: str) -> str:
    return f"{family}/{shape}/towards {towards}/{dispatch}/{path}"


def case_key(model: str, case: str, dispatch: str, path: str) -> str:
    return f"{model}/{case}/{dispatch}/{path}"


def layer_inputs(family: str, shape: str) -> torch.Tensor:
    d = 48 if family == "llada2_moe" else 32
    gen = torch.Generator().manual_seed(SHAPES[shape][1] + d)
    return torch.randn(*SHAPES[shape], d, generator=gen, dtype=torch.float64)


def _rank(rank: int, size: int, out: str) -> None:
    from workers.parallel.group import join
    from workers.parallel.shard import shard_moe

    tp = join(size)
    results: dict[str, object] = {}
    for family, shape, towards in LAYER_CASES:
        x = layer_inputs(family, shape)
        for dispatch in EP_DISPATCHES:
            block = shard_moe(moe_block(family, towards), tp, dispatch)
            for path in MOE_PATHS:
                with configured(moe=path):
                    y = block(x)
                results[layer_key(family, shape, towards, dispatch, path)] = y.tolist()
    for model, case, dispatch, path in CASES:
        engine = Engine(
            MODELS[model](), IdTokenizer(), tensor_parallel_size=size, expert_parallel=dispatch
        )
        with configured(moe=path):
            results[case_key(model, case, dispatch, path)] = run_case(engine, case)
        wrapped = [type(m).__name__ for m in engine.model.modules()]
        results[f"{model}/{dispatch}/blocks"] = wrapped.count(
            "ExpertParallelAllToAll" if dispatch == "all_to_all" else "ExpertParallel"
        )
    report(out, rank, results)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ep")
    return run_ranks(_rank, SIZE, out)


@pytest.mark.parametrize(
    ("family", "shape", "towards"), LAYER_CASES, ids=[f"{f}/{s}/{t}" for f, s, t in LAYER_CASES]
)
def test_moe_block_under_both_dispatches_equals_the_whole_block(parallel, family, shape, towards):
    block = moe_block(family, towards)
    x = layer_inputs(family, shape)
    with torch.no_grad():
        full = block(x)
    if towards is not None:  # the routing really is one-sided
        flat = x.reshape(-1, x.shape[-1])
        ids = block.route(flat)[1] if family == "lladamoe" else block.gate(flat)[0]
        half = len(block.experts) // SIZE
        assert bool(((ids // half) == towards).all())
    for dispatch, path, rank in itertools.product(EP_DISPATCHES, MOE_PATHS, range(SIZE)):
        key = layer_key(family, shape, towards, dispatch, path)
        got = torch.tensor(parallel[rank][key], dtype=torch.float64)  # json keeps float64
        assert got.shape == full.shape
        assert torch.allclose(got, full, rtol=1e-12, atol=1e-12), (dispatch, path, rank)


@pytest.mark.parametrize(
    ("model", "case", "dispatch", "path"), CASES, ids=["/".join(c) for c in CASES]
)
def test_expert_parallel_tokens_equal_one_process(parallel, model, case, dispatch, path):
    single = run_case(Engine(MODELS[model](), IdTokenizer()), case)
    assert any(single), "the case must generate something to compare"
    for rank in range(SIZE):
        assert parallel[rank][case_key(model, case, dispatch, path)] == single, f"rank {rank}"


def test_engine_dispatches_every_moe_block(parallel):
    for rank, dispatch in itertools.product(range(SIZE), EP_DISPATCHES):
        assert parallel[rank][f"lladamoe/{dispatch}/blocks"] == 1  # its other layer is dense
        assert parallel[rank][f"llada2_moe/{dispatch}/blocks"] == 2  # 3 layers, the first dense


def test_dispatch_names():
    assert ep_dispatch(False) is None and ep_dispatch(None) is None
    assert ep_dispatch(True) == EP_DISPATCHES[0] == "all_reduce"
    assert ep_dispatch("all_to_all") == "all_to_all"
    with pytest.raises(ValueError, match="expert_parallel='scatter'"):
        ep_dispatch("scatter")
    with pytest.raises(InvalidRequestError, match="expert_parallel"):
        Engine(
            MODELS["lladamoe"](), IdTokenizer(), tensor_parallel_size=2, expert_parallel="scatter"
        )
