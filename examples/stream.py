"""Watch blocks denoise live in the terminal, under two decoders.

    python examples/stream.py
    python examples/stream.py "copy maple ocean happy lazy light"

Each line is one engine step of the current block: still-masked positions show as ░, end of
text as ·, and each decided position in the colour of the step that committed it. The default
decoder (threshold 0.9) commits every position it is sure of, so a copy task of the bundled
model takes a handful of forwards; LLaDA's fixed schedule commits the same number each step.
"""

import sys

import anyio

from dinfer_async import Client, SamplingParams
from dinfer_async.logs import setup_logging
from dinfer_async.view import Picture, summary, use_color

SETTINGS = {
    "threshold 0.9 (the default)": SamplingParams(gen_length=64, block_length=32),
    "fixed, 8 steps per block": SamplingParams(
        gen_length=64, block_length=32, decoder="fixed", steps=16
    ),
}


async def main(question: str) -> None:
    async with Client(model=None, workers=1) as client:  # model=None: the bundled model
        for name, params in SETTINGS.items():
            print(f"\n{question!r}, decoder {name}:")
            welcome = client.welcome
            picture = Picture(welcome.eos_token_id, welcome.mask_token_id, color=use_color())
            async for chunk in client.stream(
                messages=[{"role": "user", "content": question}], params=params
            ):
                line = picture.feed(chunk)  # None when the chunk changed nothing
                if line:
                    print(line, flush=True)
                if chunk.finish_reason:
                    print(f"answer  |{picture.answer()}|")
                    print(summary(chunk))


if __name__ == "__main__":
    setup_logging()
    anyio.run(main, " ".join(sys.argv[1:]) or "copy fox pearl olive happy piano quiet")
