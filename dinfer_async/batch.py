"""dinfer-batch: JSONL prompts in, JSONL completions out.

An input line is {"id", "prompt"} (raw text) or {"id", "messages"} (chat template applied),
optionally with SamplingParams fields that override the flags for that line; an OpenAI Batch
line ({"custom_id", "body": {"messages" | "prompt", ...}}) is read the same way. Every input
line gets one output line, in input order: a completion, or {"id", "error": {"line", "message"}}.
The exit code is 1 when any line failed.

This version runs the engine in this process; the worker-process version with resumable output
is tracked separately (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import IO, Iterator

import msgspec

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams

PARAM_FIELDS = set(SamplingParams.__struct_fields__)


@dataclass
class Job:
    line: int
    id: object
    prompt: str | None
    messages: list | None
    params: SamplingParams


@dataclass
class LineError:
    line: int
    id: object
    message: str

    def record(self) -> dict:
        return {"id": self.id, "error": {"line": self.line, "message": self.message}}


def parse_line(line: int, text: str, defaults: dict) -> Job | LineError:
    """One input line -> a Job, or a LineError naming what is wrong and how to fix it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return LineError(line, None, f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return LineError(line, None, "a line must be a JSON object with 'id' and 'prompt' or 'messages'")
    body = obj
    if "custom_id" in obj:
        body = obj.get("body")
        if not isinstance(body, dict):
            return LineError(line, obj.get("custom_id"), "OpenAI Batch line: 'body' must be an object")
    rid = obj.get("custom_id", obj.get("id"))
    if rid is None or isinstance(rid, (dict, list, bool)):
        return LineError(line, rid, "'id' is missing or not a string/number; give each line a unique id")
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        return LineError(line, rid, "give exactly one of 'prompt' (raw text) or 'messages' (chat)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return LineError(line, rid, "'prompt' must be a non-empty string")
    overrides = {k: v for k, v in body.items() if k in PARAM_FIELDS}
    try:
        params = msgspec.convert({**defaults, **overrides}, SamplingParams).validate()
    except msgspec.ValidationError as e:
        return LineError(line, rid, f"bad sampling parameter: {e}")
    except InvalidRequestError as e:
        return LineError(line, rid, str(e))
    return Job(line, rid, prompt, messages, params)


def read_jobs(stream: IO[str], defaults: dict) -> Iterator[Job | LineError]:
    seen: set = set()
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        item = parse_line(number, text, defaults)
        if isinstance(item, Job):
            key = json.dumps(item.id)
            if key in seen:
                item = LineError(number, item.id, f"duplicate id {item.id!r}; ids must be unique")
            seen.add(key)
        yield item


def run_jobs(engine, jobs: list[Job]) -> dict[int, dict]:
    """Generate for jobs (each with its own params, sharing the engine's batches); a job whose
    prompt is rejected becomes an error record. Returns line number -> output record."""
    records: dict[int, dict] = {}
    ready: list[tuple[Job, list[int]]] = []
    for job in jobs:
        try:
            ids = engine.encode(prompt=job.prompt, messages=job.messages)
            engine.check_prompt(ids, job.params, "prompt")
            ready.append((job, ids))
        except (InvalidRequestError, ValueError) as e:
            records[job.line] = LineError(job.line, job.id, str(e)).record()
    if ready:
        results = engine.generate([ids for _, ids in ready], [job.params for job, _ in ready])
        for (job, _), r in zip(ready, results, strict=True):
            stats = r.stats
            records[job.line] = {
                "id": job.id,
                "text": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                "stats": {
                    "forwards": stats.forwards,
                    "tokens": stats.tokens,
                    "tokens_per_forward": round(stats.tokens_per_forward, 4),
                    "seconds": round(stats.seconds, 4),
                },
            }
    return records


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dinfer-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="JSONL input file, or - for stdin")
    ap.add_argument("output", help="JSONL output file, or - for stdout")
    ap.add_argument("--model", default=None, help="local Hugging Face model directory (default: the bundled model)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-concurrency", type=int, default=32, help="requests in the running batch at once")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    for name, kind in [("decoder", str), ("threshold", float), ("steps", int), ("cache", str), ("gen-length", int),
                       ("block-length", int), ("temperature", float), ("seed", int), ("cfg-scale", float)]:
        ap.add_argument(f"--{name}", type=kind, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = {
        f: getattr(args, f) for f in ("decoder", "threshold", "steps", "cache", "gen_length", "block_length",
                                      "temperature", "seed", "cfg_scale") if getattr(args, f) is not None
    }
    try:
        SamplingParams(**defaults).validate()
    except (InvalidRequestError, TypeError) as e:
        print(f"dinfer-batch: {e}", file=sys.stderr)
        return 2
    if args.workers != 1:
        print("dinfer-batch: --workers other than 1 needs worker processes, which this version does not have yet", file=sys.stderr)
        return 2
    from workers import Engine  # torch is imported here, never by `import dinfer_async`

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_concurrency)
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    done = failed = tokens = 0
    begin = time.perf_counter()
    pending: list[Job | LineError] = []

    def flush():
        nonlocal done, failed, tokens
        records = run_jobs(engine, [item for item in pending if isinstance(item, Job)])
        for item in pending:
            record = records[item.line] if isinstance(item, Job) else item.record()
            failed += "error" in record
            tokens += record.get("stats", {}).get("tokens", 0)
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            done += 1
        sink.flush()
        pending.clear()
        rate = tokens / max(time.perf_counter() - begin, 1e-9)
        print(f"dinfer-batch: {done} lines, {failed} errors, {tokens} tokens, {rate:.1f} tokens/s", file=sys.stderr)

    try:
        for item in read_jobs(source, defaults):
            pending.append(item)
            if len(pending) >= 4 * args.max_concurrency:  # a chunk keeps the batch refilled as requests finish
                flush()
        if pending:
            flush()
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
