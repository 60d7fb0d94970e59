"""Requests arriving while others run: rows joining running rounds vs waiting for them to end.

    python benchmarks/arrivals.py [--requests 64] [--rate 1] [--gen-length 64] [--repeats 3]
    python benchmarks/arrivals.py --device cuda --decoder fixed --steps 32   # on a GPU

A streaming Scheduler (what a worker serves with) over the bundled model (or --model) gets
held-out prompts at --rate a scheduler step (prompt i before step i / rate), default
SamplingParams at --gen-length (--decoder, --steps to change them), and runs until all are
done, with `joins` on (the default) and off, alternating --repeats times. Per request: steps
and seconds from arrival to its first update (time to first token) and to its finish; for the
run: scheduler steps, rounds, wall seconds and answer tokens per second (best of the repeats).
Answers are checked identical. Steps do not depend on the machine's load; seconds do.
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


def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams, rate: float):
    """One run: prompt i arrives before step i / rate (or when the scheduler is idle)."""
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
                len(arrived) <= step * rate or not sched.has_work()
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
    ap.add_argument("--rate", type=float, default=1.0, help="arrivals per scheduler step")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--decoder", default="threshold")
    ap.add_argument("--steps", type=int, default=None, help="decoding steps (fixed decoder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    examples = tasks.held_out(-(-args.requests // len(tasks.TASKS)))[: args.requests]
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    extra = {} if args.steps is None else {"steps": args.steps}
    params = SamplingParams(gen_length=args.gen_length, decoder=args.decoder, **extra)
    serve(engine, prompts[:8], params, args.rate)  # warm up
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeats):
        for joins in (False, True):
            engine.joins = joins
            runs[joins].append(serve(engine, prompts, params, args.rate))
    same = all(r["answers"] == runs[False][0]["answers"] for rs in runs.values() for r in rs)
    print(
        f"\n{args.requests} held-out prompts, {args.rate:g} a scheduler step, "
        f"{args.decoder} decoder{'' if args.steps is None else f' ({args.steps} steps)'}, "
        f"gen_length {args.gen_length}, {args.dtype}, "
        f"{f'{args.threads} CPU threads' if args.device == 'cpu' else args.device}, "
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
