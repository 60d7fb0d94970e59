"""Tokens/s through the async client (one worker process) vs the in-process Engine, same run.

    python benchmarks/client_speed.py --prompts 64 --repeats 5

The prompts go in groups of `--streams` (16). In-process: one `Engine.generate` call per group
(chat template and tokenization included). Through the SDK: the group's requests as that many
concurrent `Client` streams, the next group once all of them ended. With `--streams 1` both do
one request at a time. Engine and client alternate group by group, so the machine's load drifts
over both alike: each group gives one ratio (the same requests, seconds apart), and the table
shows their median and quartiles (on a shared machine the load swings within seconds, so the
totals' ratio is noisier).

Tokens count answer tokens before EOS. CPU seconds: this process's while the Engine runs; while
the client runs, the client's + the worker process's (read from Linux /proc). Also the median
time to first chunk and how many answers agree (temperature 0: the same tokens unless a float32
batch of a different composition rounds differently).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from dinfer_async import Client, SamplingParams
from workers import Engine
from workers.bundled import tasks


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (0.0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Tally:
    def __init__(self) -> None:
        self.tokens, self.seconds, self.cpu, self.worker_cpu = 0, 0.0, 0.0, 0.0
        self.texts: list[str] = []


def engine_group(engine: Engine, messages: list, params: SamplingParams, tally: Tally) -> None:
    begin, cpu = time.perf_counter(), time.process_time()
    prompts = [engine.encode(messages=m) for m in messages]
    results = engine.generate(prompts, params)
    tally.seconds += time.perf_counter() - begin
    tally.cpu += time.process_time() - cpu
    tally.tokens += sum(r.stats.tokens for r in results)
    tally.texts += [r.text for r in results]


async def client_group(
    client: Client, worker_pid: int, messages: list, params: SamplingParams, tally: Tally,
    first: list[float],
) -> None:  # fmt: skip
    async def one(m: list) -> tuple[str, int]:
        start, seen, text, tokens = time.perf_counter(), False, [], 0
        async for chunk in client.stream(messages=m, params=params):
            if not seen:
                first.append(time.perf_counter() - start)
                seen = True
            text.append(chunk.stable_text)
            if chunk.finish_reason:
                tokens = chunk.stats["tokens"]
        return "".join(text), tokens

    begin, cpu, worker = time.perf_counter(), time.process_time(), cpu_seconds(worker_pid)
    done = await asyncio.gather(*(one(m) for m in messages))
    tally.seconds += time.perf_counter() - begin
    tally.cpu += time.process_time() - cpu
    tally.worker_cpu += cpu_seconds(worker_pid) - worker
    tally.tokens += sum(t for _, t in done)
    tally.texts += [t for t, _ in done]


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    messages = [ex.messages for ex in examples]
    batch = max(args.streams)
    engine = Engine.from_pretrained(args.model, max_batch_size=batch)
    rows = []
    async with Client(
        model=args.model, workers=1, threads=args.threads, max_batch_size=batch
    ) as client:
        welcome = client.welcome
        pid = welcome.pid if welcome is not None else 0
        for group in ([messages[0]], messages[:batch]):  # warm-up, both sides, both sizes
            engine_group(engine, group, params, Tally())
            await client_group(client, pid, group, params, Tally(), [])
        for streams in args.streams:
            ratios, local, remote, first = [], Tally(), Tally(), []
            for _ in range(args.repeats):
                for g in range(0, len(messages), streams):
                    group = messages[g : g + streams]
                    e, c = Tally(), Tally()
                    engine_group(engine, group, params, e)
                    await client_group(client, pid, group, params, c, first)
                    ratios.append((c.tokens / c.seconds) / (e.tokens / e.seconds))
                    for total, one in ((local, e), (remote, c)):
                        total.tokens += one.tokens
                        total.seconds += one.seconds
                        total.cpu += one.cpu
                        total.worker_cpu += one.worker_cpu
                        total.texts += one.texts
            same = sum(a == b for a, b in zip(local.texts, remote.texts))
            rows.append((streams, local, remote, ratios, statistics.median(first), same))
    print(
        f"\n{len(messages)} held-out prompts x {args.repeats} repeats, gen_length "
        f"{args.gen_length}, block_length {args.block_length}, default decoder/cache, "
        f"{args.threads} CPU threads\n"
    )
    print(
        "| streams | Engine tok/s | Client tok/s | Client / Engine per group: median [quartiles] | "
        "CPU s per 1k tokens: Engine | Client + worker | median first chunk | same answers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for streams, e, c, ratios, ttfc, same in rows:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"| {streams} | {e.tokens / e.seconds:.1f} | {c.tokens / c.seconds:.1f} | "
            f"{statistics.median(ratios):.2f}x [{q1:.2f}, {q3:.2f}] | "
            f"{1000 * e.cpu / e.tokens:.2f} | {1000 * c.cpu / c.tokens:.2f} + "
            f"{1000 * c.worker_cpu / c.tokens:.2f} | "
            f"{ttfc * 1000:.0f} ms | {same}/{len(e.texts)} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
