"""Watch blocks denoise live in the terminal.

python examples/stream.py "reverse planet"
"""

import sys

import anyio

from dinfer_async import Client, SamplingParams
from dinfer_async.protocol import MASK_TEXT


async def main(question: str) -> None:
    params = SamplingParams(gen_length=64, block_length=32, threshold=0.7)
    async with Client(model=None, workers=1) as client:
        blocks: dict[int, str] = {}
        async for chunk in client.stream(
            messages=[{"role": "user", "content": question}], params=params
        ):
            blocks[chunk.block] = chunk.text
            shown = "".join(blocks[b] for b in sorted(blocks))
            print(f"\r\033[Kstep: {shown}", end="", flush=True)
            if chunk.finish_reason:
                stats = chunk.stats
                print(
                    f"\n{chunk.finish_reason}: {stats['tokens']} tokens in {stats['forwards']} "
                    "forwards "
                    f"({stats['tokens_per_forward']:.2f} committed per forward), "
                    f"{stats['seconds'] * 1000:.0f} ms"
                )
    print(f"(undecided positions are shown as {MASK_TEXT})")


if __name__ == "__main__":
    anyio.run(main, " ".join(sys.argv[1:]) or "reverse planet")
