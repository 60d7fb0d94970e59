"""Stop strings (SamplingParams.stop): where an answer ends, and what text is safe to stream.

A dLLM commits whole blocks, so the check runs when a block is done: the answer decoded so far
is searched for the earliest stop string; the answer is cut before it and the request finishes
with "stop" after that block. While streaming, text that could still turn out to be the start
of a stop string is held back until the next block settles it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Decode = Callable[[list[int]], str]


@dataclass
class StopCut:
    tokens: int  # answer tokens kept: those whose text lies wholly before the stop string
    text: str  # the answer's text, cut just before the stop string


def find_stop(text: str, stops: list[str]) -> int | None:
    """The index where the earliest stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def streamable(text: str, stops: list[str]) -> str:
    """The part of `text` that may be shown now: up to a stop string if one is there, else all
    but a tail that is the beginning of some stop string (it may complete in the next block)."""
    at = find_stop(text, stops)
    if at is not None:
        return text[:at]
    for keep in range(max(len(text) - max(map(len, stops)) + 1, 0), len(text)):
        tail = text[keep:]
        if any(s.startswith(tail) for s in stops):
            return text[:keep]
    return text


def cut_at_stop(answer: list[int], stops: list[str], decode: Decode) -> StopCut | None:
    """Where `answer` (token ids before EOS) ends because of a stop string, or None."""
    text = decode(answer)
    at = find_stop(text, stops)
    if at is None:
        return None
    kept = len(answer)
    while kept > 0 and len(decode(answer[:kept])) > at:
        kept -= 1
    return StopCut(kept, text[:at])
