"""Tokens/s and time to first token over HTTP (dinfer-serve) vs the async Client, same worker.

    python benchmarks/server_speed.py --prompts 64

Both paths run one worker process with the same settings: the Client in this process, and a
dinfer-serve subprocess (itself a Client of its own worker) driven by a minimal HTTP/1.1
client (a light load generator: httpx or the openai package would compete with the server and
the worker for the same CPU cores). 1 stream: requests one after another; 16 streams: 16 in
flight. Tokens are answer tokens before EOS (usage.completion_tokens over HTTP, stats["tokens"]
through the Client); time to first token is to the first non-empty stable text (the first
content delta over HTTP). Each figure is the best of --repeat runs, alternating the two paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import anyio
import httpx

from dinfer_async import Client, SamplingParams
from workers.bundled import tasks


async def client_rate(client: Client, messages, params, concurrency) -> tuple[float, float]:
    tokens, first = 0, []
    limiter = anyio.Semaphore(concurrency)

    async def one(m):
        nonlocal tokens
        async with limiter:
            start, seen = time.perf_counter(), False
            async for chunk in client.stream(messages=m, params=params):
                if chunk.stable_text and not seen:
                    first.append(time.perf_counter() - start)
                    seen = True
                if chunk.finish_reason:
                    tokens += chunk.stats["tokens"]

    begin = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for m in messages:
            tg.start_soon(one, m)
    return tokens / (time.perf_counter() - begin), statistics.median(first)


class Connection:
    """A minimal HTTP/1.1 keep-alive client for streamed POSTs: the load generator's own CPU
    (httpx costs about 2 ms per request) would otherwise count against the server on a small
    machine, where all three processes share the cores."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def events(self, path: str, payload: dict):
        """POST payload; yield each server-sent event's data (chunked transfer encoding)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP error: {status!r}")
        while (await self.reader.readline()) != b"\r\n":  # headers
            pass
        buffer = b""
        while size := int((await self.reader.readline()).strip(), 16):
            buffer += (await self.reader.readexactly(size + 2))[:-2]
            *complete, buffer = buffer.split(b"\n\n")
            for event in complete:
                if event.startswith(b"data: "):
                    yield event[6:]
        await self.reader.readline()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def http_rate(url: str, messages, body, concurrency) -> tuple[float, float]:
    tokens, first = 0, []
    host, port = url.removeprefix("http://").split(":")
    idle = [Connection(host, int(port)) for _ in range(concurrency)]
    limiter = anyio.Semaphore(concurrency)

    async def one(m):
        nonlocal tokens
        async with limiter:
            connection = idle.pop()
            start, seen = time.perf_counter(), False
            request = {**body, "messages": m, "stream": True}
            request["stream_options"] = {"include_usage": True}
            async for data in connection.events("/v1/chat/completions", request):
                if data == b"[DONE]":
                    continue
                event = json.loads(data)
                if event.get("usage"):
                    tokens += event["usage"]["completion_tokens"]
                choices = event["choices"]
                if not seen and choices and choices[0]["delta"].get("content"):
                    first.append(time.perf_counter() - start)
                    seen = True
            idle.append(connection)

    begin = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for m in messages:
            tg.start_soon(one, m)
    elapsed = time.perf_counter() - begin
    for connection in idle:
        connection.close()
    return tokens / elapsed, statistics.median(first)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dinfer_async.serve", "--port", str(port)]
    cmd += ["--threads", str(args.threads), "--max-batch-size", "16", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("dinfer-serve did not start")


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each worker")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length)
    body = {"gen_length": args.gen_length, "block_length": args.block_length}
    examples = tasks.held_out(-(-args.prompts // len(tasks.TASKS)))[: args.prompts]
    messages = [ex.messages for ex in examples]

    proc, url = start_server(args)
    best: dict[tuple[str, int], tuple[float, float]] = {}

    def keep(key, rate, ttft):
        old = best.get(key)
        best[key] = (max(rate, old[0]), min(ttft, old[1])) if old else (rate, ttft)

    try:
        async with Client(
            model=args.model, workers=1, threads=args.threads, max_batch_size=16
        ) as client:
            await client.generate(messages=messages[0], params=params)  # warm-up
            await http_rate(url, messages[:2], body, 1)
            for _ in range(args.repeat):
                for concurrency in (1, 16):
                    keep(
                        ("client", concurrency),
                        *await client_rate(client, messages, params, concurrency),
                    )
                    keep(("http", concurrency), *await http_rate(url, messages, body, concurrency))
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"\n{len(messages)} held-out prompts, gen_length {args.gen_length}, block_length "
        f"{args.block_length}, default decoder/cache, {args.threads} CPU thread(s) per worker, "
        f"best of {args.repeat}\n"
    )
    print("| streams | Client tok/s | HTTP tok/s | HTTP / Client | Client TTFT | HTTP TTFT |")
    print("|---|---|---|---|---|---|")
    for c in (1, 16):
        (local, t_local), (remote, t_remote) = best[("client", c)], best[("http", c)]
        print(
            f"| {c} | {local:.1f} | {remote:.1f} | {remote / local:.2f}x | "
            f"{t_local * 1000:.1f} ms | {t_remote * 1000:.1f} ms |"
        )


if __name__ == "__main__":
    asyncio.run(main())
