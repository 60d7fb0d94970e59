"""A refresh forward with the LM head over every fed column vs over the block's columns only.

(`logit_columns`: the last layer's residual and MLP run at those columns too; its keys and
values, which the cache keeps, at every column.)

    python benchmarks/lm_head_columns.py --threads 2

A cache refresh (every cache policy's first step of a block, and every step without a cache)
feeds the whole sequence but reads the logits of one block. Times that forward both ways, in
alternation (fastest of --repeats), on the bundled model and on random LLaDA-shaped models with
LLaDA's vocabulary (126,464), and prints the logits' size both ways; the block's logits are
compared first (float64: the same math; the GEMMs over fewer rows may round differently).
"""

from __future__ import annotations

import argparse
import time

import torch
from shapes import add_llada_shape_flags, llada_raw_config

from workers import Engine
from workers.kv_cache import KVCache
from workers.models.llada import LLaDAConfig, LLaDAModel


def random_model(args: argparse.Namespace, dtype: torch.dtype) -> LLaDAModel:
    torch.manual_seed(0)
    model = LLaDAModel(LLaDAConfig.from_dict(llada_raw_config(args)))
    return model.to(dtype).eval().requires_grad_(False)


def inputs(model, rows: int, length: int) -> dict:
    """A refresh forward's arguments: random ids over `length` columns filling a cache."""
    cache = KVCache(model.config, "cpu", model.lm_head_weight.dtype)
    cache.reserve(rows, length)
    return dict(
        input_ids=torch.randint(0, model.config.vocab_size - 1, (rows, length)),
        positions=torch.arange(length)[None].expand(rows, length),
        cache=cache,
    )


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--length", type=int, default=288, help="fed tokens: prompt + gen_length")
    ap.add_argument("--block", type=int, default=32)
    add_llada_shape_flags(ap, d_model=1024, heads=8, layers=4, mlp=2816, vocab=126464)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block = slice(args.length - 256, args.length - 256 + args.block)

    check = random_model(args, torch.float64)
    fed = inputs(check, 2, args.length)
    every = check(**fed)[:, block]
    only = check(**fed, logit_columns=block)
    agree = torch.equal(every.argmax(-1), only.argmax(-1))
    print(
        f"float64 block logits: largest difference {(every - only).abs().max():.1e}, "
        f"argmax agree {agree}"
    )
    del check

    models = {
        "bundled (d 192, vocab 263)": Engine.from_pretrained(None).model,
        f"LLaDA-shaped (d {args.d_model}, {args.layers} layers, vocab {args.vocab})": random_model(
            args, torch.float32
        ),
    }
    print(
        f"\nfloat32, {args.threads} threads, {args.length} fed tokens, logits of "
        f"{args.block}; fastest of {args.repeats}\n"
    )
    print(
        "| model | rows | every column ms | block only ms | speed-up | logits MB: every / block |"
    )
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        vocab = model.config.vocab_size
        for rows in (1, 4):
            fed = inputs(model, rows, args.length)
            best = {"every": float("inf"), "block": float("inf")}
            for _ in range(args.repeats):
                for mode, columns in (("every", None), ("block", block)):
                    model(**fed, logit_columns=columns)  # warm
                    begin = time.perf_counter()
                    model(**fed, logit_columns=columns)
                    best[mode] = min(best[mode], time.perf_counter() - begin)
            mb = [rows * n * vocab * 4 / 2**20 for n in (args.length, args.block)]
            print(
                f"| {name} | {rows} | {best['every'] * 1e3:.1f} | {best['block'] * 1e3:.1f} | "
                f"{best['every'] / best['block']:.2f}x | {mb[0]:.1f} / {mb[1]:.1f} |"
            )


if __name__ == "__main__":
    main()
