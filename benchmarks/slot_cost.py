"""A forward's cost per token slot by rows and length: the basis of the CPU chunk size.

    python benchmarks/slot_cost.py --threads 1

Times the bundled model's full forward (filling a cache) and a 32-token block forward over the
cache, at 1 to 16 rows of 100 and 300 tokens, in CPU seconds of this process (steadier than wall
time on a shared machine with one thread), best of --repeats.
"""

from __future__ import annotations

import argparse
import time

import torch

from workers import Engine
from workers.kv_cache import KVCache


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Engine.from_pretrained(None).model
    best: dict[tuple[int, int, str], float] = {}
    for _ in range(args.repeats):
        for length in (100, 300):
            for rows in (1, 2, 4, 8, 16):
                ids = torch.randint(0, 200, (rows, length))
                positions = torch.arange(length)[None].expand(rows, length)
                real = torch.ones(rows, length, dtype=torch.bool)
                real[0, :5] = False
                cache = KVCache(model.config, "cpu", torch.float32)
                cache.reserve(rows, length)
                for kind, (lo, hi) in {"full": (0, length), "block": (40, 72)}.items():
                    fed = (ids[:, lo:hi], positions[:, lo:hi], real)
                    model(*fed, cache=cache, start=lo)
                    begin = time.process_time()
                    model(*fed, cache=cache, start=lo)
                    model(*fed, cache=cache, start=lo)
                    key = (length, rows, kind)
                    best[key] = min(best.get(key, float("inf")), (time.process_time() - begin) / 2)
    print("| forward | rows | ms | us per token slot |")
    print("|---|---|---|---|")
    for (length, rows, kind), seconds in sorted(best.items(), key=lambda x: (x[0][2], x[0][:2])):
        slots = rows * (length if kind == "full" else 32)
        name = f"full, {length} tokens" if kind == "full" else f"32-token block over {length}"
        print(f"| {name} | {rows} | {seconds * 1e3:.2f} | {seconds / slots * 1e6:.1f} |")


if __name__ == "__main__":
    main()
