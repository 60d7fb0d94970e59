"""Chaos run: concurrent streams while workers are SIGKILLed and SIGSTOPped at random.

    python benchmarks/chaos.py [--workers 2] [--streams 16] [--minutes 1] [--seed 0]
        [--heartbeat-timeout 2] [--batch-lines 600]

One client launches `--workers` workers (bundled model unless --model) and keeps `--streams`
requests running for `--minutes`; in parallel `python -m dinfer_async.batch` answers a
generated input file with its own worker. Every 2-6 s a random worker of either is SIGKILLed or
SIGSTOPped (and SIGCONTed 0.5 s to 2 heartbeat timeouts later). Prints a table: streams
completed, typed errors by type, hangs (a request not finished within --bound seconds; must be
0), restarts, and the batch run's lines lost or duplicated (must be 0). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time

import anyio

from dinfer_async import Client, DinferError, SamplingParams


def children(pid: int) -> list[int]:
    """Child pids of a process (Linux /proc)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def log(line: str) -> None:
    print(f"chaos: {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class Tally:
    def __init__(self) -> None:
        self.completed = 0
        self.hangs = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()


async def streamer(
    client: Client, i: int, params: SamplingParams, until: float, bound: float, tally: Tally
) -> None:
    n = 0
    while time.monotonic() < until:
        ask = [{"role": "user", "content": f"copy word{i}x{n}"}]
        n += 1
        try:
            with anyio.fail_after(bound):
                if n % 2:
                    await client.generate(messages=ask, params=params)
                else:
                    async with client.stream(messages=ask, params=params) as chunks:
                        async for _ in chunks:
                            pass
            tally.completed += 1
        except DinferError as e:
            tally.errors[type(e).__name__] += 1
            try:
                await client.wait_ready(bound)
            except DinferError as e2:
                tally.errors[f"wait_ready: {type(e2).__name__}"] += 1
                await asyncio.sleep(1)
        except TimeoutError:
            tally.hangs += 1


async def chaos(targets, until: float, hb: float, rng: random.Random, tally: Tally) -> None:
    """Every 2-6 s, SIGKILL or SIGSTOP (then SIGCONT) one worker of a random group of
    `targets()` (the client's serving workers, else its starting ones; the batch's)."""
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(2, 6))
        groups = [g for g in targets() if g[1]]
        if not groups:
            continue
        who, pids = rng.choice(groups)
        pid = rng.choice(pids)
        try:
            if rng.random() < 0.5:
                os.kill(pid, signal.SIGKILL)
                tally.faults[f"{who}: SIGKILL"] += 1
                log(f"SIGKILL {who} {pid}")
            else:
                os.kill(pid, signal.SIGSTOP)
                tally.faults[f"{who}: SIGSTOP"] += 1
                pause = rng.uniform(hb / 2, 3 * hb)
                log(f"SIGSTOP {who} {pid} for {pause:.1f} s")
                await asyncio.sleep(pause)
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def check_batch(path_in: str, path_out: str, lines: int) -> dict:
    ids: collections.Counter[str] = collections.Counter()
    errors = bad = 0
    with open(path_out) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            ids[str(record.get("id"))] += 1
            errors += "error" in record
    expected = [f"l{i}" for i in range(lines)]
    return {
        "records": sum(ids.values()),
        "lost": sum(ids[i] == 0 for i in expected),
        "duplicated": sum(ids[i] > 1 for i in expected),
        "error records": errors,
        "non-JSON lines": bad,
    }


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    params = SamplingParams(gen_length=args.gen_length, block_length=args.gen_length)
    tally = Tally()
    work = tempfile.mkdtemp(prefix="chaos-")
    path_in, path_out = os.path.join(work, "in.jsonl"), os.path.join(work, "out.jsonl")
    with open(path_in, "w") as f:
        for i in range(args.batch_lines):
            f.write(
                json.dumps(
                    {"id": f"l{i}", "messages": [{"role": "user", "content": f"reverse w{i}"}]}
                )
                + "\n"
            )
    batch = None
    if args.batch_lines:
        cmd = [
            sys.executable,
            "-m",
            "dinfer_async.batch",
            path_in,
            path_out,
            "--workers",
            "1",
            "--threads",
            "1",
            "--gen-length",
            str(args.gen_length),
            "--block-length",
            str(args.gen_length),
            "--max-concurrency",
            "8",
        ]
        cmd += ["--model", args.model] if args.model else []
        batch = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    try:
        return await chaos_run(args, rng, params, tally, batch, path_in, path_out)
    finally:
        if batch is not None and batch.returncode is None:
            batch.kill()
            await batch.wait()


async def chaos_run(args, rng, params, tally, batch, path_in, path_out) -> int:
    started = time.monotonic()
    async with Client(
        model=args.model,
        workers=args.workers,
        threads=1,
        max_restarts=10**6,
        heartbeat_timeout=args.heartbeat_timeout,
    ) as client:
        until = time.monotonic() + 60 * args.minutes

        def targets() -> list[tuple[str, list[int]]]:
            running = [
                w for w in client._workers if w.process is not None and w.process.returncode is None
            ]
            serving = [w.process.pid for w in running if w.alive]
            groups = [("client", serving or [w.process.pid for w in running])]
            if batch is not None and batch.returncode is None:
                groups.append(("batch", children(batch.pid)))
            return groups

        await asyncio.gather(
            chaos(targets, until, args.heartbeat_timeout, rng, tally),
            *(streamer(client, i, params, until, args.bound, tally) for i in range(args.streams)),
        )
        restarts = client.restarts
    batch_result: dict = {}
    if batch is not None:
        try:
            with anyio.fail_after(args.bound * 10):
                _, err = await batch.communicate()
            batch_result = check_batch(path_in, path_out, args.batch_lines)
            batch_result["exit code"] = batch.returncode
            summary = [x for x in err.decode(errors="replace").splitlines() if x.strip()]
            batch_result["summary"] = summary[-1] if summary else ""
        except TimeoutError:
            batch.kill()
            batch_result = {"hung": True, **check_batch(path_in, path_out, args.batch_lines)}
    seconds = time.monotonic() - started
    rows = [
        ("workers x streams, minutes", f"{args.workers} x {args.streams}, {args.minutes:g}"),
        ("heartbeat_timeout (s)", f"{args.heartbeat_timeout:g}"),
        ("streams completed", str(tally.completed)),
        ("typed errors", ", ".join(f"{k} {v}" for k, v in sorted(tally.errors.items())) or "0"),
        (f"hangs (not done in {args.bound:g} s)", str(tally.hangs)),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(tally.faults.items()))),
        ("client restarts", str(restarts)),
    ]
    rows += [(f"batch {k}", str(v)) for k, v in batch_result.items()]
    rows.append(("wall seconds", f"{seconds:.0f}"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'':{width}} | value |\n| {'-' * width} | --- |")
    for k, v in rows:
        print(f"| {k:{width}} | {v} |")
    lost = batch_result.get("lost", 0) + batch_result.get("duplicated", 0)
    return 1 if tally.hangs or lost or batch_result.get("hung") else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--batch-lines", type=int, default=600, help="0: no parallel dinfer-batch")
    ap.add_argument(
        "--bound",
        type=float,
        default=120.0,
        help="seconds after which an unfinished request counts as a hang",
    )
    ap.add_argument("--model", default=None)
    sys.exit(asyncio.run(main(ap.parse_args())))
