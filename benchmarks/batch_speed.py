"""dinfer-batch (default concurrency, one worker) vs one-at-a-time in-process generation, same run.

    python benchmarks/batch_speed.py --prompts 256
    python benchmarks/batch_speed.py --prompts 64 --engine-only --repeats 3   # issue 15 item 5a

Both use the default decoder and cache at --gen-length; tokens count answer tokens before EOS.
dinfer-batch's time includes starting its worker process. The engine table runs the same
prompts through `Engine.generate` one at a time and --per-call at a time, with one lockstep
round per block (split_overhead=0, the layout before issue 15), with cohorts and row chunks,
and with those and rows joining running rounds (the default, Scheduler(joins=)),
interleaved --repeats times (best time of each kept: the machine is shared), answers checked
identical; padding waste is the fraction of token slots fed through the model that were padding;
scheduler steps (one forward each, a refresh in row chunks on a CPU, plus the joining rows'
first step where rows join) are what a GPU's time goes with, its block forwards being
launch-bound: the two GPU-layout rows (its defaults, no cohorts or chunks) count them there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dinfer_async import SamplingParams
from workers import Engine
from workers.bundled import tasks


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-call", type=int, default=16, help="prompts per Engine.generate call")
    ap.add_argument("--repeats", type=int, default=3, help="engine table: interleaved repeats")
    ap.add_argument("--engine-only", action="store_true", help="skip dinfer-batch")
    ap.add_argument("--decoder", default=None, help="engine table: this decoder (else default)")
    ap.add_argument("--steps", type=int, default=None, help="engine table: decoding steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    params = SamplingParams(gen_length=args.gen_length)
    chosen = {"decoder": args.decoder, "steps": args.steps}
    table_params = SamplingParams(
        gen_length=args.gen_length, **{k: v for k, v in chosen.items() if v is not None}
    )

    engine = Engine.from_pretrained(None)
    engine_table(engine, examples, table_params, args)
    if args.engine_only:
        return
    begin = time.perf_counter()
    results = [engine.generate([engine.encode(messages=ex.messages)], params)[0] for ex in examples]
    alone_s = time.perf_counter() - begin
    alone_tokens = sum(r.stats.tokens for r in results)
    alone_acc = tasks.accuracy_table(examples, [r.text for r in results])["all"]

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_text(
            "".join(
                json.dumps({"id": i, "messages": ex.messages}) + "\n"
                for i, ex in enumerate(examples)
            )
        )
        begin = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dinfer_async.batch",
                str(src),
                str(dst),
                "--gen-length",
                str(args.gen_length),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
        )
        batch_s = time.perf_counter() - begin
        assert proc.returncode == 0, proc.stderr
        out = [json.loads(line) for line in dst.read_text().splitlines()]
    batch_tokens = sum(o["stats"]["tokens"] for o in out)
    batch_acc = tasks.accuracy_table(examples, [o["text"] for o in out])["all"]

    print(
        f"\n{len(examples)} held-out prompts, gen_length {args.gen_length}, default "
        f"decoder/cache, {args.threads} CPU threads\n"
    )
    print("| mode | seconds | tokens/s | accuracy |")
    print("|---|---|---|---|")
    print(
        f"| in-process Engine, one request at a time | {alone_s:.1f} | "
        f"{alone_tokens / alone_s:.1f} | {alone_acc[0]}/{alone_acc[1]} |"
    )
    print(
        f"| dinfer-batch, default --max-concurrency (64) | {batch_s:.1f} | "
        f"{batch_tokens / batch_s:.1f} | {batch_acc[0]}/{batch_acc[1]} |"
    )
    print(f"\nratio: {batch_tokens / batch_s / (alone_tokens / alone_s):.2f}x")
    print(proc.stderr.strip().splitlines()[-1])


def engine_table(engine: Engine, examples, params: SamplingParams, args) -> None:
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    n = args.per_call
    engine.generate(prompts[:n], params)  # warm up

    def calls(size: int, split: float | None, chunk: int | None, joins: bool):
        engine.split_overhead, engine.chunk_slots, engine.joins = split, chunk, joins
        results, fed, real, steps = [], 0, 0, 0
        for i in range(0, len(prompts), size):
            results += engine.generate(prompts[i : i + size], params)
            fed += engine.last_run["tokens_fed"]
            real += engine.last_run["tokens_real"]
            steps += int(engine.last_run["steps"])
        return results, 1 - real / max(fed, 1), steps

    modes = {
        "one at a time": (1, None, None, True),
        f"{n} per call, one round per block, one forward a step": (n, 0, 0, False),
        f"{n} per call, cohorts only": (n, None, 0, False),
        f"{n} per call, row-chunked full forwards only": (n, 0, None, False),
        f"{n} per call, cohorts + chunks, no joins (before)": (n, None, None, False),
        f"{n} per call, cohorts + chunks + joins (default)": (n, None, None, True),
        f"{n} per call, GPU layout (no cohorts, no chunks), no joins": (n, 0, 0, False),
        f"{n} per call, GPU layout, joins (GPU default)": (n, 0, 0, True),
    }
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    waste: dict[str, float] = {}
    steps: dict[str, int] = {}
    answers: dict[str, list[list[int]]] = {}
    tokens = 0
    for _ in range(args.repeats):
        for name, (size, split, chunk, joins) in modes.items():
            begin, begin_cpu = time.perf_counter(), time.process_time()
            results, waste[name], steps[name] = calls(size, split, chunk, joins)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - begin)
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - begin_cpu)
            answers[name] = [r.token_ids for r in results]
            tokens = sum(r.stats.tokens for r in results)
    first = next(iter(modes))
    same = all(a == answers[first] for a in answers.values())
    print(
        f"\nEngine.generate: {len(prompts)} held-out prompts, gen_length {args.gen_length}, "
        f"decoder {params.decoder} (steps {params.steps}), cache {params.cache}, "
        f"{args.threads} CPU threads, best of {args.repeats}; "
        f"answers identical in every mode: {same}\n"
    )
    print(
        "| mode | seconds | tokens/s | vs one at a time | CPU seconds | vs one at a time, CPU "
        "| padding waste | scheduler steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in modes:
        print(
            f"| {name} | {best[name]:.2f} | {tokens / best[name]:.1f} | "
            f"{best[first] / best[name]:.2f}x | {cpu[name]:.2f} | {cpu[first] / cpu[name]:.2f}x "
            f"| {100 * waste[name]:.1f}% | {steps[name]} |"
        )
    assert same, "answers differ between modes"


if __name__ == "__main__":
    main()
