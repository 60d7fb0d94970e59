"""Logging for the command-line tools: one format, the level from DINFER_LOG_LEVEL, and lines
that never break a progress bar.

Library code only calls `logging.getLogger(__name__)`; entry points (dinfer-batch, dinfer-worker,
dinfer-serve, `python -m dinfer_async.view`, the examples) call `setup_logging()` once. Records go
through `tqdm.write`, which clears an active bar, writes the line and redraws the bar, so a worker's
start-up line never lands in the middle of the bar.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "DINFER_LOG_LEVEL"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
# Our loggers follow DINFER_LOG_LEVEL; others' (transformers, urllib3, ...) stay at warning.
OURS = ("dinfer_async", "dinfer", "workers", "dinfer_kernels", "benchmarks", "examples", "__main__")


class OneLine(logging.Formatter):
    """A command's own format: `prog: message` (`prog: error: message` from warning up) for our
    loggers, `logger: message` for others'; one record on one line; tracebacks only when asked."""

    def __init__(self, prog: str, tracebacks: bool):
        super().__init__()
        self.prog, self.tracebacks = prog, tracebacks

    def format(self, record: logging.LogRecord) -> str:
        own = record.name == "root" or record.name.split(".")[0] in OURS
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        text = " ".join(record.getMessage().split())
        line = f"{self.prog if own else record.name}: {level}{text}"
        if record.exc_info and self.tracebacks:
            line += "\n" + self.formatException(record.exc_info)
        return line


class TqdmHandler(logging.Handler):
    """Writes each record on stderr through tqdm.write (a plain write when no bar is active)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def log_level(default: str = "info") -> int:
    """The level DINFER_LOG_LEVEL names (debug, info, warning, error; any case), else `default`."""
    text = os.environ.get(ENV, "").strip().lower()
    if not text:
        return LEVELS[default]
    if text not in LEVELS:
        logging.getLogger(__name__).warning(
            "%s=%r is not a level; using %s (choose one of %s)",
            ENV,
            os.environ[ENV],
            default,
            ", ".join(LEVELS),
        )
        return LEVELS[default]
    return LEVELS[text]


def debug_enabled() -> bool:
    """Whether DINFER_LOG_LEVEL asks for debug output (tracebacks, per-step detail)."""
    return os.environ.get(ENV, "").strip().lower() == "debug"


def setup_logging(
    level: str | int | None = None, prog: str | None = None, debug: bool = False
) -> int:
    """Install the one handler on the root logger (again: replaced, not doubled) and set our
    loggers' level: debug with `debug`, else `level` if given, else DINFER_LOG_LEVEL, else
    info. With `prog` (a command's name) records read `prog: message` and tracebacks show only
    at debug level; without it, a timestamped format. Returns the level."""
    if debug:
        level = logging.DEBUG
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
        level = LEVELS[level.lower()]
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, TqdmHandler)]:
        root.removeHandler(old)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # others' loggers (transformers, urllib3, ...) stay quiet
    chosen = log_level() if level is None else level  # a bad DINFER_LOG_LEVEL is logged
    if prog is not None:
        handler.setFormatter(OneLine(prog, tracebacks=chosen <= logging.DEBUG))
    for name in OURS:
        logging.getLogger(name).setLevel(chosen)
    return chosen
