"""dinfer_async.view: the live picture of a request denoising.

Picture is checked on hand-made chunks (made-up token ids, not the bundled model's), then once
end to end through the Client, where the fixed decoder's schedule fixes how many steps a block
takes whatever the model predicts.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from dinfer_async import Client, SamplingParams
from dinfer_async.protocol import MASK_TEXT, Chunk
from dinfer_async.view import EOS_TEXT, PALETTE, Picture, show, summary

MASK, EOS = 99, 98
M = MASK_TEXT


def chunk(block, tokens, text, committed, final=False, **kw) -> Chunk:
    return Chunk("r", block, tokens, text, committed, final, "", **kw)


def test_each_step_is_a_line_and_each_position_keeps_its_step():
    picture = Picture(EOS, MASK, color=False)
    lines = [
        picture.feed(chunk(0, [MASK, 2, MASK, MASK], f"{M}b{M}{M}", [1])),
        picture.feed(chunk(0, [1, 2, MASK, EOS], f"ab{M}", [0, 3])),
        picture.feed(chunk(0, [1, 2, 3, EOS], "abc", [2], final=True)),
        picture.feed(chunk(0, [1, 2, 3, EOS], "abc", [], final=True, finish_reason="eos")),
    ]
    assert lines[:3] == [
        f"block 0 step  1 |{M}b{M}{M}| +1",
        f"block 0 step  2 |ab{M}{EOS_TEXT}| +2",
        f"block 0 step  3 |abc{EOS_TEXT}| +1",
    ]
    assert lines[3] is None  # nothing new committed: nothing drawn
    assert [c.step for c in picture.cells] == [2, 1, 3, 2]
    assert picture.answer() == "abc" and picture.frames == 3


def test_colours_follow_steps_and_text_after_the_end_is_grey():
    picture = Picture(EOS, MASK, color=True)
    picture.feed(chunk(0, [1, MASK, EOS, 7], f"a{M}z", [0, 2, 3]))
    line = picture.feed(chunk(0, [1, 2, EOS, 7], "abz", [1], final=True))
    first, second = (f"\033[38;5;{PALETTE[i]}m" for i in range(2))
    assert f"{first}a{second}b{first}{EOS_TEXT}\033[38;5;244mz\033[0m" in line
    assert re.sub(r"\033\[[0-9;]*m", "", picture.answer()) == "ab"  # z came after the end


def test_a_run_of_subword_tokens_is_one_cell():
    """Two tokens decoding to five characters: no per-position split is claimed."""
    picture = Picture(EOS, MASK, color=False)
    picture.feed(chunk(0, [5, MASK, MASK], f"hello{M}{M}", [0]))
    picture.feed(chunk(0, [5, 6, EOS], "hello world", [1, 2], final=True))
    assert [(c.text, c.step) for c in picture.cells] == [("hello world", 2)]
    assert picture.answer() == "hello world"


def test_a_new_block_starts_its_steps_again():
    picture = Picture(EOS, MASK, color=False)
    picture.feed(chunk(0, [1, 2], "ab", [0, 1], final=True))
    line = picture.feed(chunk(1, [MASK, EOS], f"{M}", [1]))
    assert line == f"block 1 step  1 |{M}{EOS_TEXT}| +1"
    picture.feed(chunk(1, [3, EOS], "c", [0], final=True))
    assert picture.answer() == "abc"


def test_summary_counts_answer_tokens_per_forward():
    last = chunk(0, [], "", [], True, finish_reason="eos", stats={"tokens": 6, "forwards": 4})
    assert summary(last).startswith("eos: 6 answer tokens in 4 forwards (1.50 per forward)")


async def test_view_draws_every_step_of_a_real_stream():
    """fixed, steps 8 over one block of 32: 8 steps, each a line; the answer is generate()'s."""
    params = SamplingParams(gen_length=32, block_length=32, decoder="fixed", steps=8)
    messages = [{"role": "user", "content": "reverse planet"}]
    async with Client(model=None, workers=1) as client:
        out = io.StringIO()
        picture = await show(client, "reverse planet", params, color=False, out=out)
        completion = await client.generate(messages=messages, params=params)
    lines = out.getvalue().splitlines()
    assert picture.frames == 8 and len([x for x in lines if x.startswith("block 0 step")]) == 8
    assert all(x.endswith("| +4") for x in lines[:8])
    assert picture.answer() == completion.text and MASK_TEXT not in lines[7]
    assert lines[-1].startswith(f"{completion.finish_reason}: ")


def test_importing_the_view_does_not_import_torch():
    code = "import sys, dinfer_async.view; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_version_and_a_bad_flag_are_one_line(capsys):
    from dinfer_async import __version__
    from dinfer_async.view import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"python -m dinfer_async.view {__version__}"
    with pytest.raises(SystemExit) as info:
        main(["--bogus", "x"])
    assert info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
