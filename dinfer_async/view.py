"""Watch a diffusion model denoise one prompt, step by step, in the terminal.

    python -m dinfer_async.view "copy fox pearl olive happy piano quiet"
    python -m dinfer_async.view "reverse planet" --decoder fixed --steps 32
    python -m dinfer_async.view "add 29+47" --threshold 0.999 --model GSAI-ML/LLaDA-8B-Instruct

One line per engine step of the current block: positions still masked show as the mask glyph,
the others in the colour of the step that committed them, then how many positions that step
committed. The last lines show the answer in those colours and the request's stats. It runs
the model through the Client (a worker process), so this module imports no torch.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from typing import NamedTuple, TextIO

import anyio

from dinfer_async.cli import (
    Parser,
    add_common_flags,
    add_engine_flags,
    add_sampling_flags,
    sampling_defaults,
)
from dinfer_async.client import Client
from dinfer_async.errors import DinferError
from dinfer_async.logs import setup_logging
from dinfer_async.params import SamplingParams
from dinfer_async.protocol import MASK_TEXT, Chunk

log = logging.getLogger("dinfer_async.view")
PROG = "python -m dinfer_async.view"

# xterm-256 colours for steps 1, 2, 3, ... of a block (cycling); masked and dropped cells grey.
PALETTE = (196, 208, 226, 46, 51, 33, 129, 201, 130, 105)
GREY = 244
EOS_TEXT = "·"  # a committed end-of-text position (it decodes to no text)
# What the view uses when a flag is not given (SamplingParams' own default is 256 tokens).
VIEW_DEFAULTS = {"gen_length": 64, "block_length": 32}


class Cell(NamedTuple):
    text: str
    step: int | None  # the block's step that committed it; None: still masked
    dropped: bool = False  # decoded after the answer's end of text: not part of the answer
    eos: bool = False  # the end of text itself


def paint(cells: list[Cell], color: bool) -> str:
    """The cells' text, each in the colour of its step when `color`."""
    if not color:
        return "".join(c.text for c in cells)
    out, current = [], -1
    for cell in cells:
        code = GREY if cell.step is None or cell.dropped else PALETTE[(cell.step - 1) % 10]
        if code != current:
            out.append(f"\033[38;5;{code}m")
            current = code
        out.append(cell.text)
    return "".join(out) + "\033[0m"


class Picture:
    """Turns one request's chunks into lines: one per step that changed the current block.

    A chunk has the block's tokens, its text and the offsets this step committed; the client
    has no tokenizer, so the text is cut into per-position cells using the runs the worker
    decoded (each masked position is one mask glyph; each run of other tokens is decoded
    together, an end of text decoding to nothing). Where a run's text has one character per
    token (a byte-level tokenizer such as the bundled model's) every cell is one position;
    otherwise the run is one cell, in the colour of its latest step.
    """

    def __init__(self, eos_token_id: int, mask_token_id: int, color: bool = True):
        self.eos, self.mask, self.color = eos_token_id, mask_token_id, color
        self.block = -1
        self.step = 0  # steps so far in the current block
        self.step_of: dict[int, int] = {}  # offset in the block -> the step that committed it
        self.cells: list[Cell] = []  # the current block as last drawn
        self.done: list[Cell] = []  # the answer's cells, from every finished block
        self.ended = False  # an end of text was committed in a finished block
        self.frames = 0  # lines drawn
        self.history: list[tuple[int, int, list[Cell], int]] = []  # (block, step, cells, +n)

    def feed(self, chunk: Chunk) -> str | None:
        """The line to draw for this chunk, or None when it changed nothing."""
        if chunk.block != self.block:
            self.block, self.step, self.step_of, self.cells = chunk.block, 0, {}, []
        line = None
        if chunk.committed or not self.cells:
            self.step += 1
            for offset in chunk.committed:
                self.step_of.setdefault(offset, self.step)
            self.cells = self._cells(chunk)
            self.frames += 1
            self.history.append((chunk.block, self.step, self.cells, len(chunk.committed)))
            line = (
                f"block {chunk.block} step {self.step:>2} |{paint(self.cells, self.color)}| "
                f"+{len(chunk.committed)}"
            )
        if chunk.final and not self.ended:
            self.done += [c for c in self.cells if not (c.dropped or c.eos)]
            self.ended = self.eos in chunk.tokens
        return line

    def _cells(self, chunk: Chunk) -> list[Cell]:
        cells: list[Cell] = []
        text, at, offset = chunk.text, 0, 0
        ended = self.ended  # past the answer's end of text
        for is_mask, group in itertools.groupby(chunk.tokens, key=lambda t: t == self.mask):
            run = list(group)
            offsets = range(offset, offset + len(run))
            offset += len(run)
            if is_mask:
                cells += [Cell(MASK_TEXT, None)] * len(run)
                at += len(run)
                continue
            end = text.find(MASK_TEXT, at)
            piece, at = text[at : len(text) if end < 0 else end], len(text) if end < 0 else end
            words = [t for t in run if t != self.eos]
            if len(piece) == len(words):  # one character per token: exact
                chars = iter(piece)
                for i, token in zip(offsets, run):
                    step = self.step_of.get(i, self.step)
                    if token == self.eos:
                        cells.append(Cell(EOS_TEXT, step, eos=True))
                        ended = True
                    else:
                        cells.append(Cell(next(chars), step, ended))
            else:
                latest = max(self.step_of.get(i, self.step) for i in offsets)
                cells.append(Cell(piece, latest, ended))
                ended = ended or self.eos in run
        return cells

    def answer(self) -> str:
        """The answer so far, each character in the colour of the step that committed it."""
        return paint(self.done, self.color)


def summary(chunk: Chunk) -> str:
    """One line from the last chunk's stats: answer tokens, forwards, and their ratio."""
    stats = chunk.stats or {}
    tokens, forwards = stats.get("tokens", 0), stats.get("forwards", 0)
    return (
        f"{chunk.finish_reason}: {tokens} answer tokens in {forwards} forwards "
        f"({tokens / max(forwards, 1):.2f} per forward), {stats.get('seconds', 0.0) * 1000:.0f} ms"
    )


def use_color(stream: TextIO = sys.stdout) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


async def show(
    client: Client,
    prompt: str,
    params: SamplingParams,
    raw: bool = False,
    color: bool = True,
    out: TextIO = sys.stdout,
) -> Picture:
    """Stream one prompt (a user message, or raw text) and draw each step as it arrives."""
    welcome = client.welcome
    if welcome is None:  # not open yet, or its only worker is being restarted
        raise DinferError("no worker has greeted the client: open it and wait_ready() first")
    picture = Picture(welcome.eos_token_id, welcome.mask_token_id, color)
    messages = None if raw else [{"role": "user", "content": prompt}]
    last: Chunk | None = None
    async for chunk in client.stream(prompt if raw else None, messages=messages, params=params):
        assert isinstance(chunk, Chunk)  # text_only is off: every item is a Chunk
        line = picture.feed(chunk)
        if line is not None:
            print(line, file=out, flush=True)
        last = chunk
    legend = "colour: the step that committed it" if color else "one line per step"
    keys = f"{MASK_TEXT} still masked, {EOS_TEXT} end of text; {legend}"
    print(f"answer  |{picture.answer()}|  ({keys})", file=out)
    if last is not None:
        print(summary(last), file=out, flush=True)
    return picture


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("prompt", nargs="+", help="the user message (words are joined by spaces)")
    ap.add_argument("--raw", action="store_true", help="send as raw text, no chat template")
    ap.add_argument("--no-color", action="store_true", help="plain text (also: NO_COLOR=1)")
    add_common_flags(ap, PROG)
    add_engine_flags(ap)
    add_sampling_flags(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(prog=PROG, debug=args.debug)
    try:
        params = SamplingParams(**{**VIEW_DEFAULTS, **sampling_defaults(args)}).validate()
    except (DinferError, ValueError, TypeError) as e:
        log.error("%s", e)
        return 2
    color = use_color() and not args.no_color

    async def run() -> None:
        async with Client(
            model=args.model,
            workers=1,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
        ) as client:
            await show(client, " ".join(args.prompt), params, raw=args.raw, color=color)

    try:
        anyio.run(run)
    except DinferError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
