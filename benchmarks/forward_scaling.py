"""How a forward's time grows with the number of rows: whether batching can pay on this device.

    python benchmarks/forward_scaling.py

Times the bundled model (or --model) on a full 300-token forward that fills a cache, and on a
32-token block over that cache, at 1, 4 and 16 rows.
"""

from __future__ import annotations

import argparse

import torch
from timing import seconds_per_call

from workers import Engine
from workers.cache import KVCache


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Engine.from_pretrained(args.model, dtype="float32").model
    L, lo, hi = args.length, 40, 72
    print("| rows | full forward | per row | block forward over the cache | per row |")
    print("|---|---|---|---|---|")
    for rows in (1, 4, 16):
        ids = torch.randint(0, model.config.vocab_size - 1, (rows, L))
        positions = torch.arange(L)[None].expand(rows, L)
        real = torch.ones(rows, L, dtype=torch.bool)
        cache = KVCache(model.config, "cpu", torch.float32)
        cache.reserve(rows, L)
        full = seconds_per_call(
            lambda ids=ids, positions=positions, real=real, cache=cache: model(
                ids, positions, real, cache, 0
            ),
            args.repeat,
            warmup=3,
        )
        block = seconds_per_call(
            lambda ids=ids, positions=positions, real=real, cache=cache: model(
                ids[:, lo:hi], positions[:, lo:hi], real, cache, lo
            ),
            args.repeat,
            warmup=3,
        )
        print(
            f"| {rows} | {full * 1e3:.1f} ms | {full / rows * 1e3:.1f} ms | {block * 1e3:.2f} ms "
            f"| {block / rows * 1e3:.2f} ms |"
        )


if __name__ == "__main__":
    main()
