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
OURS = ("dinfer_async", "workers", "dinfer_kernels", "benchmarks", "examples", "__main__")


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


def setup_logging(level: str | int | None = None) -> int:
    """Install the one handler on the root logger (again: replaced, not doubled) and set our
    loggers' level: `level` if given, else DINFER_LOG_LEVEL, else info. Returns the level."""
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
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    chosen = log_level() if level is None else level
    for name in OURS:
        logging.getLogger(name).setLevel(chosen)
    return chosen
