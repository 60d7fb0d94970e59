"""dinfer-batch (default concurrency, one worker) vs one-at-a-time in-process generation, same run.

    python benchmarks/batch_speed.py --prompts 256

Both use the default decoder and cache at --gen-length; tokens count answer tokens before EOS.
dinfer-batch's time includes starting its worker process.
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    params = SamplingParams(gen_length=args.gen_length)

    engine = Engine.from_pretrained(None)
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


if __name__ == "__main__":
    main()
