"""dinfer-batch: JSONL prompts in, JSONL completions out, through worker processes.

    dinfer-batch IN OUT [--model DIR] [--workers N] [--max-concurrency K] [sampling flags]
    dinfer-batch IN OUT --device cuda --workers 2 --tensor-parallel-size 4 [--gpus 0,1,..]

Every non-blank input line gets exactly one output record, in input order: a completion, or an
error record with the line number and the reason (the run goes on). Killed at any moment and
rerun with the same arguments, it skips the lines already answered; Ctrl-C (or SIGTERM) stops
cleanly and says how to resume. Input is streamed, so memory stays bounded.

Exit codes: 0 every line served; 1 some line has an error record (this run or an earlier one);
2 nothing was run (bad flag, input, output or model: one line on stderr, no output file made);
3 the run stopped before the end because no worker could be kept running, or OUT could not be
written (rerun to resume); 130 SIGINT; 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Protocol

import anyio

from dinfer_async.cli import (
    Parser,
    add_common_flags,
    add_engine_flags,
    add_sampling_flags,
    configure_logging,
    engine_flags_problem,
    expert_parallel,
    flag,
    sampling_defaults,
)
from dinfer_async.errors import (
    ClientClosedError,
    DinferError,
    InvalidRequestError,
    WorkerDiedError,
)
from dinfer_async.jsonl import Job, LineError, completion_record, error_record
from dinfer_async.output import InOrder, OutputError, OutputFile
from dinfer_async.params import SamplingParams
from dinfer_async.reader import Counts, LineReader, ReadError, count_lines, read_items

PROG = "dinfer-batch"
log = logging.getLogger("dinfer_async.batch")
SIGNAL_EXIT: dict[int, int] = {signal.SIGINT.value: 130, signal.SIGTERM.value: 143}


class UsageError(Exception):
    """Nothing can run: a bad flag, input, output or model; the message says what to fix."""


class Stop(Exception):
    """The run cannot go on (no worker is ready, OUT cannot be written); a rerun resumes."""


class _Client(Protocol):
    """What dinfer-batch needs of dinfer_async.Client."""

    @property
    def welcome(self): ...

    async def generate(self, prompt=None, *, messages=None, params=None): ...

    async def wait_ready(self, timeout: float) -> None: ...


# ---- progress --------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal, else a log line every `every` seconds; a summary at the end.
    Rates count generation only: the clock starts once the workers are ready."""

    def __init__(self, total: int | None, every: float = 10.0):
        self.begin = self.last = time.perf_counter()
        self.every = every
        self.written = self.errors = self.tokens = self.committed = self.forwards = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="line", file=sys.stderr, dynamic_ncols=True)

    def skipped(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def add(self, record: dict) -> None:
        self.written += 1
        stats = record.get("stats") or ((record.get("response") or {}).get("body") or {}).get(
            "dinfer_stats"
        )
        if stats is None:
            self.errors += 1
        else:
            self.tokens += stats["tokens"]
            self.forwards += stats["forwards"]
            self.committed += round(stats["committed_per_forward"] * stats["forwards"])
        rate = self.tokens / max(time.perf_counter() - self.begin, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{rate:.1f}", errors=self.errors)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            log.info("%d written, %d errors, %.1f tokens/s", self.written, self.errors, rate)

    def summary(self, before: int, errors_before: int, startup: float) -> str:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.begin
        forwards = max(self.forwards, 1)
        return (
            f"{before + self.written} lines: {before} already done"
            f"{f' ({errors_before} with errors)' if errors_before else ''}, {self.written} new "
            f"({self.errors} errors); start-up {startup:.1f} s; generation {seconds:.1f} s: "
            f"{self.tokens} tokens, {self.tokens / max(seconds, 1e-9):.1f} tokens/s, "
            f"{self.tokens / forwards:.2f} tokens per forward, "
            f"{self.committed / forwards:.2f} committed per forward"
        )


# ---- one line --------------------------------------------------------------------------------


async def answer(client: _Client, job: Job, retries: int, ready_timeout: float) -> dict:
    """The line's record. A line whose worker died is retried (`retries` tries in all, each after
    `client.wait_ready`); Stop when no worker becomes ready, since no later line could run."""
    for attempt in range(1, retries + 1):
        try:
            c = await client.generate(prompt=job.prompt, messages=job.messages, params=job.params)
            return completion_record(
                job, c.text, c.token_ids, c.finish_reason, c.stats, client.welcome.model
            )
        except WorkerDiedError as e:  # WorkerUnresponsiveError too
            if attempt == retries:
                return error_record(job, f"its worker died on each of {retries} tries ({e})")
            log.info("line %d: %s; trying again (%d of %d)", job.line, e, attempt + 1, retries)
            try:
                await client.wait_ready(ready_timeout)
            except (DinferError, TimeoutError) as ready:
                raise Stop(f"no worker is ready ({ready})") from ready
        except InvalidRequestError as e:
            return error_record(job, str(e))
        except ClientClosedError as e:
            raise Stop(f"the client closed ({e})") from e
        except DinferError as e:
            return error_record(job, f"{type(e).__name__}: {e}")
        except Exception as e:  # never the run's end: this line's record says what happened
            log.debug("line %d failed", job.line, exc_info=True)
            return error_record(job, f"internal error: {type(e).__name__}: {e}")
    raise AssertionError("unreachable")


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class RunState:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    signal: int | None = None
    stopped: str | None = None  # why the run stopped early
    started: bool = False
    startup: float = 0.0

    def stop(self, reason: str) -> None:
        if self.stopped is None and self.signal is None:
            self.stopped = reason
            log.error("stopping: %s", reason)
        self.scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], state: RunState) -> None:
    async for signum in signals:
        if state.signal is None and state.stopped is None:
            state.signal = signum
            name = signal.Signals(signum).name
            log.info("%s: stopping (the lines done so far stay written)", name)
        state.scope.cancel()


async def run(args: argparse.Namespace, defaults: dict, source: IO[bytes], out: OutputFile) -> int:
    """Start the workers, stream the lines through them, write the records; the exit code."""
    state = RunState()
    progress: Progress | None = None
    counts = Counts()
    refused: UsageError | None = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, signals, state)
            try:
                with state.scope:
                    progress = await _serve(args, defaults, source, out, state, counts)
            except UsageError as e:  # raised here, not through the task group's exception group
                refused = e
            finally:
                tg.cancel_scope.cancel()
    out.close()
    if refused is not None:
        raise refused
    if state.started and progress is not None:
        log.info("%s", progress.summary(counts.before, out.errors_before, state.startup))
    if state.signal is not None or state.stopped is not None:
        how = f"interrupted by {signal.Signals(state.signal).name}" if state.signal else "stopped"
        if not state.started:
            how += " while starting, nothing written"
        log.warning("%s; %s", how, _resume_hint(args))
        return SIGNAL_EXIT.get(state.signal, 128 + state.signal) if state.signal else 3
    failed = (progress.errors if progress else 0) or out.errors_before
    return 1 if failed else 0


def started_line(client: object, seconds: float) -> str:
    """`2 workers ready in 3.1 s: worker 0 on cuda:0,cuda:1; worker 1 on cuda:2,cuda:3`."""
    devices: list[list[str]] = getattr(client, "worker_devices", [])
    where = "; ".join(f"worker {i} on {','.join(d) or '?'}" for i, d in enumerate(devices))
    n = len(devices)
    return f"{n} worker{'s' if n != 1 else ''} ready in {seconds:.1f} s" + (
        f": {where}" if where else ""
    )


def _resume_hint(args: argparse.Namespace) -> str:
    if args.output == "-":
        return "the output went to stdout, so there is nothing to resume: give an output file"
    stdin = " (with the same input on stdin)" if args.input == "-" else ""
    return f"to resume, run the same command{stdin}: {PROG} {shlex.join(args.argv)}"


async def _serve(
    args: argparse.Namespace,
    defaults: dict,
    source: IO[bytes],
    out: OutputFile,
    state: RunState,
    counts: Counts,
) -> Progress | None:
    from dinfer_async import client as client_module

    began = time.perf_counter()
    try:
        client = client_module.Client(
            model=args.model,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=-(-args.max_concurrency // args.workers),
            threads=args.threads,
            tensor_parallel_size=args.tensor_parallel_size,
            expert_parallel=expert_parallel(args),
            gpus=args.gpus,
        )
    except InvalidRequestError as e:  # too few GPUs for the workers, ...
        raise UsageError(f"{flag(e.field)}: {e.reason}") from None
    try:
        await client.__aenter__()  # a signal now cancels the start-up (state.scope)
    except Exception as e:  # a bad model, device or dtype: the worker said why
        log.debug("start-up failed", exc_info=True)
        raise UsageError(f"could not start the workers: {' '.join(str(e).split())}") from e
    log.info("%s", started_line(client, time.perf_counter() - began))
    # From here a signal cancels the lines only, so the client closes normally (workers stopped,
    # sockets removed) in the scope it was opened in.
    state.scope = anyio.CancelScope()
    try:
        state.startup = time.perf_counter() - began
        try:
            out.open()
        except OutputError as e:
            raise UsageError(str(e)) from e
        state.started = True
        progress = None
        with state.scope:
            total = await anyio.to_thread.run_sync(count_lines, args.input, abandon_on_cancel=True)
            progress = Progress(total)
            counts.on_skip = progress.skipped
            await _lines(client, args, defaults, source, out, state, counts, progress)
        return progress
    finally:
        await client.__aexit__(None, None, None)


async def _lines(
    client: _Client,
    args: argparse.Namespace,
    defaults: dict,
    source: IO[bytes],
    out: OutputFile,
    state: RunState,
    counts: Counts,
    progress: Progress,
) -> None:
    """Read, parse and answer the lines, max_concurrency at a time, writing records in order."""
    order = InOrder(out, 2 * args.max_concurrency + 64, progress.add)
    limiter = anyio.Semaphore(args.max_concurrency)

    def put(slot: int, line: int, record: dict) -> None:
        try:
            order.put(slot, line, record)
        except OSError as e:
            state.stop(f"cannot write {args.output}: {e.strerror or e}")

    async def one(job: Job, slot: int) -> None:
        try:
            record = await answer(client, job, args.retries, args.ready_timeout)
        except Stop as e:
            state.stop(str(e))
            return
        finally:
            limiter.release()
        put(slot, job.line, record)

    reader = LineReader(source, args.max_line_bytes)
    async with anyio.create_task_group() as work:
        try:
            async for item in read_items(reader, defaults, out.done, counts):
                slot = await order.reserve()
                if isinstance(item, LineError):
                    put(slot, item.line, item.record())
                    continue
                await limiter.acquire()
                work.start_soon(one, item, slot)
        except ReadError as e:
            state.stop(str(e))
        finally:
            reader.closed = True  # the reading thread stops at its next batch


# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("input", help="JSONL input file, or - for stdin")
    ap.add_argument("output", help="JSONL output file (appended to and resumed), or - for stdout")
    add_common_flags(ap, PROG)
    add_engine_flags(ap)
    ap.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at once")
    ap.add_argument(
        "--retries", type=int, default=3, help="tries per line when its worker dies (default 3)"
    )
    ap.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a worker to be ready again before a retry (default 300)",
    )
    ap.add_argument(
        "--max-line-bytes",
        type=int,
        default=4 << 20,
        help="longer input lines get an error record (default 4 MiB)",
    )
    add_sampling_flags(ap)
    return ap


def _check(args: argparse.Namespace, defaults: dict) -> tuple[IO[bytes], OutputFile]:
    """Everything that can be refused before a worker starts; the open input and checked OUT."""
    try:
        SamplingParams(**defaults).validate()
    except (InvalidRequestError, TypeError) as e:
        raise UsageError(str(e)) from None
    counts = ("workers", "max_concurrency", "retries", "tensor_parallel_size")
    problem = engine_flags_problem(args, counts)
    if problem:
        raise UsageError(problem)
    if not args.ready_timeout > 0 or args.max_line_bytes < 1:
        raise UsageError("--ready-timeout and --max-line-bytes must be > 0")
    model = args.model
    if model and model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise UsageError(f"--model {model}: no such directory (give a local model directory)")
    if args.input == "-":
        source = sys.stdin.buffer
    else:
        try:
            source = open(args.input, "rb")  # noqa: SIM115 (main closes it)
        except OSError as e:
            raise UsageError(f"cannot read {args.input}: {e.strerror}") from None
    try:
        return source, OutputFile(args.output, args.input)
    except OutputError as e:
        if source is not sys.stdin.buffer:
            source.close()
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    configure_logging(PROG, args.debug)
    source = None
    try:
        defaults = sampling_defaults(args)
        source, out = _check(args, defaults)
        return anyio.run(run, args, defaults, source, out)
    except UsageError as e:
        log.error("%s", e, exc_info=True)
        return 2
    except KeyboardInterrupt:  # before the signal handlers are in place, or after
        log.warning("interrupted")
        return 130
    except Exception as e:
        log.error(
            "internal error: %s: %s (--debug shows the traceback)",
            type(e).__name__,
            e,
            exc_info=True,
        )
        return 1
    finally:
        if source is not None and source is not sys.stdin.buffer:
            source.close()


if __name__ == "__main__":
    sys.exit(main())
