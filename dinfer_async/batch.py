"""dinfer-batch: JSONL prompts in, JSONL completions out, through worker processes.

    dinfer-batch IN OUT [--model DIR] [--workers N] [--max-concurrency K] [sampling flags]

Every input line gets exactly one output line, in input order: a completion, or an error record
with the line number and the reason (the run goes on; the exit code is 1 if any line failed).
Killed at any moment and rerun with the same arguments, it skips the lines already answered.
Input is streamed, so memory stays bounded however long the file is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import IO

import anyio

from dinfer_async.cli import add_engine_flags, add_sampling_flags, sampling_defaults
from dinfer_async.errors import DinferError, InvalidRequestError, WorkerDiedError
from dinfer_async.jsonl import Job, LineError, completion_record, error_record, parse_line
from dinfer_async.output import InOrder, OutputFile
from dinfer_async.params import SamplingParams

RETRIES = 3  # tries per request when its worker dies (the client restarts the worker)


def read_items(stream: IO[str], defaults: dict, done: set[str]) -> Iterator[Job | LineError]:
    """Parse lines lazily; flag duplicate ids; skip lines whose record is already written."""
    seen: set[str] = set()
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        item = parse_line(number, text, defaults)
        if isinstance(item, Job):
            if item.key in seen:
                item = LineError(
                    number,
                    item.id,
                    f"duplicate id {item.id!r}; ids must be unique",
                    item.openai is not None,
                )
            else:
                seen.add(item.key)
        if item.key in done or f"line:{number}" in done:
            continue
        yield item


class Progress:
    """A progress bar on a terminal, else a log line every `every` seconds; a summary at the end."""

    def __init__(self, total: int | None, every: float = 10.0):
        self.begin = self.last = time.perf_counter()
        self.every, self.done, self.errors, self.tokens, self.committed, self.forwards = (
            every,
            0,
            0,
            0,
            0,
            0,
        )
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def add(self, record: dict) -> None:
        self.done += 1
        stats = record.get("stats") or ((record.get("response") or {}).get("body") or {}).get(
            "dinfer_stats"
        )
        if stats is None:
            self.errors += 1
        else:
            self.tokens += stats["tokens"]
            self.forwards += stats["forwards"]
            self.committed += stats["tokens_per_forward"] * stats["forwards"]
        rate = self.tokens / max(time.perf_counter() - self.begin, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{rate:.1f}", errors=self.errors)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(
                f"dinfer-batch: {self.done} done, {self.errors} errors, {rate:.1f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def summary(self) -> str:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.begin
        return (
            f"dinfer-batch: {self.done} lines, {self.errors} errors, {self.tokens} tokens in "
            f"{seconds:.1f} s, "
            f"{self.tokens / max(seconds, 1e-9):.1f} tokens/s, "
            f"{self.committed / max(self.forwards, 1):.2f} tokens per forward"
        )


async def answer(client, job: Job) -> dict:
    for attempt in range(RETRIES):
        try:
            c = await client.generate(prompt=job.prompt, messages=job.messages, params=job.params)
            return completion_record(
                job, c.text, c.token_ids, c.finish_reason, c.stats, client.welcome.model
            )
        except WorkerDiedError as e:
            if attempt == RETRIES - 1:
                return error_record(job, f"worker died {RETRIES} times: {e}")
            with anyio.fail_after(300):
                while not any(w.alive for w in client._workers):
                    await anyio.sleep(0.1)
        except InvalidRequestError as e:
            return error_record(job, str(e))
        except DinferError as e:
            return error_record(job, f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable: the last attempt returns")


def count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


async def run(args, defaults: dict) -> int:
    from dinfer_async.client import Client

    out = OutputFile(args.output)
    # closed in the finally below (stdin is not ours to close)
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    progress = Progress(count_lines(args.input))
    per_worker = -(-args.max_concurrency // args.workers)
    try:
        async with Client(
            model=args.model,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=per_worker,
            threads=args.threads,
        ) as client:
            order = InOrder(out, window=2 * args.max_concurrency + 64)
            limiter = anyio.Semaphore(args.max_concurrency)

            async def one(job: Job, slot: int) -> None:
                try:
                    record = await answer(client, job)
                finally:
                    limiter.release()
                order.put(slot, record)
                progress.add(record)

            async with anyio.create_task_group() as tg:
                for item in read_items(source, defaults, out.done):
                    slot = await order.reserve()
                    if isinstance(item, LineError):
                        record = item.record()
                        order.put(slot, record)
                        progress.add(record)
                        continue
                    await limiter.acquire()
                    tg.start_soon(one, item, slot)
    finally:
        if source is not sys.stdin:
            source.close()
        out.close()
    print(progress.summary(), file=sys.stderr, flush=True)
    return 1 if progress.errors or out.errors_before else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dinfer-batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("input", help="JSONL input file, or - for stdin")
    ap.add_argument("output", help="JSONL output file (appended to and resumed), or - for stdout")
    add_engine_flags(ap)
    ap.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at once")
    add_sampling_flags(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = sampling_defaults(args)
    try:
        SamplingParams(**defaults).validate()
        for flag in ("workers", "max_concurrency"):
            if getattr(args, flag) < 1:
                raise InvalidRequestError("--" + flag.replace("_", "-"), "must be >= 1")
    except (InvalidRequestError, TypeError) as e:
        print(f"dinfer-batch: {e}", file=sys.stderr)
        return 2
    return anyio.run(run, args, defaults)


if __name__ == "__main__":
    sys.exit(main())
