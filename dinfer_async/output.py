"""dinfer-batch's output file: crash-safe, resumable, written in input order.

Each record is one `os.write` of a whole line, so a SIGKILL leaves at most one partial last line;
reopening cuts it off and reads back which lines are already answered, so a rerun with the same
arguments skips them. Records are written in input order through a bounded reordering window;
since a run only ever appends the next lines in order, a resumed file stays in input order too.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

from dinfer_async.jsonl import record_keys


class OutputFile:
    def __init__(self, path: str):
        self.done: set[str] = set()  # keys of records already in the file
        self.errors_before = 0
        if path == "-":
            self.fd, self.owned = sys.stdout.fileno(), False
            return
        self.fd, self.owned = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), True
        data = b""
        while chunk := os.read(self.fd, 1 << 20):
            data += chunk  # only at start-up; the records themselves are small
        keep = data[: data.rfind(b"\n") + 1]  # a partial last line is a write the kill cut short
        valid = []
        for line in keep.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            id_key, line_key = record_keys(record)
            self.done.add(id_key or line_key or "")  # exactly one of them is set
            self.errors_before += line_key is not None
            valid.append(line + b"\n")
        if len(valid) != keep.count(b"\n") or len(keep) != len(data):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            for line in valid:
                os.write(self.fd, line)
        os.lseek(self.fd, 0, os.SEEK_END)

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class InOrder:
    """Writes records in the order their slots were reserved, holding at most `window` records."""

    def __init__(self, out: OutputFile, window: int):
        self.out, self.window = out, window
        self.reserved = self.written = 0
        self.pending: dict[int, dict] = {}
        self.room = anyio.Event()

    async def reserve(self) -> int:
        while self.reserved - self.written >= self.window:
            self.room = anyio.Event()
            await self.room.wait()
        self.reserved += 1
        return self.reserved - 1

    def put(self, slot: int, record: dict) -> None:
        self.pending[slot] = record
        while self.written in self.pending:
            self.out.write(self.pending.pop(self.written))
            self.written += 1
        self.room.set()
