"""Where the worker's time goes beside the forwards: the same prompts run by `Engine.generate`
(one call) and by the worker's own step loop in this process (no sockets, no client).

    python benchmarks/sdk_overhead.py --prompts 16 --repeats 7

The worker path admits the prompts already tokenized, then calls `Worker.step` until done, with
`send` replaced by the msgpack encoding alone; `chunk`, `finish` and the encoding are timed
apart, the rest of a step is the scheduler with per-step reports. Engine and worker alternate
repeat by repeat; the table gives medians (2 shared cores: noisy) and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dinfer_async import SamplingParams
from dinfer_async import protocol as wire
from workers import Engine
from workers.bundled import tasks
from workers.worker import Worker


class TimedWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times = dict(chunk=0.0, finish=0.0, encode=0.0)
        self.frames = 0
        self.bytes = 0

    def _timed(self, name, fn, *args):
        begin = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.times[name] += time.perf_counter() - begin

    def chunk(self, live, u):
        return self._timed("chunk", super().chunk, live, u)

    def finish(self, live, last):
        return self._timed("finish", super().finish, live, last)

    def send(self, client: bytes, msg: wire.Message) -> None:
        frame = self._timed("encode", wire.encode, msg)
        self.frames += 1
        self.bytes += len(frame)


def run_worker(worker: TimedWorker, prompts, params) -> tuple[float, dict]:
    worker.times = dict.fromkeys(worker.times, 0.0)
    begin = time.perf_counter()
    for i, ids in enumerate(prompts):
        worker.admit(b"bench", f"r{i}", ids, params, "messages")
    while worker.scheduler.has_work():
        worker.step()
    return time.perf_counter() - begin, dict(worker.times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length).validate()
    engine = Engine.from_pretrained(args.model, max_batch_size=args.prompts)
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    prompts = [engine.encode(messages=ex.messages) for ex in examples]
    with tempfile.TemporaryDirectory(prefix="dinfer-bench-") as tmp:
        worker = TimedWorker(engine, f"ipc://{tmp}/w.sock")
        try:
            engine.generate(prompts, params)  # warm-up
            run_worker(worker, prompts, params)
            local, remote, parts, ratios = [], [], [], []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                engine.generate(prompts, params)
                local.append(time.perf_counter() - begin)
                seconds, times = run_worker(worker, prompts, params)
                remote.append(seconds)
                parts.append(times)
                ratios.append(local[-1] / seconds)
            frames, size = worker.frames, worker.bytes
        finally:
            worker.close()
    med = statistics.median
    print(f"\n{args.prompts} prompts, gen_length {args.gen_length}, {args.repeats} repeats\n")
    print("| path | median ms | of which chunk | finish | msgpack | Engine / worker speed |")
    print("|---|---|---|---|---|---|")
    print(f"| Engine.generate | {med(local) * 1e3:.1f} | | | | |")
    print(
        f"| Worker.step loop | {med(remote) * 1e3:.1f} | {med(p['chunk'] for p in parts) * 1e3:.1f}"
        f" | {med(p['finish'] for p in parts) * 1e3:.1f} | "
        f"{med(p['encode'] for p in parts) * 1e3:.1f} | {med(ratios):.2f}x "
        f"[{min(ratios):.2f}, {max(ratios):.2f}] |"
    )
    print(f"\n{frames} frames, {size / max(frames, 1):.0f} bytes each on average")


if __name__ == "__main__":
    main()
