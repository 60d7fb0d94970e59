"""Per-task exact-match accuracy of the bundled model on held-out prompts.

    python benchmarks/bundled_accuracy.py --per-task 100 --gen-length 64

Runs the reference sampler (LLaDA's, steps = gen_length, no cache) and, for comparison, the
engine with its default configuration, on the same prompts; prints one table.
"""

from __future__ import annotations

import argparse
import time

import torch

from dinfer_async import SamplingParams
from workers import Engine
from workers.bundled import tasks
from workers.reference import reference_generate, until_eos


def evaluate(name, examples, generate):
    begin = time.perf_counter()
    texts, forwards = generate()
    seconds = time.perf_counter() - begin
    return name, tasks.accuracy_table(examples, texts), forwards, seconds


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument(
        "--show-errors", type=int, default=0, help="print this many wrong answers per task"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)

    engine = Engine.from_pretrained(args.model, dtype="float32", max_batch_size=args.batch)
    cfg = engine.config
    examples = tasks.held_out(args.per_task)
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    G, K = args.gen_length, args.block_length

    def reference():
        texts, forwards = [], 0
        for lo in range(0, len(prompts), args.batch):
            chunk = prompts[lo : lo + args.batch]
            out, n = reference_generate(
                engine.model,
                chunk,
                mask_id=cfg.mask_token_id,
                eos_id=cfg.eos_token_id,
                gen_length=G,
                block_length=K,
                steps=G,
            )
            forwards += n * len(chunk)
            for window in out:
                texts.append(
                    engine.tokenizer.decode(
                        until_eos(window, cfg.eos_token_id), skip_special_tokens=True
                    )
                )
        return texts, forwards

    def default_engine():
        results = engine.generate(prompts, SamplingParams(gen_length=G, block_length=K))
        return [r.text for r in results], sum(r.stats.forwards for r in results)

    runs = [
        evaluate(f"reference (fixed, steps={G}, no cache)", examples, reference),
        evaluate("engine default (threshold 0.9, dual cache)", examples, default_engine),
    ]

    names = sorted(tasks.TASKS) + ["all"]
    print(
        f"\nbundled model, {args.per_task} held-out prompts per task, gen_length {G}, "
        f"block_length {K}, float32\n"
    )
    print("| sampler | " + " | ".join(names) + " | forwards/prompt | seconds |")
    print("|---" * (len(names) + 3) + "|")
    for name, table, forwards, seconds in runs:
        cells = [f"{100 * table[n][0] / table[n][1]:.1f}%" for n in names]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {forwards / len(examples):.1f} | {seconds:.1f} |"
        )
    if args.show_errors:
        results = engine.generate(prompts, SamplingParams(gen_length=G, block_length=K))
        for task in sorted(tasks.TASKS):
            wrong = [
                (ex, r.text)
                for ex, r in zip(examples, results)
                if ex.task == task and not tasks.is_correct(ex, r.text)
            ]
            for ex, text in wrong[: args.show_errors]:
                print(f"{task}: {ex.prompt!r} -> {text!r} (want {ex.answer!r})")


if __name__ == "__main__":
    main()
