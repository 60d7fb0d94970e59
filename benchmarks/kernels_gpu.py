"""Triton kernels vs their torch references vs the memory-bandwidth floor, on CUDA.

    python benchmarks/kernels_gpu.py

The floor of a kernel is bytes moved / measured copy bandwidth (a device-to-device copy of a
large buffer). Also one LLaDA-8B-shaped forward (random weights, bf16, batch 1, a 32-token block
over a 1,024-token cache) against its floor (all weights read once). Prints a table; needs a GPU.
"""

from __future__ import annotations

import torch


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
    new_k, new_v = (torch.randn(2, 2, 32, 128, device=dev, generator=g, dtype=torch.float16) for _ in range(2))
    cache_k, cache_v = (torch.randn(2, 2, 300, 128, device=dev, generator=g, dtype=torch.float16) for _ in range(2))
    blocks = torch.arange(300, device=dev) // 32
    for mask in (None, torch.rand(2, 300, device=dev, generator=g) > 0.1,
                 (blocks[None, :] <= blocks[256:288, None]).expand(2, 32, 300)):
        ck, cv = cache_k.clone(), cache_v.clone()
        out = tk.cached_attention(q, new_k, new_v, ck, cv, 256, mask, True)
        expected = reference.cached_attention(q.float(), new_k.float(), new_v.float(), cache_k.float().clone(),
                                              cache_v.float().clone(), 256, mask, True)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
        assert torch.equal(ck[:, :, 256:288], new_k) and torch.equal(ck[:, :, :256], cache_k[:, :, :256])
    conf, masked = torch.rand(8, 32, device=dev, dtype=torch.float64, generator=g), torch.rand(8, 32, device=dev, generator=g) < 0.6
    f, tau, low = (torch.full((8, 1), x, device=dev, dtype=torch.float64) for x in (1.0, 0.9, 0.5))
    assert torch.equal(tk.threshold_commit(conf, masked, tau).bool(), reference.threshold_commit(conf, masked, tau))
    assert torch.equal(tk.factor_commit(conf, masked, f).bool(), reference.factor_commit(conf, masked, f))
    assert torch.equal(tk.hierarchical_commit(conf, masked, tau, low).bool(), reference.hierarchical_commit(conf, masked, tau, low))
    print("kernels agree with their references on CUDA")


def main():
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from kernels import reference
    from kernels import triton_ops as tk
    from workers.models.llada import LLaDAConfig, LLaDAModel, Rotary

    dev, bf16 = "cuda", torch.bfloat16
    check(tk, reference, dev)
    bw = copy_bandwidth()
    rows = []

    def row(name, triton_fn, torch_fn, nbytes):
        t_tr, t_ref = timed(triton_fn), timed(torch_fn)
        floor = nbytes / bw
        rows.append((name, t_tr * 1e6, t_ref * 1e6, floor * 1e6, floor / t_tr))

    V = 126_464
    logits = torch.randn(32, V, device=dev, dtype=bf16)
    row("confidence [32 x 126464] bf16", lambda: tk.confidence_stats(logits), lambda: reference.confidence(logits),
        logits.numel() * 2)
    block_logits = logits.view(1, 32, V)
    temp, seeds = torch.full((1,), 0.7, device=dev), torch.tensor([12345], device=dev)
    row("confidence + Gumbel-max [32 x 126464] bf16", lambda: tk.confidence_stats(block_logits, temp, seeds),
        lambda: reference.confidence(block_logits, temp, seeds), logits.numel() * 2)
    conf, masked = torch.rand(64, 32, device=dev, dtype=torch.float64), torch.rand(64, 32, device=dev) < 0.5
    tau = torch.full((64, 1), 0.9, device=dev, dtype=torch.float64)
    row("threshold commit [64 x 32]", lambda: tk.threshold_commit(conf, masked, tau),
        lambda: reference.threshold_commit(conf, masked, tau), conf.numel() * 9 + 64 * 8)
    x = torch.randn(32, 4096, device=dev, dtype=bf16)
    r = torch.randn_like(x)
    w = torch.ones(4096, device=dev, dtype=bf16)
    row("rms_norm + residual [32 x 4096]", lambda: tk.rms_norm(x, w, 1e-5, residual=r),
        lambda: reference.rms_norm(x + r, w, 1e-5), x.numel() * 2 * 4)
    gate, up = torch.randn(32, 12288, device=dev, dtype=bf16), torch.randn(32, 12288, device=dev, dtype=bf16)
    row("swiglu [32 x 12288]", lambda: tk.swiglu(gate, up), lambda: reference.swiglu(gate, up), gate.numel() * 2 * 3)
    q = torch.randn(1, 32, 32, 128, device=dev, dtype=bf16)
    cos, sin = Rotary(128, 500000.0)(torch.arange(32, device=dev)[None], bf16)
    row("rope [1 x 32 x 32 x 128]", lambda: tk.rope(q, cos, sin), lambda: reference.rope(q, cos, sin), q.numel() * 2 * 2)
    k = torch.randn(1, 32, 1056, 128, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1056, dtype=torch.bool, device=dev)
    row("attention 32 q over 1056 keys, 32 heads", lambda: tk.attention(q, k, v, mask),
        lambda: reference.attention(q, k, v, mask), (k.numel() + v.numel()) * 2)
    new_k, new_v = k[:, :, 1024:].clone(), v[:, :, 1024:].clone()
    row("attention + in-place cache write (block at 1024)", lambda: tk.cached_attention(q, new_k, new_v, k, v, 1024, mask, True),
        lambda: reference.cached_attention(q, new_k, new_v, k, v, 1024, mask, True), (k.numel() + v.numel()) * 2)

    cfg = LLaDAConfig.from_dict(dict(model_type="llada", d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                                     mlp_hidden_size=12288, vocab_size=126464, embedding_size=126464,
                                     mask_token_id=126336, eos_token_id=126081, rope_theta=500000.0))
    with torch.device(dev):
        model = LLaDAModel(cfg).to(bf16).eval().requires_grad_(False)
    from workers.cache import KVCache

    cache = KVCache(cfg, dev, bf16)
    cache.reserve(1, 1056)
    ids = torch.randint(0, 126000, (1, 1056), device=dev)
    pos = torch.arange(1056, device=dev)[None]
    with torch.no_grad():
        model(ids, pos, None, cache=cache, start=0)
        block = lambda: model(ids[:, 1024:], pos[:, 1024:], None, cache=cache, start=1024)  # noqa: E731
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        kv = 2 * cfg.n_layers * 1056 * cfg.d_model * 2
        t = timed(block, repeat=20)
    floor = (weights + kv) / bw
    print(f"\ncopy bandwidth: {bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}\n")
    print("| kernel | Triton us | torch us | floor us | Triton / floor |")
    print("|---|---|---|---|---|")
    for name, a, b, f, frac in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {f:.1f} | {frac:.0%} of bandwidth |")
    print(f"\nLLaDA-8B-shaped forward, 32-token block over a 1,024-token cache, bf16: {t * 1e3:.2f} ms, "
          f"floor {floor * 1e3:.2f} ms ({t / floor:.2f}x the floor)")


if __name__ == "__main__":
    main()
