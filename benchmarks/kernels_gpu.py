"""Triton kernels vs their torch references vs the memory-bandwidth floor, on CUDA.

    python benchmarks/kernels_gpu.py [--sections check,kernels,moe,confidence,forward] [--dry-run]

Sections (all by default): check (kernels vs references, engine vs reference sampler), kernels
(kernel timings), moe (routed experts at LLaDA-MoE-7B-A1B's and LLaDA2.0-mini's shapes: the Triton
grouped GEMM vs torch's grouped matmul, the dense path and the loop, and the whole MoE block),
confidence (one program per row vs the vocabulary split over programs), forward (the 8B-shaped
block forward and the engine). `--dry-run` runs the moe and confidence sections on the CPU at
small sizes (Triton through its interpreter), so a GPU lease is not spent on a typo.

The floor of a kernel is bytes moved / measured copy bandwidth (a device-to-device copy of a
large buffer). Also one LLaDA-8B-shaped forward (random weights, bf16, batch 1, a 32-token block
over a 1,024-token cache) against its floor (all weights read once), and the whole engine on that
model against the bare forwards its decoding needs. Before timing: each kernel against its torch
reference, and the engine (Triton) against the reference sampler (torch) on the bundled model.
Prints tables; needs a GPU.
"""

# ruff: noqa: B023 (the timed lambdas run inside the iteration that defines them)
from __future__ import annotations

import argparse
import os
import time

import torch

from dinfer_async import SamplingParams

_DRY = False  # --dry-run: CPU timings with perf_counter


def timed(fn, repeat: int = 50) -> float:
    """Median seconds per call, CUDA events (perf_counter in a dry run)."""
    if _DRY:
        fn()
        times = []
        for _ in range(3):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        return sorted(times)[1]
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def graph_timed(fn, calls: int = 20, repeat: int = 20) -> float | None:
    """Median seconds per call with the launch cost taken out: `calls` back-to-back calls captured
    in one CUDA graph and replayed. None (and why) when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception as e:  # report and go on
        print(f"  (no CUDA graph for this one: {type(e).__name__}: {str(e)[:200]})", flush=True)
        return None
    return timed(graph.replay, repeat) / calls


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeat=20)
    return 2 * src.numel() / seconds  # read + write


def check(tk, reference, dev):
    """Each kernel agrees with its reference on CUDA (compiled, not interpreted) before timing."""
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(2, 16, 126_464, device=dev, generator=g)
    temp, seeds = torch.tensor([0.0, 0.8], device=dev), torch.tensor([1, 2**40 + 3], device=dev)
    for t, s in ((None, None), (temp, seeds)):
        token, prob = tk.confidence_full(logits, t, s)
        ref_token, ref_prob = reference.confidence(logits, t, s)
        assert torch.equal(token, ref_token), "confidence: tokens differ from the reference"
        torch.testing.assert_close(prob.double(), ref_prob, rtol=1e-4, atol=1e-6)
    q = torch.randn(2, 8, 32, 128, device=dev, generator=g, dtype=torch.float16)
    new_k, new_v = (
        torch.randn(2, 2, 32, 128, device=dev, generator=g, dtype=torch.float16) for _ in range(2)
    )
    cache_k, cache_v = (
        torch.randn(2, 2, 300, 128, device=dev, generator=g, dtype=torch.float16) for _ in range(2)
    )
    blocks = torch.arange(300, device=dev) // 32
    for mask in (
        None,
        torch.rand(2, 300, device=dev, generator=g) > 0.1,
        (blocks[None, :] <= blocks[256:288, None]).expand(2, 32, 300),
    ):
        ck, cv = cache_k.clone(), cache_v.clone()
        out = tk.cached_attention(q, new_k, new_v, ck, cv, 256, mask, True)
        expected = reference.cached_attention(
            q.float(),
            new_k.float(),
            new_v.float(),
            cache_k.float().clone(),
            cache_v.float().clone(),
            256,
            mask,
            True,
        )
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
        assert torch.equal(ck[:, :, 256:288], new_k) and torch.equal(
            ck[:, :, :256], cache_k[:, :, :256]
        )
    conf, masked = (
        torch.rand(8, 32, device=dev, dtype=torch.float64, generator=g),
        torch.rand(8, 32, device=dev, generator=g) < 0.6,
    )
    f, tau, low = (torch.full((8, 1), x, device=dev, dtype=torch.float64) for x in (1.0, 0.9, 0.5))
    assert torch.equal(
        tk.threshold_commit(conf, masked, tau).bool(), reference.threshold_commit(conf, masked, tau)
    )
    assert torch.equal(
        tk.factor_commit(conf, masked, f).bool(), reference.factor_commit(conf, masked, f)
    )
    assert torch.equal(
        tk.hierarchical_commit(conf, masked, tau, low).bool(),
        reference.hierarchical_commit(conf, masked, tau, low),
    )
    print("kernels agree with their references on CUDA")


def check_engine(dev):
    """The engine through the Triton kernels against the reference sampler through torch, on the
    bundled model's held-out prompts (20, ragged lengths, one batch): windows identical?"""
    from workers import Engine
    from workers.bundled import tasks
    from workers.reference import reference_generate
    from workers.scheduler import denoise

    for dtype in ("float32", "float64"):
        engine = Engine.from_pretrained(None, device=dev, dtype=dtype)
        prompts = [engine.encode(messages=ex.messages) for ex in tasks.held_out(4)]
        seeds = list(range(len(prompts)))
        for temperature in (0.0, 0.8):
            kw = dict(gen_length=64, block_length=32, steps=64, temperature=temperature)
            params = SamplingParams(
                decoder="fixed", cache="none", early_stop=False, **kw
            ).validate()
            try:
                fast = [s.window for s in denoise(engine.model, prompts, params, seeds)]
                ref, _ = reference_generate(
                    engine.model,
                    prompts,
                    mask_id=engine.config.mask_token_id,
                    eos_id=engine.config.eos_token_id,
                    seeds=seeds,
                    **kw,
                )
                same = sum(a == b for a, b in zip(fast, ref))
                print(
                    f"engine vs reference sampler, bundled model, {dtype}, temperature "
                    f"{temperature}: {same}/{len(prompts)} windows identical",
                    flush=True,
                )
            except (
                Exception
            ) as e:  # report and go on: one run on a lent GPU must give every other number
                print(
                    f"engine vs reference sampler, {dtype}, temperature {temperature}: "
                    f"FAILED {e!r}",
                    flush=True,
                )


def engine_vs_bare(model, dev, batches=(1, 16), prompt_length=128, repeat=3):
    """Seconds per request batch through Engine.generate vs the bare forwards the same decoding
    runs (dual cache: per block one full forward, then block-only forwards): the engine's own
    cost."""
    from workers import Engine
    from workers.bundled import MODEL_DIR
    from workers.cache import KVCache
    from workers.tokenizer import load_tokenizer

    cfg, dtype = model.config, model.lm_head_weight.dtype
    G, K, steps = 256, 32, 64
    params = SamplingParams(
        gen_length=G, block_length=K, decoder="fixed", steps=steps, cache="dual", early_stop=False
    )
    engine = Engine(model, load_tokenizer(MODEL_DIR), max_batch_size=max(batches))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in batches:
        prompts = [
            torch.randint(0, cfg.vocab_size - 1000, (prompt_length,), generator=g).tolist()
            for _ in range(B)
        ]
        engine.generate(prompts, params)  # warm-up: Triton compiles, the allocator settles
        sync()
        begin = time.perf_counter()
        for _ in range(repeat):
            results = engine.generate(prompts, params)
        t_engine = (time.perf_counter() - begin) / repeat
        forwards = results[0].stats.forwards

        L = prompt_length + G
        x = torch.tensor(prompts, device=dev)
        x = torch.cat([x, torch.full((B, G), cfg.mask_token_id, device=dev)], 1)
        pos = torch.arange(L, device=dev).expand(B, L)
        cache = KVCache(cfg, dev, dtype)

        def bare(cache=cache, B=B, L=L, x=x, pos=pos):
            cache.reserve(B, L)
            n = 0
            for b in range(G // K):
                lo, hi = prompt_length + b * K, prompt_length + (b + 1) * K
                model(x, pos, None, cache=cache, start=0)
                n += 1
                for _ in range(steps // (G // K) - 1):
                    model(x[:, lo:hi], pos[:, lo:hi], None, cache=cache, start=lo)
                    n += 1
            return n

        with torch.no_grad():
            bare()
            sync()
            begin = time.perf_counter()
            for _ in range(repeat):
                n_bare = bare()
            sync()
        t_bare = (time.perf_counter() - begin) / repeat
        rows.append((B, forwards, n_bare, t_engine, t_bare))
    print(
        "\n| batch | forwards/request (engine, bare) | engine s | bare forwards s | engine / bare "
        "| tokens/s (engine) |"
    )
    print("|---|---|---|---|---|---|")
    for B, f, n, te, tb in rows:
        print(f"| {B} | {f}, {n} | {te:.3f} | {tb:.3f} | {te / tb:.2f}x | {B * G / te:.0f} |")
    return rows


def kernel_rows(tk, reference, dev, bw):
    """Each kernel's time (eager, graph-replayed) against its torch reference and its floor."""
    from workers.models.llada import Rotary

    dev = dev
    bf16 = torch.bfloat16
    rows = []

    def row(name, triton_fn, torch_fn, nbytes):
        t_tr, t_ref, t_graph = timed(triton_fn), timed(torch_fn), graph_timed(triton_fn)
        floor = nbytes / bw
        rows.append(
            (
                name,
                t_tr * 1e6,
                t_ref * 1e6,
                t_graph * 1e6 if t_graph else float("nan"),
                floor * 1e6,
                floor / t_graph if t_graph else float("nan"),
            )
        )

    V = 126_464
    logits = torch.randn(32, V, device=dev, dtype=bf16)
    row(
        "confidence [32 x 126464] bf16",
        lambda: tk.confidence_full(logits),
        lambda: reference.confidence(logits),
        logits.numel() * 2,
    )
    block_logits = logits.view(1, 32, V)
    temp, seeds = torch.full((1,), 0.7, device=dev), torch.tensor([12345], device=dev)
    row(
        "confidence + Gumbel-max [32 x 126464] bf16",
        lambda: tk.confidence_full(block_logits, temp, seeds),
        lambda: reference.confidence(block_logits, temp, seeds),
        logits.numel() * 2,
    )
    conf, masked = (
        torch.rand(64, 32, device=dev, dtype=torch.float64),
        torch.rand(64, 32, device=dev) < 0.5,
    )
    tau = torch.full((64, 1), 0.9, device=dev, dtype=torch.float64)
    row(
        "threshold commit [64 x 32]",
        lambda: tk.threshold_commit(conf, masked, tau),
        lambda: reference.threshold_commit(conf, masked, tau),
        conf.numel() * 9 + 64 * 8,
    )
    x = torch.randn(32, 4096, device=dev, dtype=bf16)
    r = torch.randn_like(x)
    w = torch.ones(4096, device=dev, dtype=bf16)
    row(
        "rms_norm + residual [32 x 4096]",
        lambda: tk.rms_norm(x, w, 1e-5, residual=r),
        lambda: reference.rms_norm(x + r, w, 1e-5),
        x.numel() * 2 * 4,
    )
    gate, up = (
        torch.randn(32, 12288, device=dev, dtype=bf16),
        torch.randn(32, 12288, device=dev, dtype=bf16),
    )
    row(
        "swiglu [32 x 12288]",
        lambda: tk.swiglu(gate, up),
        lambda: reference.swiglu(gate, up),
        gate.numel() * 2 * 3,
    )
    q = torch.randn(1, 32, 32, 128, device=dev, dtype=bf16)
    cos, sin = Rotary(128, 500000.0)(torch.arange(32, device=dev)[None], bf16)
    row(
        "rope [1 x 32 x 32 x 128]",
        lambda: tk.rope(q, cos, sin),
        lambda: reference.rope(q, cos, sin),
        q.numel() * 2 * 2,
    )
    k = torch.randn(1, 32, 1056, 128, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1056, dtype=torch.bool, device=dev)
    row(
        "attention 32 q over 1056 keys, 32 heads",
        lambda: tk.attention(q, k, v, mask),
        lambda: reference.attention(q, k, v, mask),
        (k.numel() + v.numel()) * 2,
    )
    new_k, new_v = k[:, :, 1024:].clone(), v[:, :, 1024:].clone()
    row(
        "attention + in-place cache write (block at 1024)",
        lambda: tk.cached_attention(q, new_k, new_v, k, v, 1024, mask, True),
        lambda: reference.cached_attention(q, new_k, new_v, k, v, 1024, mask, True),
        (k.numel() + v.numel()) * 2,
    )

    print(f"\ncopy bandwidth: {bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}\n")
    print(
        "Eager: one call between CUDA events, launch included. Graph: 20 calls replayed from one "
        "CUDA graph, per call: the kernel's own time. Bandwidth: the floor over the graph time.\n"
    )
    print(
        "| kernel | Triton us, eager | torch us, eager | Triton us, graph | floor us "
        "| of bandwidth |"
    )
    print("|---|---|---|---|---|---|")
    for name, a, b, g, f, frac in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {g:.1f} | {f:.1f} | {frac:.0%} |")


def forward_and_engine(dev, bw):
    """The LLaDA-8B-shaped block forward against its floor, then the engine vs bare forwards."""
    from shapes import llada8b

    bf16 = torch.bfloat16
    model = llada8b(dev, bf16)
    cfg = model.config
    from workers.cache import KVCache

    cache = KVCache(cfg, dev, bf16)
    cache.reserve(1, 1056)
    ids = torch.randint(0, 126000, (1, 1056), device=dev)
    pos = torch.arange(1056, device=dev)[None]
    with torch.no_grad():
        model(ids, pos, None, cache=cache, start=0)
        block = lambda: model(ids[:, 1024:], pos[:, 1024:], None, cache=cache, start=1024)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        kv = 2 * cfg.n_layers * 1056 * cfg.d_model * 2
        t = timed(block, repeat=20)
    floor = (weights + kv) / bw
    print(
        f"\nLLaDA-8B-shaped forward, 32-token block over a 1,024-token cache, bf16: "
        f"{t * 1e3:.2f} ms eager, floor {floor * 1e3:.2f} ms ({t / floor:.2f}x the floor)",
        flush=True,
    )
    with torch.no_grad():  # a block's refresh: every column fed, one block's logits read
        every = lambda: model(ids, pos, None, cache=cache, start=0)
        columns = slice(1024, 1056)
        only = lambda: model(ids, pos, None, cache=cache, start=0, logit_columns=columns)
        diff = (every()[:, columns].float() - only().float()).abs().max().item()
        t_every, t_only = timed(every, repeat=5), timed(only, repeat=5)
    mb = cfg.vocab_size * 2 / 2**20  # one column's bf16 logits
    print(
        f"refresh forward over 1,056 tokens: LM head on every column {t_every * 1e3:.2f} ms, on "
        f"the block only (logit_columns) {t_only * 1e3:.2f} ms ({t_every / t_only:.2f}x); "
        f"bf16 logits {1056 * mb:.0f} MB vs {32 * mb:.0f} MB; largest logit difference {diff:.2e}",
        flush=True,
    )
    try:  # how many kernels one forward launches: with eager launches, the CPU's pace per launch
        with (
            torch.no_grad(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        ):
            block()
            torch.cuda.synchronize()
        launches = sum(
            e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
        )
        print(
            f"kernels launched by that forward: {launches} "
            f"({t / max(launches, 1) * 1e6:.1f} us of eager time each)"
        )
    except Exception as e:
        print(f"(no kernel count: {type(e).__name__}: {e})")
    print(
        "\nengine on the LLaDA-8B-shaped model (random weights, bf16): prompt 128, gen_length 256, "
        "block 32, fixed decoder with 64 steps, dual cache, no early stop"
    )
    engine_vs_bare(model, dev)
    with torch.no_grad():  # last: a capture that fails can leave the device unusable
        t_graph = graph_timed(block, calls=5)
    if t_graph:
        print(
            f"\nthe 8B-shaped block forward replayed from a CUDA graph: {t_graph * 1e3:.2f} ms "
            f"({t_graph / floor:.2f}x the floor; eager {t * 1e3:.2f} ms)"
        )


# ---- MoE: the grouped kernel, torch's grouped matmul, the dense path and the loop ---------------

# Shapes from the released configs (config.json of each checkpoint on Hugging Face):
# - LLaDA-MoE-7B-A1B (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct): hidden_size 2048,
#   expert_intermediate_size 1024, num_experts 64, num_experts_per_tok 8, no shared expert
#   (shared_expert_intermediate_size null), vocab_size 157184.
# - LLaDA2.0-mini (inclusionAI/LLaDA2.0-mini; LLaDA2.1-mini's config.json carries the same
#   numbers): hidden_size 2048, moe_intermediate_size 512, num_experts 256, num_experts_per_tok 8,
#   num_shared_experts 1 (one shared expert of 512), n_group 8, topk_group 4.
MOE_SHAPES = {
    "LLaDA-MoE-7B-A1B": dict(d=2048, H=1024, E=64, k=8),
    "LLaDA2.0-mini": dict(d=2048, H=512, E=256, k=8),
}
MOE_TOKENS = (32, 512)  # one 32-token block at batch 1; batch 16


def moe_raw_config(name: str, scale: int = 1) -> dict:
    """A config.json for one MoE layer of `name` (sizes divided by `scale` for the CPU dry run)."""
    s = MOE_SHAPES[name]
    d, H, E, k = s["d"] // scale, s["H"] // scale, s["E"], s["k"]
    if name == "LLaDA-MoE-7B-A1B":
        return dict(
            model_type="lladamoe",
            hidden_size=d,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_hidden_layers=1,
            vocab_size=1000,
            num_experts=E,
            num_experts_per_tok=k,
            expert_intermediate_size=H,
            dense_intermediate_size=4 * H,
            shared_expert_intermediate_size=None,
            moe_layer_freq=[1],
            norm_topk_prob=False,
            qk_layernorm=True,
            rope_theta=50000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            eos_token_id=1,
            mask_token_id=999,
        )
    return dict(
        model_type="llada2_moe",
        hidden_size=d,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=d // 16,
        num_hidden_layers=2,
        intermediate_size=5 * H,
        moe_intermediate_size=H,
        num_experts=E,
        num_shared_experts=1,
        num_experts_per_tok=k,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        rope_theta=600000.0,
        rms_norm_eps=1e-6,
        vocab_size=1000,
        tie_word_embeddings=False,
        mask_token_id=999,
        eos_token_id=1,
    )


def moe_layer(name: str, dev: str, dtype: torch.dtype, scale: int = 1) -> torch.nn.Module:
    """The family's whole MoE block (router, routed experts, LLaDA2's shared expert), random."""
    from workers.models import llada2, llada_moe

    raw = moe_raw_config(name, scale)
    if name == "LLaDA-MoE-7B-A1B":
        block = llada_moe.SparseMoE(llada_moe.LLaDAMoEConfig.from_dict(raw))
    else:
        block = llada2.SparseMoE(llada2.LLaDA2Config.from_dict(raw))
    block = block.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.02 * torch.randn(p.shape, device=dev, generator=g, dtype=torch.float32))
    return block


class GroupedMM:
    """torch._grouped_mm over the expert-sorted pairs (needs stacked weights: built once, outside
    the timing; bf16 on sm90+). For comparison with the Triton kernel only."""

    def __init__(self, experts):
        self.gate_up = torch.stack(
            [torch.cat([g, u]).t() for g, u in zip(experts.gate, experts.up)]
        ).contiguous()  # [E, d, 2H]
        self.down = torch.stack([w.t() for w in experts.down]).contiguous()  # [E, H, d]
        self.E, self.H = experts.num_experts, experts.hidden

    def __call__(self, h, ids, weights):
        from dinfer_kernels import moe

        N, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        bounds = torch.arange(1, self.E + 1, device=h.device, dtype=flat.dtype)
        offs = torch.searchsorted(flat[order], bounds).to(torch.int32)
        x = h[order // k]
        gu = torch._grouped_mm(x, self.gate_up, offs=offs)
        a = torch.nn.functional.silu(gu[:, : self.H]) * gu[:, self.H :]
        y = torch._grouped_mm(a, self.down, offs=offs)
        slots = torch.empty_like(y)
        slots[order] = y
        return moe.combine(slots.view(N, k, -1), weights)


def moe_section(dev: str, bw: float | None, dry: bool) -> None:
    """Routed experts at both released shapes, N tokens per layer: each path's time, and the
    floor (the routed experts' weights, each read once, plus activations) as % of copy bandwidth.
    Then the whole MoE block with the loop vs the grouped kernel, the grouped one also replayed
    from a CUDA graph and run under torch.cuda.set_sync_debug_mode("error")."""
    import dinfer_kernels as kernels
    from dinfer_kernels import moe, reference, triton_moe

    dtype = torch.float32 if dry else torch.bfloat16
    scale, tokens = (16, (8,)) if dry else (1, MOE_TOKENS)
    print(f"\nMoE routed experts, {dtype}{' (CPU dry run, sizes / 16)' if dry else ''}")
    print(
        "| shape | tokens | loop us | dense us | grouped us | grouped graph us "
        "| torch._grouped_mm us | floor us | of bandwidth |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MOE_SHAPES:
        block = moe_layer(name, dev, dtype, scale)
        experts = block.experts.expert_weights()
        d = experts.d_model
        for N in tokens:
            g = torch.Generator(device=dev).manual_seed(N)
            h = torch.randn(N, d, device=dev, generator=g).to(dtype)
            scores = torch.rand(N, experts.num_experts, device=dev, generator=g)
            weights, ids = scores.topk(MOE_SHAPES[name]["k"], dim=-1)
            weights = weights.to(dtype)
            expected = reference.routed_experts(h.float(), ids, weights.float(), _float(experts))
            got = triton_moe.routed_experts(h, ids, weights, experts)
            err = ((got.float() - expected).abs().max() / expected.abs().max()).item()
            assert err < 3e-2, f"{name}, {N} tokens: grouped kernel off by {err:.3g} (relative)"
            used = len(torch.unique(ids).tolist())
            nbytes = used * 3 * experts.hidden * d * h.element_size() + N * d * h.element_size() * 2
            floor = nbytes / bw if bw else float("nan")
            t_loop = timed(lambda: reference.routed_experts(h, ids, weights, experts))
            t_dense = timed(lambda: moe.dense_experts(h, ids, weights, experts))
            grouped = lambda: triton_moe.routed_experts(h, ids, weights, experts)
            t_grouped = timed(grouped)
            t_graph = graph_timed(grouped) if not dry else None
            t_mm = None
            if not dry:
                try:
                    mm = GroupedMM(experts)
                    mm(h, ids, weights)
                    t_mm = timed(lambda: mm(h, ids, weights))
                except Exception as e:  # not every build or GPU has it
                    print(f"  (no torch._grouped_mm: {type(e).__name__}: {str(e)[:120]})")
            best = t_graph or t_grouped
            print(
                f"| {name} | {N} | {t_loop * 1e6:.0f} | {t_dense * 1e6:.0f} | "
                f"{t_grouped * 1e6:.0f} | {_us(t_graph)} | {_us(t_mm)} | {floor * 1e6:.1f} | "
                f"{floor / best:.0%} |",
                flush=True,
            )
        x = torch.randn(1, tokens[-1], d, device=dev, dtype=dtype)
        with torch.no_grad():
            with kernels.configured(moe="loop"):
                ref = block(x)
                t_loop = timed(lambda: block(x))
            with kernels.configured(moe="grouped"), kernels.triton_everywhere():
                out = block(x)
                t_grouped = timed(lambda: block(x))
                t_graph = graph_timed(lambda: block(x)) if not dry else None
                synced = "not checked (CPU)"
                if not dry:
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        block(x)
                        synced = "no sync"
                    except RuntimeError as e:
                        synced = f"SYNC: {str(e)[:80]}"
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(
            f"whole {name} MoE block, {tokens[-1]} tokens: loop {t_loop * 1e6:.0f} us, grouped "
            f"{t_grouped * 1e6:.0f} us eager, {_us(t_graph)} us graph; relative difference "
            f"{err:.2g}; sync debug mode: {synced}",
            flush=True,
        )


def check_moe_engine(dev: str) -> None:
    """The engine on small random LLaDA-MoE and LLaDA2 models on the GPU: the grouped kernel
    (float32) and the dense path (float64) decode the same windows as the loop."""
    import dinfer_kernels as kernels
    from workers.models import FAMILIES, family_name
    from workers.scheduler import denoise

    for name in MOE_SHAPES:
        raw = moe_raw_config(name, scale=16)
        config_cls, model_cls = FAMILIES[family_name(raw)]
        g = torch.Generator().manual_seed(0)
        model = model_cls(config_cls.from_dict(raw)).double()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                std = 0.2 if pname.endswith("gate.weight") else 0.3
                noise = std * torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.copy_(noise + 1 if pname.endswith("norm.weight") else noise)
        model = model.to(dev).eval()
        prompts = [torch.randint(0, 990, (n,), generator=g).tolist() for n in (5, 17, 9)]
        params = SamplingParams(
            gen_length=32, block_length=16, decoder="threshold", threshold=0.5, cache="dual"
        ).validate()
        for dtype, path in ((torch.float64, "dense"), (torch.float32, "grouped")):
            model = model.to(dtype)
            with kernels.configured(moe="loop"):
                expected = [s.window for s in denoise(model, prompts, params, [1, 2, 3])]
            with kernels.configured(moe=path):
                got = [s.window for s in denoise(model, prompts, params, [1, 2, 3])]
            same = sum(a == b for a, b in zip(got, expected))
            print(f"engine on a small {name}, {dtype}: {path} vs loop, {same}/3 windows identical")


def _float(experts):
    from dinfer_kernels import moe

    return moe.ExpertWeights(
        *([w.float() for w in ws] for ws in (experts.gate, experts.up, experts.down))
    )


def _us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:.0f}"


# ---- confidence: one program per row vs the vocabulary split over programs ---------------------


def confidence_section(dev: str, bw: float | None, dry: bool) -> None:
    """[32 x V] logits, V = 126,464 (LLaDA) and 157,184 (LLaDA-MoE, LLaDA2): one program per row
    (today's default) vs split vocabularies (the dispatcher's rule, and a sweep), greedy and
    Gumbel-max; each checked against the torch reference first, then % of copy bandwidth."""
    from dinfer_kernels import reference
    from dinfer_kernels import triton_ops as tk

    vocabs = (4099,) if dry else (126_464, 157_184)
    dtype = torch.float32 if dry else torch.bfloat16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if not dry else 8
    print(f"\nconfidence kernel, [32 x V] {dtype}{' (CPU dry run)' if dry else ''}")
    print("| V | kind | splits | Triton us, eager | Triton us, graph | torch us | of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for V in vocabs:
        g = torch.Generator(device=dev).manual_seed(V)
        logits = (3 * torch.randn(1, 32, V, device=dev, generator=g)).to(dtype)
        temp, seeds = torch.full((1,), 0.8, device=dev), torch.tensor([12345], device=dev)
        auto = tk.confidence_splits(32, V, sms, 2048)
        sweep = sorted({1, auto, 4, 8, 16, 32, 64}) if not dry else [1, 3]
        for kind, args in (("greedy", (None, None)), ("Gumbel", (temp, seeds))):
            ref = reference.confidence(logits, *args)
            t_ref = timed(lambda a=args: reference.confidence(logits, *a))
            for splits in sweep if kind == "greedy" else sorted({1, auto}):
                fn = lambda a=args, s=splits: tk.confidence_full(logits, *a, splits=s)
                token, prob = fn()
                assert torch.equal(token, ref[0]), f"confidence V={V} {kind} splits={splits}"
                t_eager = timed(fn)
                t_graph = graph_timed(fn) if not dry else None
                best = t_graph or t_eager
                pct = logits.numel() * logits.element_size() / bw / best if bw else float("nan")
                mark = " (rule)" if splits == auto else ""
                print(
                    f"| {V} | {kind} | {splits}{mark} | {t_eager * 1e6:.1f} | {_us(t_graph)} | "
                    f"{t_ref * 1e6:.1f} | {pct:.0%} |",
                    flush=True,
                )
        current = torch.randint(0, V, (1, 32), device=dev, generator=g)
        got = tk.confidence_full(logits, current=current, splits=auto)
        ref = reference.confidence_runner_up(logits, current)
        assert torch.equal(got[2], ref[2]), "runner-up tokens differ from the reference"
        print(f"runner-up and current-token probability (splits {auto}) agree with the reference")


SECTIONS = ("check", "kernels", "moe", "confidence", "forward")


def main():
    global _DRY
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--dry-run", action="store_true", help="moe, confidence on the CPU")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.dry_run:
        _DRY = True
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        torch.set_num_threads(1)
        for name in ("moe", "confidence"):
            if name in sections:
                globals()[f"{name}_section"]("cpu", None, dry=True)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py: no CUDA GPU here (run with --dry-run for a CPU check)")
    from dinfer_kernels import reference
    from dinfer_kernels import triton_ops as tk

    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if "check" in sections:
        check(tk, reference, dev)
        check_engine(dev)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    if "kernels" in sections:
        kernel_rows(tk, reference, dev, bw)
    if "moe" in sections:
        check_moe_engine(dev)
        moe_section(dev, bw, dry=False)
    if "confidence" in sections:
        confidence_section(dev, bw, dry=False)
    if "forward" in sections:
        forward_and_engine(dev, bw)


if __name__ == "__main__":
    main()
