"""Tokens/s through the async client (one worker process) vs the in-process Engine, same run.

    python benchmarks/client_speed.py --prompts 64

1 stream: requests one after another; 16 streams: 16 concurrent requests. Tokens count answer
tokens before EOS. Also the median time to first chunk through the client.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import anyio
import torch

from dinfer_async import Client, SamplingParams
from workers import Engine
from workers.bundled import tasks


def engine_rate(engine, messages, params, concurrency):
    """The same work as the client path minus the processes: chat template, tokenize, generate."""
    engine.max_batch_size = concurrency
    begin = time.perf_counter()
    prompts = [engine.encode(messages=m) for m in messages]
    if concurrency == 1:
        results = [engine.generate([p], params)[0] for p in prompts]
    else:
        results = engine.generate(prompts, params)
    return sum(r.stats.tokens for r in results) / (time.perf_counter() - begin)


async def client_rate(client, messages, params, concurrency):
    tokens, first = 0, []
    limiter = anyio.Semaphore(concurrency)

    async def one(m):
        nonlocal tokens
        async with limiter:
            start, seen = time.perf_counter(), False
            async for chunk in client.stream(messages=m, params=params):
                if not seen:
                    first.append(time.perf_counter() - start)
                    seen = True
                if chunk.finish_reason:
                    tokens += chunk.stats["tokens"]

    begin = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for m in messages:
            tg.start_soon(one, m)
    return tokens / (time.perf_counter() - begin), statistics.median(first)


async def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    messages = [ex.messages for ex in examples]

    engine = Engine.from_pretrained(args.model)
    engine_rate(engine, messages[:4], params, 1)  # warm-up
    rows = []
    for concurrency in (1, 16):
        local = engine_rate(engine, messages, params, concurrency)
        async with Client(
            model=args.model, workers=1, threads=args.threads, max_batch_size=16
        ) as client:
            await client.generate(messages=messages[0], params=params)  # warm-up
            remote, ttfc = await client_rate(client, messages, params, concurrency)
        rows.append((concurrency, local, remote, ttfc))
    print(
        f"\n{len(messages)} held-out prompts, gen_length {args.gen_length}, block_length "
        f"{args.block_length}, "
        f"default decoder/cache, {args.threads} CPU threads\n"
    )
    print(
        "| streams | in-process Engine tok/s | Client tok/s | Client / Engine | median time to "
        "first chunk |"
    )
    print("|---|---|---|---|---|")
    for c, local, remote, ttfc in rows:
        print(
            f"| {c} | {local:.1f} | {remote:.1f} | {remote / local:.2f}x | {ttfc * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    asyncio.run(main())
