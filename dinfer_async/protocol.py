"""The wire protocol between clients and workers: msgspec Structs, msgpack, one ZeroMQ frame each.

Tagged unions (`type` field) so either side can decode any message with one decoder and answer
an unknown or malformed one with an `Error` instead of crashing. Tensors never travel: tokens
are int lists.
"""

from __future__ import annotations

import msgspec

from dinfer_async.params import SamplingParams

# 2: Welcome carries the worker's size limits and vocabulary (a version-1 client's strict decoder
# would reject the new fields, so the handshake says so plainly instead); errors about a missing
# Hello carry the request id; the greeting lasts as long as the connection.
# 3: Welcome names the devices of the worker group's ranks.
# 4: SamplingParams has suffix_window (a version-3 worker's strict decoder would reject it).
PROTOCOL_VERSION = 4


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


# ---- client -> worker -------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """First message on every connection (a reconnected socket says it again): the worker
    forgets a greeting when the connection that sent it closes."""

    protocol: int
    secret: str = ""


class Submit(Message, tag="submit"):
    """Exactly one of prompt (raw text), messages (chat template applied) or token_ids."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None


class Abort(Message, tag="abort"):
    request_id: str


class Ping(Message, tag="ping"):
    pass


# ---- worker -> client -------------------------------------------------------------------------


class Welcome(Message, tag="welcome"):
    protocol: int
    model: str
    tokenizer: str  # identity of the tokenizer (name and vocabulary size)
    max_prompt_length: int
    max_gen_length: int
    eos_token_id: int
    mask_token_id: int
    pid: int
    vocab_size: int = 0  # token ids must be in [0, vocab_size); 0: unknown
    max_prompt_chars: int = 0  # characters of a prompt (or of all its messages), before tokens
    max_frame_bytes: int = 0  # a longer frame is dropped with its connection (MAXMSGSIZE)
    devices: list[str] = []  # each rank's device ("cuda:0", "cpu", "host/cuda:3"); []: unknown


class Chunk(Message, tag="chunk"):
    """One request's progress after a step: the current block as it stands.

    tokens/text: the block's tokens and text, undecided positions shown as `MASK_TEXT`;
    committed: offsets in the block committed by this step; final: the block is done;
    stable_text: text newly fixed since the previous chunk (committed tokens never change);
    finish_reason and stats are set on the request's last chunk.
    revised: offsets in the block whose committed token an edit changed this step (decoder
    "joint"; its stable_text then covers finished blocks only); confidence: per `tokens` position,
    the probability its token was committed or last revised with (0 where undecided).
    """

    request_id: str
    block: int
    tokens: list[int]
    text: str
    committed: list[int]
    final: bool
    stable_text: str
    finish_reason: str | None = None
    stats: dict | None = None
    revised: list[int] = []
    confidence: list[float] | None = None


class Updates(Message, tag="updates"):
    """Every chunk of one engine step, coalesced into one frame."""

    chunks: list[Chunk]


class Error(Message, tag="error"):
    """A request (or, with request_id None, a frame) was refused. `field` names what was wrong;
    field "hello" means this connection has not said Hello (yet, or since it reconnected)."""

    request_id: str | None
    field: str
    message: str


class Pong(Message, tag="pong"):
    active: int


MASK_TEXT = "░"
AnyMessage = Hello | Submit | Abort | Ping | Welcome | Updates | Error | Pong
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return encoder.encode(message)


def decode(frame: bytes) -> Message:
    """Raises msgspec.DecodeError / ValidationError for anything that is not a valid message."""
    return decoder.decode(frame)
