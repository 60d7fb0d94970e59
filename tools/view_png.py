"""Render what `python -m dinfer_async.view` draws, in its terminal colours, to a PNG (for the
README, where the colours of a terminal do not survive).

    python tools/view_png.py examples/denoising.png   # matplotlib: pip install -e '.[plot]'

Runs the bundled model through the Client on one prompt under two decoders and draws every
step's line, as the view prints them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from dinfer_async import Client, SamplingParams
from dinfer_async.logs import setup_logging
from dinfer_async.protocol import Chunk
from dinfer_async.view import GREY, PALETTE, Picture, summary

log = logging.getLogger("tools.view_png")
LEVELS = (0, 95, 135, 175, 215, 255)  # xterm-256's colour cube


def xterm(code: int) -> tuple[float, float, float]:
    """An xterm-256 colour code (16-255) as matplotlib RGB."""
    if code >= 232:
        v = (8 + 10 * (code - 232)) / 255
        return (v, v, v)
    i = code - 16
    return (LEVELS[i // 36] / 255, LEVELS[i // 6 % 6] / 255, LEVELS[i % 6] / 255)


async def run(prompt: str, settings: dict[str, SamplingParams]) -> list[tuple[str, Picture, str]]:
    """For each setting: its name, the Picture of the stream, the summary line."""
    out = []
    async with Client(model=None, workers=1) as client:
        eos, mask = client.welcome.eos_token_id, client.welcome.mask_token_id
        for name, params in settings.items():
            picture = Picture(eos, mask, color=False)
            messages = [{"role": "user", "content": prompt}]
            async for chunk in client.stream(messages=messages, params=params):
                assert isinstance(chunk, Chunk)
                picture.feed(chunk)
                if chunk.finish_reason:
                    out.append((name, picture, summary(chunk).rsplit(", ", 1)[0]))  # no ms
    return out


def draw(prompt: str, runs: list[tuple[str, Picture, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[list[tuple[str, tuple[float, float, float]]]] = []
    white, dim = (0.9, 0.9, 0.9), xterm(GREY)
    for name, picture, result in runs:
        lines.append([(f"{prompt!r}, decoder {name}:", white)])
        for block, step, cells, added in picture.history:
            row = [(f"block {block} step {step:>2} |", white)]
            for cell in cells:
                masked = cell.step is None or cell.dropped
                color = dim if masked else xterm(PALETTE[(cell.step - 1) % len(PALETTE)])
                row.append((cell.text, color))
            row.append((f"| +{added}", white))
            lines.append(row)
        lines.append([(result, dim)])
        lines.append([])
    width = max(sum(len(t) for t, _ in row) for row in lines)
    char_w, line_h = 0.105, 0.21  # inches per character / line at the font size below
    fig = plt.figure(figsize=(width * char_w + 0.4, len(lines) * line_h + 0.3), dpi=130)
    fig.patch.set_facecolor((0.08, 0.08, 0.1))
    for y, row in enumerate(lines):
        x = 0
        for text, color in row:
            for ch in text:
                fig.text(
                    (0.2 + x * char_w) / fig.get_figwidth(),
                    1 - (0.2 + (y + 0.7) * line_h) / fig.get_figheight(),
                    ch,
                    color=color,
                    family="DejaVu Sans Mono",
                    fontsize=11,
                )
                x += 1
    fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("png")
    ap.add_argument("--prompt", default="copy maple ocean happy lazy light")
    args = ap.parse_args(argv)
    settings = {
        "threshold 0.9 (the default)": SamplingParams(gen_length=64, block_length=32),
        "fixed, 8 steps per block": SamplingParams(
            gen_length=64, block_length=32, decoder="fixed", steps=16
        ),
    }
    runs = anyio.run(run, args.prompt, settings)
    draw(args.prompt, runs, Path(args.png))
    log.info("wrote %s", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
