"""Expert parallel's two dispatches, all-reduce vs all-to-all, on a random LLaDA-MoE-shaped model.

    python benchmarks/ep_dispatch.py                                # CPU, gloo, T = 2, scaled down
    python benchmarks/ep_dispatch.py --device cuda --dtype bfloat16 --full --sizes 1,2,4,8

For each group size T (its own processes) and each number of tokens per MoE forward (rows of 32
tokens, a decoding block each), the modes: "tp" (tensor parallel with every rank holding every
expert: no expert parallel), "all_reduce" and "all_to_all" (workers/parallel/layers.py); T = 1
is the single process. Timed: one MoE block alone on replicated hidden states (what the dispatch
changes) and the whole model forward; the median over --repeat calls of the slowest rank, the
modes' calls interleaved (so a change of load on a shared machine hits them alike). The
a2a/ar column is all_to_all's time over all_reduce's, measured in the same processes, and max
|d logits| compares rank 0's logits with the "tp" mode's (a check that the dispatch is right).

--full is LLaDA-MoE-7B-A1B's shape: the MoE sizes from kernels_gpu.MOE_SHAPES (the released
config.json: hidden 2048, experts 64, top-8, expert intermediate 1024, no shared expert) plus its
16 layers, 16 heads (16 key/value heads) and vocabulary 157,184. Without --full: the same expert
count and top-k with hidden and expert sizes divided by --scale, --layers layers, --vocab ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from kernels_gpu import MOE_SHAPES

from workers.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from workers.parallel.group import TensorParallel, launch, set_current
from workers.parallel.shard import shard_model

SHAPE = MOE_SHAPES["LLaDA-MoE-7B-A1B"]
FULL = dict(layers=16, heads=16, vocab=157184, mask=156895)  # the rest of its config.json
BLOCK = 32  # tokens per row: one decoding block


def config(args: argparse.Namespace) -> LLaDAMoEConfig:
    scale = 1 if args.full else args.scale
    layers = FULL["layers"] if args.full else args.layers
    vocab = FULL["vocab"] if args.full else args.vocab
    return LLaDAMoEConfig.from_dict(
        dict(
            hidden_size=SHAPE["d"] // scale,
            num_attention_heads=FULL["heads"],
            num_key_value_heads=FULL["heads"],
            num_hidden_layers=layers,
            vocab_size=vocab,
            num_experts=SHAPE["E"],
            num_experts_per_tok=SHAPE["k"],
            expert_intermediate_size=SHAPE["H"] // scale,
            shared_expert_intermediate_size=None,
            moe_layer_freq=[1] * layers,
            qk_layernorm=True,
            rope_theta=50000.0,
            eos_token_id=1,
            mask_token_id=FULL["mask"] if args.full else vocab - 1,
        )
    )


def random_model(args: argparse.Namespace, device: torch.device) -> LLaDAMoEModel:
    """Seeded random weights, the same on every rank, built where they run in their dtype."""
    dtype = getattr(torch, args.dtype)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LLaDAMoEModel(config(args))
    finally:
        torch.set_default_dtype(before)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def moe_block(model: torch.nn.Module) -> torch.nn.Module:
    """The first MoE block as the sharded model calls it (wrapped or, under "tp", bare)."""
    for m in model.modules():
        if type(m).__name__ in ("ExpertParallel", "ExpertParallelAllToAll", "SparseMoE"):
            return m
    raise LookupError("no MoE block")


def timed(calls: dict, device: torch.device, tp: TensorParallel | None, repeat: int) -> dict:
    """Median seconds per call of each of `calls` (name -> fn), of the slowest rank, the calls
    interleaved round by round so that a change of load on a shared machine hits them alike."""
    for fn in calls.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            if tp is not None:
                dist.barrier(group=tp.group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        t = torch.tensor(ts, dtype=torch.float64, device=device)
        if tp is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
        out[name] = statistics.median(t.tolist())
    return out


def measure(rank: int, size: int, args: argparse.Namespace, out: str) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tp = None
    if size > 1:
        tp = TensorParallel(dist.group.WORLD, rank, size)  # type: ignore[arg-type]
    models: dict[str, torch.nn.Module] = {}
    for mode in ("tp", "all_reduce", "all_to_all") if size > 1 else ("one",):
        model: torch.nn.Module = random_model(args, device)
        if tp is not None:
            model = shard_model(model, tp, expert_parallel=False if mode == "tp" else mode)
        models[mode] = model
    cfg = config(args)
    rows: list[dict] = []
    for tokens in args.tokens:
        B = max(1, tokens // BLOCK)
        gen = torch.Generator(device=device).manual_seed(tokens)
        ids = torch.randint(2, cfg.vocab_size - 1, (B, BLOCK), generator=gen, device=device)
        positions = torch.arange(BLOCK, device=device).expand(B, BLOCK)
        x = torch.randn(B, BLOCK, cfg.d_model, generator=gen, device=device)
        x = x.to(getattr(torch, args.dtype))
        with torch.no_grad():
            blocks = {m: partial(moe_block(model), x) for m, model in models.items()}
            forwards = {m: partial(model, ids, positions) for m, model in models.items()}
            t_block = timed(blocks, device, tp, args.repeat)
            t_model = timed(forwards, device, tp, args.repeat)
            logits = {m: model(ids, positions).float() for m, model in models.items()}
        for mode in models:
            diff = None if mode in ("tp", "one") else logits[mode] - logits["tp"]
            rows.append(
                dict(
                    mode=mode,
                    tokens=B * BLOCK,
                    block=t_block[mode],
                    model=t_model[mode],
                    diff=None if diff is None else diff.abs().max().item(),
                )
            )
    set_current(None)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _single(rank: int, size: int, args: argparse.Namespace, out: str) -> None:
    measure(rank, 1, args, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2", help="group sizes T, e.g. 1,2 (1: one process)")
    ap.add_argument("--tokens", default="32,256,1024", help="tokens per MoE forward")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--full", action="store_true", help="LLaDA-MoE-7B-A1B's whole shape")
    ap.add_argument("--scale", type=int, default=4, help="divide hidden and expert sizes")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="per rank (default cpu_count / T)")
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda" and max(sizes) > torch.cuda.device_count():
        raise SystemExit(f"--sizes {args.sizes}: only {torch.cuda.device_count()} GPUs visible")
    cfg = config(args)
    cpus = os.cpu_count() or 1
    where = f"{torch.cuda.get_device_name(0)} x{max(sizes)}" if args.device == "cuda" else "CPU"
    print(
        f"{where}, {cpus} CPU threads in all ({backend}); {args.dtype}; LLaDA-MoE-shaped: hidden "
        f"{cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.num_experts} experts, "
        f"top-{cfg.num_experts_per_tok}, expert intermediate {cfg.expert_intermediate_size}, "
        f"vocab {cfg.vocab_size}; rows of {BLOCK} tokens, median of {args.repeat}; threads per "
        f"rank {args.threads or 'cpu_count / T'}"
    )
    print(
        f"{'T':>2} {'tokens':>6} {'mode':>10} {'block ms':>9} {'a2a/ar':>7} "
        f"{'model ms':>9} {'a2a/ar':>7} {'max |d logits|':>14}"
    )
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp, "rows.json"))
            launch(measure if size > 1 else _single, size, args, out, backend=backend)
            rows = json.loads(Path(out).read_text())
        ar = {r["tokens"]: r for r in rows if r["mode"] == "all_reduce"}
        for r in sorted(rows, key=lambda r: (r["tokens"], r["mode"] != "tp", r["mode"])):
            base = ar.get(r["tokens"]) if r["mode"] == "all_to_all" else None
            ratio_b = f"{r['block'] / base['block']:.2f}x" if base else ""
            ratio_m = f"{r['model'] / base['model']:.2f}x" if base else ""
            diff = "" if r["diff"] is None else f"{r['diff']:.1e}"
            print(
                f"{size:>2} {r['tokens']:>6} {r['mode']:>10} {r['block'] * 1e3:>9.2f} "
                f"{ratio_b:>7} {r['model'] * 1e3:>9.2f} {ratio_m:>7} {diff:>14}"
            )


if __name__ == "__main__":
    main()
