"""Padding or packing for a batch of requests with different prompt lengths: measured, then chosen.

    python benchmarks/padding_vs_packing.py --batch 16 --gen-length 256

The scheduler pads: each round lays its rows out left-padded, current blocks sharing columns,
padding hidden by a key mask. The alternative packs every row into one sequence and separates
them with a block-diagonal mask. This script runs a block's first (full) forward both ways on
the same held-out prompts and prints the real-token fraction of the padded layout and the time
of each. On CPU the attention is the torch reference, so packing pays for a [total, total] mask;
a varlen GPU attention kernel would not, which is why the choice is re-measured per device.
"""

from __future__ import annotations

import argparse

import torch
from timing import seconds_per_call

from workers import Engine
from workers.bundled import tasks


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, dtype="float32")
    model, mask_id = engine.model, engine.config.mask_token_id
    examples = tasks.held_out(per_task=-(-args.batch // len(tasks.TASKS)))[: args.batch]
    rows = [engine.encode(messages=ex.messages) + [mask_id] * args.gen_length for ex in examples]
    lengths = [len(r) for r in rows]
    B, L, total = len(rows), max(lengths), sum(lengths)

    ids = torch.full((B, L), mask_id)
    real = torch.zeros(B, L, dtype=torch.bool)
    positions = torch.zeros(B, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r)
        real[i, L - len(r) :] = True
        positions[i, L - len(r) :] = torch.arange(len(r))

    packed = torch.tensor([t for r in rows for t in r])[None]
    packed_positions = torch.cat([torch.arange(n) for n in lengths])[None]
    owner = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))
    block_diagonal = (owner[:, None] == owner[None, :])[None]  # [1, total, total]

    padded_s = seconds_per_call(lambda: model(ids, positions, real), args.repeat)
    packed_s = seconds_per_call(
        lambda: model(packed, packed_positions, block_diagonal), args.repeat
    )
    print(
        f"{B} held-out prompts + gen_length {args.gen_length}: lengths "
        f"{min(lengths)}..{max(lengths)}, "
        f"{args.threads} CPU threads, float32\n"
    )
    print("| layout | tokens computed | real fraction | forward ms | tokens/s (real) |")
    print("|---|---|---|---|---|")
    print(
        f"| padded (used) | {B * L} | {total / (B * L):.3f} | {padded_s * 1e3:.1f} | "
        f"{total / padded_s:,.0f} |"
    )
    print(
        f"| packed, block-diagonal mask | {total} | 1.000 | {packed_s * 1e3:.1f} | "
        f"{total / packed_s:,.0f} |"
    )


if __name__ == "__main__":
    main()
