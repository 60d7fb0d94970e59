"""One check of a request's input, shared by the client, the worker and the engine.

Each used to check its own subset, so the same bad request failed as a UnicodeEncodeError, an
OverflowError or a TypeError depending on where it was caught, or was tokenized before its size
was known. Every refusal here is an InvalidRequestError naming the field (`prompt`,
`messages[0].content`, `token_ids`, ...). Importing this never imports torch.

Size bounds, all derived from the model's `max_prompt_length` (tokens) unless set explicitly:
- a prompt (or all the strings of a messages list together) may hold at most
  `max_prompt_length * CHARS_PER_TOKEN` characters; this is checked before tokenization, so a
  huge prompt costs nothing. A prompt whose tokens average more than CHARS_PER_TOKEN characters
  is refused even if it would fit: raise the worker's `--max-prompt-chars` for such inputs.
- one frame (a whole Submit) may hold at most `frame_bytes_limit(...)` bytes: 4 bytes per allowed
  character (UTF-8), 9 per allowed token id (msgpack's widest integer) and FRAME_SLACK for the
  request id, the params and the message structure. The worker's socket drops a larger frame
  (ZeroMQ's MAXMSGSIZE) before reading it, so the client refuses it first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import msgspec

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
CHARS_PER_TOKEN = 16  # generous: English BPE averages about 4 characters a token
FRAME_SLACK = 1 << 20  # room in a frame beyond the prompt itself (ids, params, message keys)
PARAMS_ROOM = 64 << 10  # what a Submit holds besides the prompt (request id, params, stop strings)
MAX_DEPTH = 32  # nesting allowed inside a message's extra keys
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry


@dataclass(frozen=True)
class Limits:
    """What a worker accepts; None where no limit is known (in-process, or before a handshake)."""

    vocab_size: int | None = None
    max_prompt_length: int | None = None  # tokens
    max_prompt_chars: int | None = None  # characters, checked before tokenization
    max_frame_bytes: int | None = None  # bytes of one encoded Submit
    max_gen_length: int | None = None

    @classmethod
    def for_model(
        cls,
        vocab_size: int,
        max_prompt_length: int,
        max_gen_length: int | None = None,
        max_prompt_chars: int | None = None,
        max_frame_bytes: int | None = None,
    ) -> Limits:
        """A worker's limits: the character and frame bounds default to the documented ones."""
        chars = max_prompt_chars or prompt_chars_limit(max_prompt_length)
        frame = max_frame_bytes or frame_bytes_limit(max_prompt_length, chars)
        return cls(vocab_size, max_prompt_length, chars, frame, max_gen_length)

    @classmethod
    def from_welcomes(cls, welcomes: Iterable) -> Limits:
        """The tightest limits over the workers' handshakes (Welcome messages; None skipped)."""
        names = [f.name for f in fields(cls)]
        found: dict[str, int] = {}
        for welcome in welcomes:
            if welcome is None:
                continue
            for name in names:
                value = getattr(welcome, name, 0)
                if value and value > 0:
                    found[name] = min(found.get(name, value), value)
        return cls(**found)


NO_LIMITS = Limits()


# expert-parallel dispatches (workers/parallel/layers.py), named here without torch
EP_DISPATCHES = ("all_reduce", "all_to_all")


def check_parallel(tensor_parallel_size: object, expert_parallel: object) -> None:
    """The one check of a worker group's shape, for the Client and the Engine alike."""
    if (
        isinstance(tensor_parallel_size, bool)
        or not isinstance(tensor_parallel_size, int)
        or tensor_parallel_size < 1
    ):
        raise InvalidRequestError(
            "tensor_parallel_size", f"{tensor_parallel_size!r} must be an integer >= 1"
        )
    if expert_parallel not in (False, True, None, *EP_DISPATCHES):
        raise InvalidRequestError(
            "expert_parallel",
            f"{expert_parallel!r}: use True, False, 'all_reduce' or 'all_to_all'",
        )
    if expert_parallel and tensor_parallel_size == 1:
        raise InvalidRequestError(
            "expert_parallel",
            "splits the experts over the tensor-parallel ranks: set tensor_parallel_size > 1",
        )


def check_steps_per_check(value: object) -> None:
    """None (the worker's default) or an integer >= 1, for the Client and the Scheduler."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequestError("steps_per_check", f"{value!r} must be an integer >= 1")


def prompt_chars_limit(max_prompt_length: int) -> int:
    """Characters a prompt may have before it is tokenized."""
    return max_prompt_length * CHARS_PER_TOKEN


def frame_bytes_limit(max_prompt_length: int, max_prompt_chars: int | None = None) -> int:
    """Bytes one Submit frame may have: the longest allowed prompt in any of its forms."""
    chars = max_prompt_chars or prompt_chars_limit(max_prompt_length)
    return 4 * chars + 9 * max_prompt_length + FRAME_SLACK


# ---- pieces ------------------------------------------------------------------------------------


def check_text(value: object, field: str) -> str:
    """A str that UTF-8 can carry (no lone surrogates such as '\\ud800')."""
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            field,
            f"holds a lone surrogate {value[e.start]!r} at character {e.start}; "
            "send valid Unicode text (pair the surrogate or drop it)",
        ) from None
    return value


def check_json(value: object, field: str, depth: int = 0) -> int:
    """A JSON-like value (str, finite number, bool, null, list, object with string keys) that
    msgpack can carry; returns the number of characters in its strings."""
    if depth > MAX_DEPTH:
        raise InvalidRequestError(field, f"is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, str):
        return len(check_text(value, field))
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise InvalidRequestError(field, f"integer {value} does not fit in 64 bits")
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(field, f"{value!r} is not a finite number (not JSON)")
        return 0
    if isinstance(value, (list, tuple)):
        return sum(check_json(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, dict):
        chars = 0
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidRequestError(field, f"key {key!r} is not a string (not JSON)")
            chars += len(check_text(key, f"{field} key")) + check_json(
                v, f"{field}.{key}", depth + 1
            )
        return chars
    raise InvalidRequestError(
        field,
        f"{type(value).__name__!r} values are not JSON (use a string, number, bool, null, list "
        "or object)",
    )


def check_messages(messages: object, limits: Limits = NO_LIMITS) -> None:
    """A non-empty list of {role, content} objects; extra keys must be JSON-like."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}"
            )
    _check_chars(sum(len(m["content"]) for m in messages), limits, "messages")  # cheap, first
    chars = 0
    for i, m in enumerate(messages):
        chars += check_json(m, f"messages[{i}]", 1)
        _check_chars(chars, limits, "messages")
    if limits.max_frame_bytes:
        _check_bytes(len(msgspec.msgpack.encode(messages)), limits, "messages")


def check_token_ids(ids: object, vocab_size: int | None = None, field: str = "token_ids") -> None:
    """A non-empty list of ints in [0, vocab_size) (below 2**63 when the vocabulary is unknown)."""
    if not isinstance(ids, (list, tuple)) or not ids:
        raise InvalidRequestError(field, "must be a non-empty list of token ids (integers)")
    high = vocab_size if vocab_size is not None else 2**63
    for i, t in enumerate(ids):
        if type(t) is not int or not 0 <= t < high:
            raise InvalidRequestError(
                field, f"token ids must be integers in [0, {high}); item {i} is {t!r}"
            )


def check_input(
    prompt: object = None,
    messages: object = None,
    token_ids: object = None,
    limits: Limits = NO_LIMITS,
) -> None:
    """Exactly one of prompt (raw text), messages (chat) or token_ids, each well-formed and
    within the limits that can be checked without a tokenizer."""
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise InvalidRequestError(
            "prompt", "give exactly one of prompt (raw text), messages or token_ids"
        )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("prompt", "must be a non-empty string")
        _check_chars(len(prompt), limits, "prompt")  # before the O(n) encode below
        check_text(prompt, "prompt")
        if limits.max_frame_bytes:
            _check_bytes(len(prompt.encode("utf-8")), limits, "prompt")
    elif messages is not None:
        check_messages(messages, limits)
    else:
        check_token_ids(token_ids, limits.vocab_size)
        count = len(token_ids)  # type: ignore[arg-type]  # a list: checked just above
        if limits.max_prompt_length and count > limits.max_prompt_length:
            raise InvalidRequestError(
                "token_ids",
                f"{count} tokens exceed the worker's max_prompt_length "
                f"{limits.max_prompt_length}; shorten the prompt",
            )


def check_request(
    prompt: object = None,
    messages: object = None,
    token_ids: object = None,
    params: SamplingParams | None = None,
    limits: Limits = NO_LIMITS,
) -> SamplingParams:
    """check_input plus the params; returns the validated SamplingParams (defaults if None)."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("params", "must be a SamplingParams")
    params = params.validate(max_gen_length=limits.max_gen_length)
    check_input(prompt, messages, token_ids, limits)
    return params


def _check_chars(chars: int, limits: Limits, field: str) -> None:
    if limits.max_prompt_chars and chars > limits.max_prompt_chars:
        raise InvalidRequestError(
            field,
            f"{chars} characters exceed the worker's limit of {limits.max_prompt_chars} "
            "(checked before tokenization; a worker sets it with --max-prompt-chars); "
            "shorten the prompt",
        )


def _check_bytes(size: int, limits: Limits, field: str) -> None:
    room = (limits.max_frame_bytes or 0) - PARAMS_ROOM
    if size > room:
        raise InvalidRequestError(
            field,
            f"{size} bytes encoded exceed the {room} a request may carry (the worker's "
            f"max_frame_bytes {limits.max_frame_bytes}); shorten the prompt",
        )
