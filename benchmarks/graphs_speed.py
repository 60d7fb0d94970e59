"""Graph-captured block steps (issue 15 item 1, workers/graphs.py): the engine with
cuda_graphs off vs on, same prompts, same run: tokens identical, seconds per forward, tokens/s.

    python benchmarks/graphs_speed.py --device cuda [--dtype bfloat16] [--llada8b]
    python benchmarks/graphs_speed.py --device cpu --prompts 4   # static mode (no capture)

Rows: the bundled model per decoder x cache configuration (batch 1, then all prompts in one
call), and with --llada8b an LLaDA-8B-shaped model (random bf16 weights; prompt 128, gen_length
256, block 32, batch 1 and 16). "on" is CUDA graphs on a GPU and static mode elsewhere. Each
timed call follows two untimed ones with the same prompts (captures happen there: a key is
captured the second time it is met), so the timed one replays. Exit status 1 if any tokens
differ (the last column says how the "on" steps ran: replayed, captured, static, eager).
"""

from __future__ import annotations

import argparse
import time

import torch
from shapes import llada8b

from dinfer_async import SamplingParams
from workers import Engine
from workers.bundled import MODEL_DIR, tasks
from workers.tokenizer import load_tokenizer


def timed_generate(engine, prompts, params, sync, repeat=1):
    # warm-up, twice: compiles, the allocator settles, and with graphs a key is captured the
    # second time it is met, so the timed call replays
    for _ in range(2):
        engine.generate(prompts, params)
    sync()
    begin = time.perf_counter()
    for _ in range(repeat):
        results = engine.generate(prompts, params)
    sync()
    return results, (time.perf_counter() - begin) / repeat, dict(engine.last_run)


def compare(name, model, tokenizer, prompts, params, batch, sync) -> bool:
    """One table row per batch size: off vs on."""
    rows = []
    for mode in ("off", "on"):
        engine = Engine(model, tokenizer, max_batch_size=batch, cuda_graphs=mode)
        results, seconds, stats = [], 0.0, {}
        for i in range(0, len(prompts), batch):
            r, s, st = timed_generate(engine, prompts[i : i + batch], params, sync)
            results += r
            seconds += s
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v
        forwards = sum(r.stats.forwards for r in results) / batch
        tokens = sum(len(r.token_ids) for r in results)
        rows.append(([r.token_ids for r in results], seconds, forwards, tokens, stats))
    (t_off, s_off, f_off, n_off, _), (t_on, s_on, f_on, _, st) = rows
    same = t_off == t_on
    print(
        f"| {name} | {batch} | {'yes' if same else 'NO'} | {s_off / f_off * 1e3:.2f} | "
        f"{s_on / f_on * 1e3:.2f} | {n_off / s_off:.0f} | {n_off / s_on:.0f} | "
        f"{s_off / s_on:.2f}x | {st.get('steps_replayed', 0)}/{st.get('steps_captured', 0)}/"
        f"{st.get('steps_static', 0)}/{st.get('steps_eager', 0)} |",
        flush=True,
    )
    return same


HEADER = (
    "| model, config | batch | tokens identical | ms/forward off | ms/forward on | tokens/s off "
    "| tokens/s on | speedup | steps replayed/captured/static/eager (on) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument(
        "--configs",
        default="threshold:dual,fixed:dual,threshold:prefix,"
        "threshold:vicinity,fixed:none,hierarchical:dual",
    )
    ap.add_argument("--llada8b", action="store_true", help="also the LLaDA-8B-shaped model")
    args = ap.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    engine = Engine.from_pretrained(None, device=args.device, dtype=args.dtype)
    per_task = -(-args.prompts // len(tasks.TASKS))
    examples = tasks.held_out(per_task)[: args.prompts]
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    print(
        f"\nbundled model, {args.dtype}, {args.device}, {len(prompts)} prompts, "
        f"gen_length {args.gen_length}, block 32; 'on': cuda_graphs=True\n{HEADER}"
    )
    ok = True
    for config in args.configs.split(","):
        decoder, cache = config.split(":")
        steps = dict(steps=args.gen_length // 2) if decoder == "fixed" else {}
        params = SamplingParams(
            gen_length=args.gen_length, block_length=32, decoder=decoder, cache=cache, **steps
        )
        for batch in (1, len(prompts)):
            ok &= compare(config, engine.model, engine.tokenizer, prompts, params, batch, sync)
    if args.llada8b:
        model = llada8b(args.device)
        g = torch.Generator().manual_seed(0)
        random_prompts = [torch.randint(0, 125000, (128,), generator=g).tolist() for _ in range(16)]
        params = SamplingParams(
            gen_length=256,
            block_length=32,
            decoder="fixed",
            steps=64,
            cache="dual",
            early_stop=False,
        )
        print(
            f"\nLLaDA-8B shape (random weights, bf16): prompt 128, gen 256, block 32, fixed "
            f"64 steps, dual cache\n{HEADER}"
        )
        tok = load_tokenizer(MODEL_DIR)  # only decodes; random weights make no real text
        for batch in (1, 16):
            ok &= compare("8B fixed:dual", model, tok, random_prompts[:batch], params, batch, sync)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
