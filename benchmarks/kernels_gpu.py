"""Triton kernels vs their torch references vs the memory-bandwidth floor, on CUDA.

    python benchmarks/kernels_gpu.py

The floor of a kernel is bytes moved / measured copy bandwidth (a device-to-device copy of a
large buffer). Also one LLaDA-8B-shaped forward (random weights, bf16, batch 1, a 32-token block
over a 1,024-token cache) against its floor (all weights read once), and the whole engine on that
model against the bare forwards its decoding needs. Before timing: each kernel against its torch
reference, and the engine (Triton) against the reference sampler (torch) on the bundled model.
Prints tables; needs a GPU.
"""

from __future__ import annotations

import time

import torch

from dinfer_async import SamplingParams


def timed(fn, repeat: int = 50) -> float:
    """Median seconds per call, CUDA events."""
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
        token, prob, _, _ = tk.confidence_stats(logits, t, s)
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
                    f"{temperature}: "
                    f"{same}/{len(prompts)} windows identical",
                    flush=True,
                )
            except (
                Exception
            ) as e:  # report and go on: one run on a lent GPU must give every other number
                print(
                    f"engine vs reference sampler, {dtype}, temperature {temperature}: FAILED "
                    f"{e!r}",
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


def main():
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from dinfer_kernels import reference
    from dinfer_kernels import triton_ops as tk
    from workers.models.llada import LLaDAConfig, LLaDAModel, Rotary

    dev, bf16 = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check(tk, reference, dev)
    check_engine(dev)
    bw = copy_bandwidth()
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
        lambda: tk.confidence_stats(logits),
        lambda: reference.confidence(logits),
        logits.numel() * 2,
    )
    block_logits = logits.view(1, 32, V)
    temp, seeds = torch.full((1,), 0.7, device=dev), torch.tensor([12345], device=dev)
    row(
        "confidence + Gumbel-max [32 x 126464] bf16",
        lambda: tk.confidence_stats(block_logits, temp, seeds),
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

    cfg = LLaDAConfig.from_dict(
        dict(
            model_type="llada",
            d_model=4096,
            n_heads=32,
            n_kv_heads=32,
            n_layers=32,
            mlp_hidden_size=12288,
            vocab_size=126464,
            embedding_size=126464,
            mask_token_id=126336,
            eos_token_id=126081,
            rope_theta=500000.0,
        )
    )
    with torch.device(dev):
        model = LLaDAModel(cfg).to(bf16).eval().requires_grad_(False)
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
    print(f"\ncopy bandwidth: {bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}\n")
    print(
        "Eager: one call between CUDA events, launch included. Graph: 20 calls replayed from one "
        "CUDA graph,"
    )
    print("per call: the kernel's own time. Bandwidth: the floor over the graph time.\n")
    print(
        "| kernel | Triton us, eager | torch us, eager | Triton us, graph | floor us | of "
        "bandwidth |"
    )
    print("|---|---|---|---|---|---|")
    for name, a, b, g, f, frac in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {g:.1f} | {f:.1f} | {frac:.0%} |")
    print(
        f"\nLLaDA-8B-shaped forward, 32-token block over a 1,024-token cache, bf16: {t * 1e3:.2f} "
        "ms eager, "
        f"floor {floor * 1e3:.2f} ms ({t / floor:.2f}x the floor)",
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
            f"kernels launched by that forward: {launches} ({t / max(launches, 1) * 1e6:.1f} us "
            "of eager time each)"
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


if __name__ == "__main__":
    main()
