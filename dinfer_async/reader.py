"""dinfer-batch's input: lines streamed from a file or stdin, parsed lazily into jobs.

The file is read as bytes in a daemon thread, in batches of lines, so a slow stdin never blocks
the event loop (streams and Ctrl-C go on) and reading overlaps generation; each line is decoded
on its own (jsonl.decode_line), so one line's bytes never cost another line anything. A line
longer than the limit is read in pieces and dropped (an error record takes its place), so
memory stays bounded whatever the file holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO

from dinfer_async.jsonl import Job, LineError, decode_line, parse_line


class ReadError(Exception):
    """The input could not be read (an I/O error); the run stops and a rerun resumes."""


@dataclass
class TooLong:
    size: int  # bytes of the line, newline included


class LineReader:
    """Reads IN in a daemon thread, in batches of lines; a line over `max_bytes` is read in
    pieces and dropped (a TooLong takes its place)."""

    def __init__(self, stream: IO[bytes], max_bytes: int, batch: int = 256):
        self.stream, self.max_bytes, self.batch = stream, max_bytes, batch
        self.closed = False

    async def batches(self) -> AsyncIterator[list[bytes | TooLong]]:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        threading.Thread(target=self._run, name="dinfer-batch-reader", daemon=True).start()
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise ReadError(f"cannot read the input: {item}") from item
                yield item
        finally:
            self.closed = True

    def _run(self) -> None:
        try:
            lines: list[bytes | TooLong] = []
            size = 0
            while raw := self.stream.readline(self.max_bytes + 1):
                if len(raw) > self.max_bytes and not raw.endswith(b"\n"):
                    total = len(raw)
                    while raw and not raw.endswith(b"\n"):
                        raw = self.stream.readline(1 << 20)
                        total += len(raw)
                    lines.append(TooLong(total))
                else:
                    lines.append(raw)
                    size += len(raw)
                if len(lines) >= self.batch or size >= 1 << 20:
                    if not self._send(lines):
                        return
                    lines, size = [], 0
            if lines and not self._send(lines):
                return
            self._send(None)
        except Exception as e:  # an I/O error: the run stops and says so
            self._send(e)

    def _send(self, item: list | Exception | None) -> bool:
        put = self.queue.put(item)
        try:
            done = asyncio.run_coroutine_threadsafe(put, self.loop)
        except RuntimeError:  # the loop is gone: the run ended
            put.close()  # never scheduled: close it, so it is not reported as never awaited
            return False
        while not self.closed:
            try:
                done.result(timeout=0.2)
                return True
            except concurrent.futures.TimeoutError:
                continue
        if done.cancel():  # the loop never started it
            put.close()
        return False


@dataclass
class Counts:
    before: int = 0  # lines whose record an earlier run wrote
    on_skip: Callable[[int], None] | None = None


async def read_items(
    reader: LineReader, defaults: dict, done: set[str], counts: Counts
) -> AsyncIterator[Job | LineError]:
    """Parse lines lazily; flag duplicate ids; skip lines whose record is already written."""
    seen: set[str] = set()
    number = 0
    async for lines in reader.batches():
        for raw in lines:
            number += 1
            if isinstance(raw, TooLong):
                item: Job | LineError = LineError(
                    number,
                    None,
                    f"the line is {raw.size} bytes, over the limit of {reader.max_bytes} "
                    "(--max-line-bytes)",
                )
            else:
                text = decode_line(number, raw)
                if isinstance(text, LineError):
                    item = text
                elif not text.strip():  # no record; it still counts on the progress bar
                    if counts.on_skip is not None:
                        counts.on_skip(1)
                    continue
                else:
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
                counts.before += 1
                if counts.on_skip is not None:
                    counts.on_skip(1)
                continue
            yield item


def count_lines(path: str) -> int | None:
    if path == "-" or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
