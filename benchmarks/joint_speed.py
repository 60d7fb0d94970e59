"""LLaDA2.1's joint decoder (token editing) against the threshold decoder at the same
mask-to-token threshold, on the bundled model's held-out prompts.

    python benchmarks/joint_speed.py --per-task 100 --gen-length 64

For each of the two published presets (dinfer_async.params.JOINT_PRESETS: "speedy" and
"quality"), runs `threshold` at the preset's M2T threshold and `joint` with the preset, and prints
exact-match accuracy per task (workers/bundled/tasks.py: held_out, is_correct), tokens per forward
(committed positions per model call, edits not counted), forwards and edits per answer, and the
wall time. The bundled model is a LLaDA (bidirectional) trained without token editing: the joint
decoder runs on it as an option, so this measures the algorithm, not LLaDA2.1.
"""

from __future__ import annotations

import argparse
import time

import torch

from dinfer_async import SamplingParams
from dinfer_async.params import JOINT_PRESETS
from workers import Engine
from workers.bundled import tasks


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--cache", default="dual")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_pretrained(args.model, dtype="float32", max_batch_size=args.batch)
    examples = tasks.held_out(args.per_task)
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    common = dict(
        gen_length=args.gen_length, block_length=args.block_length, cache=args.cache, seed=0
    )
    runs = []
    for preset, values in JOINT_PRESETS.items():
        tau = values["threshold"]
        runs.append(
            (f"threshold {tau}", SamplingParams(decoder="threshold", threshold=tau, **common))
        )
        runs.append(
            (
                f"joint {preset} ({tau}, edit {values['edit_threshold']})",
                SamplingParams.preset(preset, **common),
            )
        )

    # edits only while masks remain: how much of the change the edit rounds make
    runs.append(
        (
            "joint quality, max_edit_steps 0",
            SamplingParams.preset("quality", max_edit_steps=0, **common),
        )
    )
    names = sorted(tasks.TASKS) + ["all"]
    print(
        f"\n{engine.name}, {args.per_task} held-out prompts per task, gen_length "
        f"{args.gen_length}, block_length {args.block_length}, cache {args.cache}, float32\n"
    )
    print(
        "| decoder | "
        + " | ".join(names)
        + " | tokens/forward | forwards/answer | edits/answer | seconds |"
    )
    print("|---" * (len(names) + 5) + "|")
    for name, params in runs:
        begin = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = time.perf_counter() - begin
        table = tasks.accuracy_table(examples, [r.text for r in results])
        forwards = sum(r.stats.forwards for r in results)
        committed = sum(r.stats.committed for r in results)
        edits = sum(r.stats.edits for r in results)
        cells = [f"{100 * table[n][0] / table[n][1]:.1f}%" for n in names]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {committed / forwards:.2f} | {forwards / len(results):.1f}"
            + f" | {edits / len(results):.2f} | {seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
