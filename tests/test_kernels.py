"""Each Triton kernel against its torch reference, run by Triton's interpreter on CPU.

Fresh random inputs of ragged sizes, fp32 and fp16; every output is passed in filled with NaN
(or an impossible value), so an element a kernel fails to write fails the comparison."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

import dinfer_kernels as kernels
from dinfer_kernels import reference
from dinfer_kernels import triton_ops as tk

pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # the interpreter evaluates both sides of tl.where


def nan_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 48), (7, 100), (3, 257)])
def test_rms_norm(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    r = torch.randn(rows, cols, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(cols, generator=g)).to(dtype)
    torch.testing.assert_close(
        tk.rms_norm(x, w, 1e-5, out=nan_like(x)),
        reference.rms_norm(x, w, 1e-5),
        rtol=2e-3,
        atol=2e-3,
    )
    normed, total = tk.rms_norm(x, w, 1e-5, residual=r, out=nan_like(x))
    torch.testing.assert_close(total, x + r, rtol=0, atol=0)
    torch.testing.assert_close(normed, reference.rms_norm(x + r, w, 1e-5), rtol=2e-3, atol=2e-3)
    ref_normed, ref_total = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(ref_total, total)
    torch.testing.assert_close(normed, ref_normed, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(5, 3, 999, generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(
        tk.swiglu(gate, up, out=nan_like(up)), reference.swiglu(gate, up), rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope(dtype):
    from workers.models.llada import Rotary

    g = torch.Generator().manual_seed(2)
    B, H, L, D = 2, 3, 5, 16
    x = torch.randn(B, H, L, D, generator=g).to(dtype)
    positions = torch.randint(0, 300, (B, L), generator=g)
    cos, sin = Rotary(D, 10000.0)(positions, dtype)
    torch.testing.assert_close(
        tk.rope(x, cos, sin, out=nan_like(x)), reference.rope(x, cos, sin), rtol=2e-3, atol=2e-3
    )


def confidence_logits(rows, vocab, dtype, seed, ties):
    """Random logits with a forbidden half in row 1; with `ties`, integers in [-3, 3] so the max
    and the runner-up repeat across chunks and splits (the lowest token must win)."""
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    if ties:
        logits = logits.clamp(-3, 3).round()
    logits[1, : vocab // 2] = -torch.inf  # forbidden tokens
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "vocab,chunk,splits,ties",
    [
        (1000, 256, 1, True),
        (1000, 128, 3, True),
        (4097, 1024, 5, False),
        (4097, 1024, 5, True),
        (126_464, 8192, 4, False),
    ],
)
def test_confidence(dtype, vocab, chunk, splits, ties):
    """One program per row (splits 1) or the vocabulary split over programs and merged: the same
    token as torch's argmax (lowest among equals), runner-up and current-token probabilities on
    request, on vocabularies that are no multiple of the chunk; outputs start as NaN / -1."""
    rows = 3 if vocab > 100_000 else 6
    logits = confidence_logits(rows, vocab, dtype, vocab + splits, ties)
    token, prob = tk.confidence_full(logits, chunk=chunk, splits=splits)
    ref_token, ref_prob = reference.confidence(logits)
    assert torch.equal(token, ref_token)
    torch.testing.assert_close(prob.double(), ref_prob, rtol=1e-4, atol=1e-6)
    current = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))
    current[0] = ref_token[0]
    got = tk.confidence_full(logits, current=current, chunk=chunk, splits=splits)
    expected = reference.confidence_runner_up(logits, current)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    for g, e in zip(got[1::2] + got[4:], expected[1::2] + expected[4:]):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)
    t2, p2 = tk.confidence(logits)  # the dispatcher's signature: float64 probabilities
    assert torch.equal(t2, ref_token) and p2.dtype == torch.float64


def test_confidence_split_rule():
    """Few rows: enough splits for ~4 programs per SM; many rows: one program per row."""
    assert tk.confidence_splits(32, 126_464, 132, 2048) == 17
    assert tk.confidence_splits(264, 126_464, 132, 2048) == 1
    assert tk.confidence_splits(1, 3000, 132, 2048) == 1  # no split shorter than two chunks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("vocab,chunk,splits", [(1000, 256, 1), (1000, 256, 3), (126_464, 8192, 6)])
def test_confidence_sampling_matches_the_reference(dtype, vocab, chunk, splits):
    """Gumbel-max inside the kernel: the same token as the torch reference (which draws the same
    counter-based noise), per request temperature (0 = greedy) and seed, ragged K, whole rows or
    split vocabularies."""
    g = torch.Generator().manual_seed(vocab + 1)
    B, K = (2, 3) if vocab > 100_000 else (3, 5)
    logits = (2 * torch.randn(B, K, vocab, generator=g, dtype=torch.float64)).to(dtype)
    logits[1, 0, : vocab // 3] = -torch.inf  # forbidden tokens are never sampled
    temperature = torch.tensor([0.0, 0.7, 1.3][:B], dtype=torch.float64)
    seeds = torch.randint(0, 2**63 - 1, (B,), generator=g)
    token, prob = tk.confidence_full(logits, temperature, seeds, chunk=chunk, splits=splits)
    ref_token, ref_prob = reference.confidence(logits, temperature, seeds)
    assert torch.equal(token, ref_token)
    assert torch.equal(token[0], logits[0].double().argmax(-1))  # temperature 0 is greedy
    assert not torch.equal(token[1:], logits[1:].double().argmax(-1))  # and the others do sample
    assert int(token[1, 0]) >= vocab // 3
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(prob.double(), ref_prob, rtol=tol, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_noise_samples_the_softmax(temperature):
    """The counter-based noise really is Gumbel: over many seeds and positions, Gumbel-max picks
    each token with probability softmax(logits / temperature)."""
    logits = torch.tensor([[[1.0, 0.0, -1.0, 2.0, 0.5, -3.0]]], dtype=torch.float64)
    seeds, positions = torch.arange(2000) * 7919 + 12345, 20
    tokens = []
    for seed in seeds.split(500):
        t, _ = reference.confidence(
            logits.expand(len(seed), positions, 6), torch.full((len(seed),), temperature), seed
        )
        tokens.append(t.flatten())
    counts = torch.bincount(torch.cat(tokens), minlength=6).double()
    n = counts.sum()
    p = torch.softmax(logits[0, 0] / temperature, -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() < 5 * sigma).all(), (counts / n, p)


def test_noise_depends_on_seed_position_and_token_only():
    w = reference.uniform(torch.tensor([5, 5, 6, 2**40 + 5]), 4, torch.arange(8))
    assert torch.equal(w[0], w[1])  # a pure function of its counter
    assert (w[0] != w[2]).all() and (w[0] != w[3]).all()  # both halves of the seed matter
    assert len(torch.unique(w[0])) == 32 and ((w > 0) & (w < 1)).all()
    assert torch.equal(
        reference.uniform(torch.tensor([5]), 2, torch.tensor([7]))[0, 1, 0], w[0, 1, 7]
    )


def test_threshold_commit_matches_the_decoder_rule():
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(5, 37, generator=g, dtype=torch.float64)
    masked = torch.rand(5, 37, generator=g) < 0.6
    masked[4] = False
    tau = torch.tensor([[0.9], [0.5], [0.99], [0.1], [0.5]], dtype=torch.float64)
    expected = reference.threshold_commit(conf, masked, tau)
    assert expected[2].sum() == 1 and not expected[4].any()  # the rule's two edges are exercised
    commit = tk.threshold_commit(conf, masked, tau)  # starts as 7 everywhere
    assert torch.equal(commit, expected.to(torch.int8))


def commit_inputs(B, K, seed):
    """float64 confidences [B, K] (every other column quantised to quarters, so ties are common
    and the leftmost rule decides), masked positions in ragged runs, per-row f, tau < 1, low < tau
    in quarters (conf == low happens). With B > 1, row 1 has nothing masked (commits nothing) and
    row 2 low confidences where no n passes the factor rule (the best commits alone)."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(B, K, generator=g, dtype=torch.float64)
    conf[:, ::2] = (conf[:, ::2] * 4).round() / 4
    masked = torch.rand(B, K, generator=g) < 0.7
    f = 0.5 + 2.5 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    tau = 0.5 + 0.5 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    low = (tau * torch.rand(B, 1, generator=g, dtype=torch.float64) * 4).floor() / 4
    if B > 1:
        masked[1] = False
        conf[2] *= 0.5
        f[2] = 0.9  # c <= 0.5: (n + 1)(1 - c_n) >= 1 > f for every n
    return conf, masked, f, tau, low


COMMIT_RULES = {  # name -> (kernel, reference, dispatcher, per-row parameters from commit_inputs)
    "factor": (
        tk.factor_commit,
        reference.factor_commit,
        kernels.factor_commit,
        lambda f, tau, low: (f,),
    ),
    "hierarchical": (
        tk.hierarchical_commit,
        reference.hierarchical_commit,
        kernels.hierarchical_commit,
        lambda f, tau, low: (tau, low),
    ),
}


@pytest.mark.parametrize("rule", sorted(COMMIT_RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [7, 32, 33])
@pytest.mark.parametrize("B", [1, 3])
def test_commit_rules(rule, dtype, B, K):
    kernel, ref, dispatch, params = COMMIT_RULES[rule]
    conf, masked, f, tau, low = commit_inputs(B, K, seed=B * 100 + K)
    params = params(f, tau, low)
    c = conf.to(dtype)
    expected = ref(c, masked, *params)
    assert torch.equal(
        kernel(c, masked, *params), expected.to(torch.int8)
    )  # the kernel's output starts as 7
    assert not kernel(
        c, torch.zeros_like(masked), *params
    ).any()  # nothing masked: nothing committed
    if (
        dtype == torch.float32
    ):  # once per shape, the engine's float64: the dispatcher (the reference on CPU), the kernel
        commit = dispatch(conf, masked, *params)
        assert commit.dtype == torch.bool and torch.equal(commit, ref(conf, masked, *params))
        assert torch.equal(kernel(conf, masked, *params), commit.to(torch.int8))


def test_commit_rules_break_ties_leftmost():
    """Hand-worked rows. Factor, sorted 0.95 (at 1), 0.95 (at 2), 0.9, 0.2: (n + 1)(1 - c_n) =
    0.1, 0.15, 0.4, 4, so f = 0.12 commits position 1 alone and f = 0.3 both 0.95s. Hierarchical,
    runs [0, 1] and [3, 5]: the first run picks 0 (leftmost 0.3), the second 4 (leftmost 0.4), and
    the threshold rule (tau_eff = best = 0.4) adds 5."""
    conf = torch.tensor(
        [[0.9, 0.95, 0.95, 0.2, 0.0, 0.0], [0.3, 0.3, 0.9, 0.2, 0.4, 0.4]], dtype=torch.float64
    )
    masked = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    for f, committed in ((0.12, [1]), (0.3, [1, 2])):
        expected = torch.zeros(6, dtype=torch.int8)
        expected[committed] = 1
        f = torch.full((2, 1), f, dtype=torch.float64)
        for fn in (tk.factor_commit, reference.factor_commit):
            assert torch.equal(fn(conf, masked, f)[0].to(torch.int8), expected)
    tau, low = (
        torch.full((2, 1), 0.9, dtype=torch.float64),
        torch.full((2, 1), 0.25, dtype=torch.float64),
    )
    for fn in (tk.hierarchical_commit, reference.hierarchical_commit):
        assert torch.equal(
            fn(conf, masked, tau, low)[1].to(torch.int8),
            torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.int8),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,H,KV,Lq,Lk,D", [(2, 4, 2, 9, 70, 32), (1, 3, 3, 32, 32, 16), (3, 6, 1, 5, 130, 64)]
)
def test_attention_over_a_cache_view(dtype, B, H, KV, Lq, Lk, D):
    """Queries of a block over keys that are a slice of a larger preallocated cache, with
    per-request padding masks (one row's first keys hidden) and grouped KV heads."""
    g = torch.Generator().manual_seed(B * 100 + Lk)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    cache_k = torch.randn(B + 1, KV, Lk + 17, D, generator=g).to(dtype)
    cache_v = torch.randn(B + 1, KV, Lk + 17, D, generator=g).to(dtype)
    k, v = cache_k[:B, :, :Lk], cache_v[:B, :, :Lk]
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[0, : Lk // 3] = False
    out = tk.attention(q, k, v, mask, out=nan_like(q))
    expected = reference.attention(q.float(), k.float(), v.float(), mask).to(dtype)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(
        tk.attention(q, k, v, None),
        reference.attention(q.float(), k.float(), v.float(), None).to(dtype),
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_and_cached_attention_read_projection_views_in_place(dtype):
    """As the models call them: q, k, v are head-transposed views of [B, L, heads * D] projections.
    RoPE reads and writes that layout; attention reads k and v there (no copies) and writes its
    output as [B, L, H, D] in memory, so the caller's reshape back to [B, L, H * D] is free."""
    from workers.models.llada import Rotary

    B, H, KV, L, Lk, D, start = 2, 4, 2, 9, 40, 32, 20
    g = torch.Generator().manual_seed(7)
    proj_q = torch.randn(B, L, H * D, generator=g).to(dtype)
    proj_k, proj_v = (torch.randn(B, L, KV * D, generator=g).to(dtype) for _ in range(2))
    q, k, v = (p.view(B, L, -1, D).transpose(1, 2) for p in (proj_q, proj_k, proj_v))
    cos, sin = Rotary(D, 10000.0)(torch.arange(start, start + L).expand(B, L), dtype)
    rq, rk = tk.rope(q, cos, sin, out=nan_like(q)), tk.rope(k, cos, sin)
    assert rk.stride() == k.stride()
    torch.testing.assert_close(rq, reference.rope(q, cos, sin), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rk, reference.rope(k, cos, sin), rtol=2e-3, atol=2e-3)
    cache_k, cache_v = (torch.randn(B, KV, Lk, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, Lk, generator=g) > 0.2
    expected = reference.cached_attention(
        rq.float(),
        rk.float(),
        v.float(),
        cache_k.float().clone(),
        cache_v.float().clone(),
        start,
        mask,
        write=False,
    ).to(dtype)
    out = tk.cached_attention(rq, rk, v, cache_k, cache_v, start, mask, True)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(cache_k[:, :, start : start + L], rk) and torch.equal(
        cache_v[:, :, start : start + L], v
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("write", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "block_causal"])
def test_cached_attention_writes_the_block_in_place(dtype, write, mask_kind):
    """The fed tokens' queries over a cache view (a slice of a larger preallocated cache) with
    their own keys/values at [start, start + Lq): read from the new tensors, written into the
    cache by the kernel when asked (and only there), or the cache left untouched."""
    B, H, KV, Lq, Lk, D, start = 3, 4, 2, 11, 75, 32, 40
    g = torch.Generator().manual_seed(Lk + write)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, KV, Lq, D, generator=g).to(dtype) for _ in range(2))
    big_k, big_v = (torch.randn(2, B + 1, KV, Lk + 13, D, generator=g).to(dtype) for _ in range(2))
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(B, Lk, generator=g) > 0.2
        mask[0, : Lk // 2] = False
    elif mask_kind == "block_causal":  # blocks of 16 from the first token, as LLaDA2 sees them
        blocks = torch.arange(Lk) // 16
        mask = (blocks[None, :] <= blocks[start : start + Lq, None]).expand(B, Lq, Lk).clone()
        mask[1, :, :5] = False
    ref_k, ref_v = big_k.clone(), big_v.clone()
    expected = reference.cached_attention(
        q.float(),
        k.float(),
        v.float(),
        ref_k[1, :B, :, :Lk].float(),
        ref_v[1, :B, :, :Lk].float(),
        start,
        mask,
        write=False,
    ).to(dtype)
    if write:
        ref_k[1, :B, :, start : start + Lq], ref_v[1, :B, :, start : start + Lq] = k, v
    out = tk.cached_attention(
        q, k, v, big_k[1, :B, :, :Lk], big_v[1, :B, :, :Lk], start, mask, write, out=nan_like(q)
    )
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert torch.equal(big_k, ref_k) and torch.equal(
        big_v, ref_v
    )  # written exactly there, nothing else
    dispatched = kernels.cached_attention(
        q.float(),
        k.float(),
        v.float(),
        big_k[1, :B, :, :Lk].float().clone(),
        big_v[1, :B, :, :Lk].float().clone(),
        start,
        mask,
        write,
    )
    torch.testing.assert_close(
        dispatched.to(dtype), expected, rtol=tol, atol=tol
    )  # CPU: the reference


@pytest.mark.parametrize(
    "family,overrides",
    [
        (
            "llada",
            dict(
                d_model=64,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=300,
                embedding_size=304,
                mask_token_id=299,
            ),
        ),
        ("llada2_moe", dict(head_dim=16)),  # block-causal masks through the attention kernel
    ],
)
def test_engine_through_the_kernels_matches_torch(family, overrides, monkeypatch):
    """The whole engine with every op on its Triton kernel (the interpreter, on CPU) decodes the
    same tokens in the same forwards as with the torch references: the model, caches and decoders
    call the kernels with the right shapes, strides, masks, in-place cache writes and noise.
    Greedy and sampled rows, two decoders, prompts of different lengths, float32."""
    from dinfer_async import SamplingParams
    from tests.tiny_models import random_prompts, tiny_family_model
    from workers.scheduler import denoise

    model = tiny_family_model(family, seed=3, **overrides).float()
    cfg = model.config
    prompts = random_prompts(5, [7, 3], cfg.vocab_size, cfg.mask_token_id)
    common = dict(gen_length=8, block_length=4, cache="dual", early_stop=False)
    params = [
        SamplingParams(decoder="threshold", threshold=0.5, **common).validate(),
        SamplingParams(decoder="factor", temperature=0.9, **common).validate(),
    ]

    def run():
        return [(s.window, s.forwards) for s in denoise(model, prompts, params, [11, 12])]

    expected = run()
    calls = set()
    for name, fn in kernels._triton().items():  # count which kernels really ran
        monkeypatch.setitem(
            kernels._TRITON,
            name,
            lambda *a, _name=name, _fn=fn, **k: calls.add(_name) or _fn(*a, **k),
        )
    with kernels.triton_everywhere():
        assert run() == expected
    assert calls >= {
        "rms_norm",
        "add_rms_norm",
        "rope",
        "swiglu",
        "cached_attention",
        "confidence",
        "threshold_commit",
        "factor_commit",
    }


def test_sampling_without_seeds_is_a_clear_error():
    logits, temperature = torch.zeros(1, 2, 10), torch.ones(1)
    for fn in (reference.confidence, tk.confidence):
        with pytest.raises(ValueError, match="needs seeds"):
            fn(logits, temperature, None)
