"""Tensor parallel 1 vs 2 (or more) on this machine's CPUs: the bundled model and a larger random
LLaDA-shaped one, through Engine, each size in its own processes (gloo).

    python benchmarks/tp_speed.py                       # both models, TP 1 and 2
    python benchmarks/tp_speed.py --models random --d-model 2048 --layers 8 --sizes 1,2,4
    python benchmarks/tp_speed.py --sizes 1,1:1,2          # T:N = TP T with N threads per rank

By default every size gets the same CPU threads in all (TP T: cpu_count / T threads per rank),
so the table shows what splitting buys or costs here: on a couple of shared cores the per-layer
all-reduces usually cost more than the smaller matmuls save. The load average is printed before
each row: on a shared machine it says how far to trust the row. Tokens of TP T are compared
with the first row's (float32: a rounding difference may flip a near tie, so a count of matching
answers is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from shapes import add_llada_shape_flags, llada_raw_config

from dinfer_async import SamplingParams
from workers.engine import Engine
from workers.models.llada import LLaDAConfig, LLaDAModel
from workers.parallel.group import launch


class Tokens:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, token_ids))

    def __len__(self) -> int:
        return 1 << 20


def random_llada(args: argparse.Namespace) -> LLaDAModel:
    """A LLaDA-shaped model with seeded random weights (the same on every rank)."""
    cfg = LLaDAConfig.from_dict(llada_raw_config(args))
    torch.manual_seed(0)
    model = LLaDAModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1).add_(p.dim() == 1)
    return model.eval().requires_grad_(False)


def build(kind: str, args: argparse.Namespace, size: int) -> tuple[Engine, list[list[int]]]:
    if kind == "bundled":
        engine = Engine.from_pretrained(None, tensor_parallel_size=size)
    else:
        engine = Engine(random_llada(args), Tokens(), tensor_parallel_size=size)
    gen = torch.Generator().manual_seed(1)
    V = engine.config.vocab_size - 1
    prompts = [torch.randint(2, V, (args.prompt_length,), generator=gen).tolist()]
    return engine, prompts * args.batch


def measure(
    rank: int, size: int, kind: str, args: argparse.Namespace, out: str, threads: int
) -> None:
    engine, prompts = build(kind, args, size)
    params = SamplingParams(
        gen_length=args.gen_length,
        block_length=args.block_length,
        decoder="threshold",
        cache="dual",
        early_stop=False,
        seed=0,
    )
    torch.set_num_threads(threads)
    engine.generate(prompts[:1], params)  # warm up
    seconds = float("inf")
    for _ in range(args.repeat):  # the best of a few: the machine may be shared
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = min(seconds, time.perf_counter() - start)
    if rank == 0:
        row = dict(
            seconds=seconds,
            tokens=sum(r.stats.committed for r in results),
            forwards=max(r.stats.forwards for r in results),
            answers=[r.token_ids for r in results],
        )
        Path(out).write_text(json.dumps(row))


def _single(
    rank: int, size: int, kind: str, args: argparse.Namespace, out: str, threads: int
) -> None:
    measure(rank, 1, kind, args, out, threads)


def sizes(text: str, default_threads: int, cpus: int) -> list[tuple[int, int]]:
    """ "1,2" or "1,1:1,2" -> [(TP, threads per rank)]."""
    out = []
    for item in text.split(","):
        size, _, threads = item.partition(":")
        t = int(size)
        out.append((t, int(threads) if threads else default_threads or max(1, cpus // t)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,random")
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=32)
    add_llada_shape_flags(ap, d_model=768, heads=12, layers=4, mlp=2048, vocab=16000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="per rank (default cpu_count / TP)")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    print(
        f"CPU, {cpus} threads in all; batch {args.batch}, prompt {args.prompt_length}, "
        f"gen_length {args.gen_length}, block {args.block_length}, threshold + dual cache, fp32"
    )
    if "random" in args.models:
        print(
            f"random LLaDA: d_model {args.d_model}, {args.heads} heads, {args.layers} layers, "
            f"mlp {args.mlp}, vocab {args.vocab}"
        )
    print(
        f"{'model':8} {'TP':>3} {'threads':>7} {'forwards':>8} {'seconds':>8} {'tokens/s':>9} "
        f"{'speed-up':>8} {'same':>6} {'load':>5}"
    )
    for kind in args.models.split(","):
        base: dict | None = None
        for size, threads in sizes(args.sizes, args.threads, cpus):
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp:
                out = str(Path(tmp, "row.json"))
                launch(measure if size > 1 else _single, size, kind, args, out, threads)
                row = json.loads(Path(out).read_text())
            base = base or row
            same = sum(a == b for a, b in zip(row["answers"], base["answers"]))
            print(
                f"{kind:8} {size:>3} {threads:>7} {row['forwards']:>8} "
                f"{row['seconds']:>8.2f} {row['tokens'] / row['seconds']:>9.1f}"
                f" {base['seconds'] / row['seconds']:>7.2f}x {same:>3}/{len(row['answers'])}"
                f" {load:>5.1f}"
            )


if __name__ == "__main__":
    main()
