"""dinfer-batch's output file: crash-safe, resumable, written in input order, never someone else's.

Each record is one `os.write` of a whole line (O_APPEND), so a kill leaves at most one partial
last record. On start the file is read back: every complete line must be one of this tool's
records (`jsonl.record_key`), or the file is refused untouched (it may be someone's notes, or a
record cut in the middle of the file is not ours to repair); an unterminated last line that is
a cut record of ours is cut once the workers are up; the records' keys tell a rerun what to skip.
Records are written in input order through a bounded reordering window; since a run only ever
appends the next lines in order, a resumed file stays in input order too.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable

import anyio

from dinfer_async.jsonl import encode_record, record_key, strict_loads

RECORD_START = b'{"id": '  # how every record this tool writes begins
MAX_RECORD = 64 << 20  # a longer line is not one of our records


class OutputError(Exception):
    """OUT cannot be used; the message says why and what to do."""


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _partial_record(tail: bytes) -> bool:
    """Whether an unterminated last line is what a cut write of ours leaves: it begins like our
    records and is either not a whole JSON value or a whole record (cut just before "\n")."""
    if len(tail) >= MAX_RECORD or not tail.startswith(RECORD_START[: len(tail)]):
        return False
    try:
        value = strict_loads(tail)
    except (ValueError, RecursionError):
        return True
    return record_key(value) is not None


class OutputFile:
    """OUT ("-": stdout, not resumable). Checking (here) touches nothing; `open` creates the
    file or cuts its partial last record, and is called once the workers are ready."""

    def __init__(self, path: str, input_path: str):
        self.path = path
        self.done: set[str] = set()  # keys of the records already in the file
        self.records_before = self.errors_before = 0
        self.fd: int | None = None
        self.cut: int | None = None  # offset of a partial last record
        source = os.fstat(0) if input_path == "-" else os.stat(input_path)
        if path == "-":
            if stat.S_ISREG(source.st_mode) and _same(source, os.fstat(1)):
                raise OutputError("stdout is the input file; write the output elsewhere")
            return
        try:
            target = os.stat(path)
        except FileNotFoundError:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise OutputError(f"cannot create {path}: no directory {folder}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputError(f"cannot create {path}: {folder} is not writable") from None
            return
        if _same(source, target):
            raise OutputError(f"IN and OUT are the same file ({path}); write the output elsewhere")
        if not stat.S_ISREG(target.st_mode) and not stat.S_ISDIR(target.st_mode):
            # /dev/null, a terminal, a pipe: nothing to resume, and nothing to lock
            self._open_existing(os.O_WRONLY, lock=False)
            return
        self._open_existing(os.O_RDWR)
        self._read_back()

    def _open_existing(self, mode: int, lock: bool = True) -> None:
        try:
            fd = os.open(self.path, mode | os.O_APPEND)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror}") from None
        if lock:
            self._lock(fd)
        else:
            self.fd = fd

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another dinfer-batch is writing {self.path}") from None
        except OSError:
            pass  # a file system without locks
        self.fd = fd

    def _read_back(self) -> None:
        assert self.fd is not None
        offset = 0
        with open(self.fd, "rb", closefd=False) as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_RECORD), b""), start=1):
                if not raw.endswith(b"\n"):
                    if _partial_record(raw):
                        self.cut = offset  # a write cut short by a kill: redone by this run
                        return
                    raise self._refuse(number, raw, "(the last line, unterminated)")
                try:
                    key = record_key(strict_loads(raw))
                except (ValueError, RecursionError):
                    key = None
                if key is None:
                    raise self._refuse(number, raw)
                self.done.add(key)
                self.records_before += 1
                self.errors_before += int(key.startswith("line:"))
                offset += len(raw)

    def _refuse(self, number: int, raw: bytes, where: str = "") -> OutputError:
        self.close()
        shown = raw[:60].decode("utf-8", "replace").rstrip("\n")
        return OutputError(
            f"{self.path} line {number} {where + ' ' if where else ''}is not a dinfer-batch "
            f"record ({shown!r}); refusing to touch the file: give another output file, or "
            "delete this one to start over"
        )

    def open(self) -> None:
        """Create the file, or cut its partial last record; from here on records are appended."""
        if self.path == "-":
            self.fd = 1
            return
        if self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {e.strerror}") from None
            self._lock(fd)
        if self.cut is not None and self.fd is not None:
            os.ftruncate(self.fd, self.cut)
            self.cut = None

    def write(self, data: bytes) -> None:
        """Append one record's line (OSError if the disk is full or the pipe closed)."""
        assert self.fd is not None, "open() first"
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self.fd is not None and self.path != "-":
            os.close(self.fd)
        self.fd = None


class InOrder:
    """Writes records in the order their slots were reserved, holding at most `window` records;
    `on_write(record)` is called for each record written."""

    def __init__(self, out: OutputFile, window: int, on_write: Callable[[dict], None]):
        self.out, self.window, self.on_write = out, window, on_write
        self.reserved = self.written = 0
        self.pending: dict[int, tuple[int, dict]] = {}
        self.room = anyio.Event()

    async def reserve(self) -> int:
        while self.reserved - self.written >= self.window:
            self.room = anyio.Event()
            await self.room.wait()
        self.reserved += 1
        return self.reserved - 1

    def put(self, slot: int, line: int, record: dict) -> None:
        """Hand in slot's record (for input line `line`); write every record now in order."""
        self.pending[slot] = (line, record)
        while self.written in self.pending:
            line, record = self.pending.pop(self.written)
            self.out.write(encode_record(record, line))
            self.written += 1
            self.on_write(record)
        self.room.set()
