"""Routed experts without host syncs: the Triton grouped GEMM (under TRITON_INTERPRET=1) and the
dense torch path against the reference loop, the tile map, no host reads inside an MoE forward,
and whole-engine tokens on the tiny LLaDA-MoE and LLaDA2 models for every path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import contextlib

import pytest
import torch

import dinfer_kernels as kernels
from dinfer_kernels import moe, reference, triton_moe
from tests.tiny_models import random_prompts, tiny_family_model

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def routing(N, k, E, seed, dtype, unused=()):
    """Random h [N, d] (d = 40), k distinct experts per token (never those in `unused`), weights,
    and ExpertWeights of E experts with hidden size 24: sizes no block divides."""
    g = torch.Generator().manual_seed(seed)
    d, H = 40, 24
    scores = torch.rand(N, E, generator=g)
    scores[:, list(unused)] = -1
    ids = scores.topk(k, dim=-1).indices
    weights = torch.rand(N, k, generator=g, dtype=torch.float64).to(dtype)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    experts = moe.ExpertWeights(
        *(
            [
                (0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
                for _ in range(E)
            ]
            for shape in ((H, d), (H, d), (d, H))
        )
    )
    return h, ids, weights, experts


def test_expert_tiles_cover_every_pair_once_in_tiles_of_one_expert():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [3, 0]])
    order, tile_expert, start, end = moe.expert_tiles(ids, num_experts=5, block_m=2)
    flat = ids.reshape(-1)
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    seen = []
    for e, s, t in zip(tile_expert.tolist(), start.tolist(), end.tolist()):
        if e < 0:
            continue
        rows = list(range(s, min(s + 2, t)))
        assert rows and all(int(flat[order[r]]) == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(flat.numel()))  # expert 4 has no tile, the rest cover all
    assert len(tile_expert) == 5 + 5  # ceil(P / block_m) + min(E, P): the static bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("N,k,E", [(13, 3, 5), (2, 2, 7)])
def test_grouped_kernel_matches_the_loop(dtype, N, k, E):
    """The Triton grouped GEMM (interpreted) against the reference loop, an expert left unused;
    the per-pair outputs start as NaN, so a row the kernel fails to write fails."""
    h, ids, weights, experts = routing(N, k, E, seed=N * E, dtype=dtype, unused=(1,))
    expected = reference.routed_experts(
        h.double(), ids, weights.double(), _as(experts, torch.float64)
    )
    slots = torch.full((N * k, h.shape[1]), float("nan"), dtype=dtype)
    got = triton_moe.routed_experts(
        h, ids, weights, experts, block_n=32, block_k=32, slots_out=slots
    )
    assert got.dtype == weights.dtype and not slots.isnan().any()
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def _as(experts: moe.ExpertWeights, dtype) -> moe.ExpertWeights:
    return moe.ExpertWeights(
        *([w.to(dtype) for w in ws] for ws in (experts.gate, experts.up, experts.down))
    )


def test_dense_path_matches_the_loop_in_float64():
    h, ids, weights, experts = routing(17, 2, 6, seed=5, dtype=torch.float64, unused=(4,))
    expected = reference.routed_experts(h, ids, weights, experts)
    torch.testing.assert_close(
        moe.dense_experts(h, ids, weights, experts), expected, rtol=1e-13, atol=1e-13
    )


@contextlib.contextmanager
def no_host_reads():
    """Every Python-level way a tensor's values reach the host raises inside the block."""

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host read inside the MoE forward: Tensor.{name}")

        return fail

    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_patch_catches_what_the_loop_does():
    h, ids, weights, experts = routing(9, 2, 4, seed=1, dtype=torch.float64)
    with pytest.raises(AssertionError, match="Tensor.tolist"), no_host_reads():
        reference.routed_experts(h, ids, weights, experts)


@pytest.mark.parametrize("family", ["lladamoe", "llada2_moe"])
def test_an_moe_forward_reads_nothing_on_the_host(family):
    """The whole forward of a tiny MoE model (auto: the dense path on a CPU for sizes this small)
    and the torch side of the grouped path (the tile map and the combine) read no tensor value on
    the host; the reference loop would (test above). The grouped kernels' launches read none either
    on CUDA (the interpreter, which runs them here, does)."""
    model = tiny_family_model(family, seed=2)
    ids = torch.randint(0, 14, (3, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(3, 9)
    expected = model(ids, positions)  # builds the experts' weights table outside the check
    with no_host_reads():
        assert kernels.moe_path(ids.double()[0, :, None], ids[0, :, None], _experts(model)) == (
            "dense"
        )
        got = model(ids, positions)
        routing_ids = torch.randint(0, 6, (9, 2))
        order, *_ = moe.expert_tiles(routing_ids, 6, 16)
        moe.combine(torch.ones(9, 2, 4), torch.ones(9, 2))
    assert torch.equal(got, expected)
    with kernels.configured(moe="loop"):  # the loop's matmuls see other row counts: last bits
        torch.testing.assert_close(model(ids, positions), expected, rtol=1e-12, atol=1e-12)


def _experts(model) -> moe.ExpertWeights:
    layer = model.model.layers[-1].mlp
    return layer.experts.expert_weights()


def decode(model, prompts, seeds):
    from dinfer_async import SamplingParams
    from workers.scheduler import denoise

    common = dict(gen_length=8, block_length=4, early_stop=False)
    params = [
        SamplingParams(decoder="threshold", threshold=0.6, cache="dual", **common).validate(),
        SamplingParams(decoder="fixed", steps=8, temperature=0.8, **common).validate(),
        SamplingParams(decoder="threshold", threshold=0.9, cache="none", **common).validate(),
    ]
    return [(s.window, s.forwards) for s in denoise(model, prompts, params, seeds)]


@pytest.mark.parametrize("family", ["lladamoe", "llada2_moe"])
def test_engine_tokens_identical_on_every_moe_path(family):
    """float64, batch of 3 ragged prompts with three sampling setups: the dense path and the
    Triton grouped GEMM (interpreted, float64) decode the same tokens in the same forwards as the
    reference loop."""
    model = tiny_family_model(family, seed=4)
    cfg = model.config
    prompts = random_prompts(7, [6, 2, 9], cfg.vocab_size, cfg.mask_token_id)
    seeds = [3, 4, 5]
    with kernels.configured(moe="loop"):
        expected = decode(model, prompts, seeds)
    with kernels.configured(moe="dense"):
        assert decode(model, prompts, seeds) == expected
    calls = []
    grouped = kernels._triton()["routed_experts"]

    def counted(*args, **kwargs):
        calls.append(1)
        return grouped(*args, **kwargs)

    with (
        kernels.configured(moe="grouped"),
        kernels.triton_everywhere(),
        _only_moe_on_triton(counted),
    ):
        assert decode(model, prompts, seeds) == expected
    assert calls


@contextlib.contextmanager
def _only_moe_on_triton(routed):
    """Under triton_everywhere, keep every kernel but the routed experts on torch (the other
    kernels have their own engine test in tests/test_kernels.py; the interpreter is slow)."""
    saved = kernels._TRITON
    kernels._TRITON = {"routed_experts": routed}
    try:
        yield
    finally:
        kernels._TRITON = saved


def test_options_reject_unknown_values():
    with pytest.raises(ValueError, match="moe='fast'"), kernels.configured(moe="fast"):
        pass
    with pytest.raises(ValueError, match="unknown kernel options"), kernels.configured(x=1):
        pass


def test_expert_weights_name_the_bad_weight():
    gate = [torch.zeros(4, 8), torch.zeros(4, 8)]
    down = [torch.zeros(8, 4), torch.zeros(8, 5)]
    with pytest.raises(ValueError, match=r"down\[1\] is \(8, 5\).*needs \(8, 4\)"):
        moe.ExpertWeights(gate, gate, down)
    with pytest.raises(ValueError, match="one weight per expert"):
        moe.ExpertWeights(gate, gate[:1], down)
