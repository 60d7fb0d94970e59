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


def main():
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from kernels import reference
    from kernels import triton_ops as tk
    from workers.models.llada import LLaDAConfig, LLaDAModel, Rotary

    bw = copy_bandwidth()
    dev, bf16 = "cuda", torch.bfloat16
    rows = []

    def row(name, triton_fn, torch_fn, nbytes):
        t_tr, t_ref = timed(triton_fn), timed(torch_fn)
        floor = nbytes / bw
        rows.append((name, t_tr * 1e6, t_ref * 1e6, floor * 1e6, floor / t_tr))

    V = 126_464
    logits = torch.randn(32, V, device=dev, dtype=bf16)
    row("confidence [32 x 126464] bf16", lambda: tk.confidence_stats(logits), lambda: reference.confidence(logits),
        logits.numel() * 2)
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
