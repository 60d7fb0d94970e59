"""Requests arriving while others run: rows joining running rounds vs waiting for them to end.

    python benchmarks/arrivals.py [--requests 64] [--every 2] [--gen-length 64] [--repeats 3]

A streaming Scheduler (what a worker serves with) over the bundled model (or --model) gets one
held-out prompt every --every scheduler steps, default SamplingParams at --gen-length
(--decoder to change it), and runs until all are done, with `joins` on (the default) and off,
alternating --repeats times. Per request: steps and seconds from arrival to its first update
(time to first token) and to its finish; for the run: scheduler steps, rounds, wall seconds and
answer tokens per second (best of the repeats). Answers are checked identical. Steps do not
depend on the machine's load; seconds do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinfer_async import SamplingParams
from workers import Engine
from workers.bundled import tasks
from workers.scheduler import Finished, StepUpdate


def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams, every: int):
    """One run: prompt i arrives before step i * every (or when the scheduler is idle)."""
    sched = engine.new_scheduler()
    arrived: dict[int, tuple[int, float]] = {}
    first: dict[int, tuple[int, float]] = {}
    done: dict[int, tuple[int, float]] = {}
    answers: dict[int, list[int]] = {}
    step = 0
    begin = time.perf_counter()
    with torch.no_grad():
        while len(done) < len(prompts):
            while len(arrived) < len(prompts) and (
                len(arrived) * every <= step or not sched.has_work()
            ):
                i = len(arrived)
                sched.add(i, prompts[i], params, i)
                arrived[i] = (step, time.perf_counter())
            out = sched.step()
            step += 1
            now = time.perf_counter()
            for u in out:
                i = u.seq.id
                if isinstance(u, StepUpdate) and i not in first:
                    first[i] = (step, now)
                if isinstance(u, Finished):
                    done[i] = (step, now)
                    answers[i] = u.seq.answer(engine.config.eos_token_id)
    seconds = time.perf_counter() - begin
    wait = lambda end: [end[i][0] - arrived[i][0] for i in arrived]
    wait_s = lambda end: [end[i][1] - arrived[i][1] for i in arrived]
    tokens = sum(map(len, answers.values()))
    return {
        "steps": step,
        "rounds": sched.rounds,
        "joined": sched.joined,
        "first_steps": wait(first),
        "first_s": wait_s(first),
        "finish_steps": wait(done),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "answers": [answers[i] for i in range(len(prompts))],
    }


def quantiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10)
    return f"{statistics.mean(values):.2f} / {q[4]:.2f} / {q[8]:.2f}"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="a local model directory (default: bundled)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--every", type=int, default=2, help="scheduler steps between arrivals")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--decoder", default="threshold")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model)
    examples = tasks.held_out(-(-args.requests // len(tasks.TASKS)))[: args.requests]
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    params = SamplingParams(gen_length=args.gen_length, decoder=args.decoder)
    serve(engine, prompts[:8], params, args.every)  # warm up
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):
        for joins in (False, True):
            engine.joins = joins
            runs[joins].append(serve(engine, prompts, params, args.every))
    same = all(r["answers"] == runs[False][0]["answers"] for rs in runs.values() for r in rs)
    print(
        f"\n{args.requests} held-out prompts, one every {args.every} scheduler steps, "
        f"{args.decoder} decoder, gen_length {args.gen_length}, {args.threads} threads, "
        f"best of {args.repeats}; answers identical: {same}\n"
    )
    print(
        "| rows join running rounds | steps | rounds | joins | steps to first update "
        "(mean / p50 / p90) | steps to finish (mean / p50 / p90) | seconds to first update "
        "(mean / p50 / p90) | seconds | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for joins in (False, True):
        best = min(runs[joins], key=lambda r: r["seconds"])
        print(
            f"| {'yes (default)' if joins else 'no (before)'} | {best['steps']} | "
            f"{best['rounds']} | {best['joined']} | {quantiles(best['first_steps'])} | "
            f"{quantiles(best['finish_steps'])} | {quantiles(best['first_s'])} | "
            f"{best['seconds']:.2f} | {best['tokens_per_s']:.1f} |"
        )
    assert same, "answers differ between joins on and off"


if __name__ == "__main__":
    main()
