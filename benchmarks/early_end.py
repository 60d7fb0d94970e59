"""Forwards saved by ending a block once its answer is final (BlockRound._answer_final).

    python benchmarks/early_end.py --prompts 96

Each decoder runs the held-out prompts one at a time (gen_length 256, block 32, dual cache, early
stop on), once as the engine does and once with the early end switched off (the block then runs
until its decoder is done, as before); prints the forwards, whether every answer is identical,
and the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import torch

from dinfer_async.params import SamplingParams
from workers import Engine
from workers.bundled import tasks
from workers.iteration import BlockRound

DECODERS = {
    "threshold": {},
    "credit": {},
    "hierarchical": {},
    "factor": {},
    "fixed": dict(steps=64),
}


def never_final(self: BlockRound, block: torch.Tensor, still_masked: torch.Tensor) -> torch.Tensor:
    return torch.zeros(block.shape[0], dtype=torch.bool, device=block.device)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(None)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    print(
        f"bundled model, {len(prompts)} held-out prompts one at a time, gen_length "
        f"{args.gen_length}, block 32, dual cache, early stop\n"
    )
    print("| decoder | forwards, early end off | on | answers identical | seconds off | on |")
    print("|---|---|---|---|---|---|")
    for decoder, extra in DECODERS.items():
        params = SamplingParams(gen_length=args.gen_length, decoder=decoder, **extra)
        runs = {}
        for on in (False, True):
            with contextlib.ExitStack() as stack:
                if not on:
                    stack.enter_context(mock.patch.object(BlockRound, "_answer_final", never_final))
                begin = time.perf_counter()
                results = [engine.generate([p], params)[0] for p in prompts]
                runs[on] = (results, time.perf_counter() - begin)
        (off, t_off), (on_, t_on) = runs[False], runs[True]
        same = [r.token_ids for r in off] == [r.token_ids for r in on_]
        forwards = [sum(r.stats.forwards for r in rs) for rs in (off, on_)]
        print(f"| {decoder} | {forwards[0]} | {forwards[1]} | {same} | {t_off:.2f} | {t_on:.2f} |")


if __name__ == "__main__":
    main()
