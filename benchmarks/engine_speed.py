"""Every decoder x cache configuration on the bundled model against two baselines in the same run.

    python benchmarks/engine_speed.py --prompts 100 --gen-length 256 --block-length 32
    python benchmarks/engine_speed.py --device cuda --dtype bfloat16   # on a GPU
    python benchmarks/engine_speed.py --json speed.json && python benchmarks/plot.py speed.json

Baselines: (a) LLaDA's reference sampler with steps = gen_length and no cache; (b) Fast-dLLM's
setting re-implemented here as Fast-dLLM runs it: dual cache refreshed at each block start,
threshold 0.9 with at least one commit per step, a float32 softmax over the whole vocabulary at
every block position, and no early stop. Tokens/s counts answer tokens before EOS. Batch 1
throughout, then the fastest configuration at batch 16 (aggregate tokens/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from dinfer_async import SamplingParams
from dinfer_async.params import CACHES, DECODERS
from workers import Engine
from workers.bundled import tasks
from workers.kv_cache import KVCache
from workers.reference import reference_generate
from workers.shared import until_eos


@torch.no_grad()
def fast_dllm_dual(model, prompt: list[int], gen_length: int, block_length: int, tau: float = 0.9):
    """Fast-dLLM's dual-cache threshold decoding for one prompt; returns (window, forwards)."""
    cfg = model.config
    device = model.lm_head_weight.device
    x = torch.tensor([prompt + [cfg.mask_token_id] * gen_length], device=device)
    L, P = x.shape[1], len(prompt)
    positions = torch.arange(L, device=device)[None]
    cache = KVCache(cfg, x.device, model.lm_head_weight.dtype)
    forwards = 0
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        cache.reserve(1, L)
        logits = model(x, positions, None, cache=cache, start=0)[:, lo:hi]
        forwards += 1
        while True:
            masked = x[:, lo:hi] == cfg.mask_token_id
            probs = torch.softmax(logits.float(), dim=-1)
            conf, token = probs.max(dim=-1)
            conf = torch.where(masked, conf, -torch.inf)
            commit = conf > tau
            commit[0, conf[0].argmax()] = True
            x[:, lo:hi] = torch.where(commit & masked, token, x[:, lo:hi])
            if not bool((x[:, lo:hi] == cfg.mask_token_id).any()):
                break
            logits = model(x[:, lo:hi], positions[:, lo:hi], None, cache=cache, start=lo)
            forwards += 1
    return x[0, P:].tolist(), forwards


def measure(name, examples, run_one, eos, tokenizer):
    """run_one(prompt_index) -> (window, forwards). Returns a result row."""
    texts, forwards, tokens, committed = [], 0, 0, 0
    begin = time.perf_counter()
    for i in range(len(examples)):
        window, n, c = run_one(i)
        answer = until_eos(window, eos)
        texts.append(tokenizer.decode(answer, skip_special_tokens=True))
        forwards += n
        committed += c
        tokens += len(answer)
    seconds = time.perf_counter() - begin
    table = tasks.accuracy_table(examples, texts)
    ok, total = table["all"]
    return dict(
        name=name,
        acc=100 * ok / total,
        forwards=forwards / len(examples),
        tpf=committed / max(forwards, 1),
        tps=tokens / seconds,
        seconds=seconds,
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--prompts", type=int, default=100, help="held-out prompts (spread over the tasks)"
    )
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--configs",
        default="all",
        help=f"'all' or comma list like threshold:dual,credit:vicinity (decoders: "
        f"{', '.join(DECODERS)}; caches: {', '.join(CACHES)})",
    )
    ap.add_argument(
        "--steps-per-check",
        type=int,
        default=None,
        help="decoding steps between host checks (default: $DINFER_STEPS_PER_CHECK or 1); with "
        "DINFER_SYNC_CHECK=1 every step region runs under workers.nosync's guard (on CUDA: "
        "torch.cuda.set_sync_debug_mode('error'))",
    )
    ap.add_argument(
        "--suffix-windows",
        default="",
        help="comma list like 16,64: each configuration also runs with those suffix_window "
        "values (DPad's sliding window; the plain row sees the whole window)",
    )
    ap.add_argument("--json", default=None, help="also write the rows here (benchmarks/plot.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, steps_per_check=args.steps_per_check
    )
    cfg, tok = engine.config, engine.tokenizer
    per_task = -(-args.prompts // len(tasks.TASKS))
    examples = tasks.held_out(per_task)
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    G, K = args.gen_length, args.block_length
    eos = cfg.eos_token_id
    where = f"{args.threads} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"bundled model, {len(examples)} held-out prompts, gen_length {G}, block_length {K}, "
        f"batch 1, {args.dtype}, {where}\n",
        flush=True,
    )

    def reference(i):
        out, n = reference_generate(
            engine.model,
            [prompts[i]],
            mask_id=cfg.mask_token_id,
            eos_id=eos,
            gen_length=G,
            block_length=K,
            steps=G,
        )
        return out[0], n, G

    def fast_dllm(i):
        window, n = fast_dllm_dual(engine.model, prompts[i], G, K)
        return window, n, G

    def engine_run(params):
        def run(i):
            [r] = engine.generate([prompts[i]], params)
            window = r.token_ids + [eos] * (G - len(r.token_ids))
            return window, r.stats.forwards, r.stats.committed

        return run

    warm = args.device != "cpu"  # on a GPU each path runs once untimed: Triton compiles first

    def timed_run(name, run_one):
        if warm:
            measure(name, examples, run_one, eos, tok)
        return measure(name, examples, run_one, eos, tok)

    rows = [
        measure("reference: fixed, steps=gen_length, no cache", examples, reference, eos, tok),
        timed_run("Fast-dLLM: threshold 0.9, dual cache, no early stop", fast_dllm),
    ]
    ref, fast = rows
    print(
        f"baselines measured: reference {ref['tps']:.1f} tok/s, Fast-dLLM {fast['tps']:.1f} tok/s",
        flush=True,
    )
    if args.configs == "all":  # every decoder x cache policy SamplingParams accepts
        combos = list(itertools.product(DECODERS, CACHES))
    else:
        combos = [tuple(c.split(":")) for c in args.configs.split(",")]
    windows = [None] + [int(w) for w in args.suffix_windows.split(",") if w.strip()]
    for (decoder, cache), window in itertools.product(combos, windows):
        params = SamplingParams(
            gen_length=G, block_length=K, decoder=decoder, cache=cache, suffix_window=window
        )
        name = f"{decoder} + {cache}" + ("" if window is None else f", suffix_window {window}")
        rows.append(timed_run(name, engine_run(params)))
        print(f"  {name}: {rows[-1]['tps']:.1f} tok/s", flush=True)

    print(
        "\n| configuration | accuracy | forwards/prompt | tokens/forward | tokens/s "
        "| vs reference | vs Fast-dLLM |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['acc']:.1f}% | {r['forwards']:.1f} | {r['tpf']:.2f} "
            f"| {r['tps']:.1f} | {r['tps'] / ref['tps']:.1f}x | {r['tps'] / fast['tps']:.1f}x |"
        )

    plain = [r for r in rows[2:] if "suffix_window" not in r["name"]]  # the exact configurations
    best = max(plain, key=lambda r: r["tps"] if r["acc"] >= ref["acc"] - 1 else 0)
    decoder, cache = best["name"].split(" + ")
    params = SamplingParams(gen_length=G, block_length=K, decoder=decoder, cache=cache)
    engine.max_batch_size = 16  # continuous batching: up to 16 running, the rest join later
    if warm:
        engine.generate(prompts, params)
    begin = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - begin
    tokens = sum(r.stats.tokens for r in results)
    acc = tasks.accuracy_table(examples, [r.text for r in results])["all"]
    print(
        f"\nbatch 16, {best['name']}: {tokens / seconds:.1f} tokens/s aggregate vs "
        f"{best['tps']:.1f} at batch 1 ({tokens / seconds / best['tps']:.1f}x); "
        f"accuracy {100 * acc[0] / acc[1]:.1f}%"
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        batch = dict(name=best["name"], batch=16, tps=tokens / seconds, acc=100 * acc[0] / acc[1])
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows, "batch": batch}, f, indent=1)


if __name__ == "__main__":
    main()
