"""OpenAI request and response shapes for dinfer-serve, as plain dicts (no web framework here).

A request body becomes an `ApiRequest` (what to generate and how, as SamplingParams) or an
`ApiError` naming the offending field. Fields the server cannot honour are refused, never
silently ignored: `n` > 1, `logprobs`, `tools` (the worker applies the chat template to plain
{role, content} messages, so a template's tool support is out of reach: describe tools in a
system message and parse the reply, as examples/openai_agent.py does), `top_p` != 1, penalties,
`logit_bias`, non-text `response_format`, and any field OpenAI does not define and SamplingParams
does not have. Every SamplingParams field (gen_length, block_length, decoder, threshold, cache,
...) is accepted as an extra body field of the same name.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import msgspec

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams
from dinfer_async.protocol import Chunk

# The engine says "eos" where OpenAI says "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DIFFUSION_FIELDS = set(SamplingParams.__struct_fields__) - {
    "max_tokens",
    "stop",
    "temperature",
    "seed",
}
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    "dinfer",
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
MESSAGE_FIELDS = {"role", "content", "name"}  # name is accepted and not used


def _is(*allowed: object):
    return lambda v: any(v == a and type(v) is type(a) for a in allowed)


# OpenAI fields with one value the server can honour: (accepts, what to send instead, why).
NEUTRAL = {
    "n": (lambda v: v in (None, 1) and type(v) is not bool, "1 or leave it out", "one choice"),
    "best_of": (lambda v: v in (None, 1) and type(v) is not bool, "1 or leave it out", "one try"),
    "top_p": (
        lambda v: v is None or (type(v) in (int, float) and v == 1),
        "1 or leave it out",
        "the decoders take the most confident token or sample the full distribution",
    ),
    "logprobs": (
        lambda v: v in (None, False) and type(v) is not int,
        "leave it out",
        "log-probabilities are not returned",
    ),
    "top_logprobs": (_is(None, 0), "leave it out", "log-probabilities are not returned"),
    "presence_penalty": (
        lambda v: v is None or (type(v) in (int, float) and v == 0),
        "0 or leave it out",
        "no penalties",
    ),
    "frequency_penalty": (
        lambda v: v is None or (type(v) in (int, float) and v == 0),
        "0 or leave it out",
        "no penalties",
    ),
    "logit_bias": (lambda v: v is None or v == {}, "leave it out", "no logit bias"),
    "tools": (
        lambda v: v is None or v == [],
        "leave it out",
        "the worker applies the chat template to {role, content} messages only; describe the "
        "tools in a system message and parse the reply (see examples/openai_agent.py)",
    ),
    "tool_choice": (_is(None, "none"), "leave it out", "tools are not supported"),
    "parallel_tool_calls": (_is(None, True, False), "leave it out", "tools are not supported"),
    "functions": (lambda v: v is None or v == [], "leave it out", "functions are not supported"),
    "function_call": (_is(None, "none"), "leave it out", "functions are not supported"),
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        'leave it out or {"type": "text"}',
        "no constrained decoding",
    ),
    "echo": (_is(None, False), "leave it out", "the prompt is not echoed"),
    "suffix": (_is(None), "leave it out", "no fill-in-the-middle"),
}
CHAT_NEUTRAL = {k for k in NEUTRAL if k not in ("best_of", "echo", "suffix")}
COMPLETION_NEUTRAL = {"n", "best_of", "top_p", "logprobs", "presence_penalty"} | {
    "frequency_penalty",
    "logit_bias",
    "echo",
    "suffix",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status)
        if kind is None:
            kind = "service_unavailable_error" if self.status == 503 else "server_error"
            if self.status == 422:
                kind = "invalid_request_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", param=field, code="invalid_value")


@dataclass
class ApiRequest:
    kind: str  # "chat" or "completion"
    model: str
    params: SamplingParams
    messages: list[dict] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    stream: bool = False
    include_usage: bool = False
    denoise: bool = False

    @property
    def inputs(self) -> dict:
        """Keyword arguments for Client.stream."""
        if self.messages is not None:
            return {"messages": self.messages}
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"token_ids": self.token_ids}


def parse_chat(
    body: object, defaults: dict, model: str, max_gen_length: int | None = None
) -> ApiRequest:
    body = _object(body)
    _check_fields(body, CHAT_FIELDS, CHAT_NEUTRAL)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of {role, content} objects")
    plain = [_message(i, m) for i, m in enumerate(messages)]
    request = _common(body, defaults, model, "chat", max_gen_length)
    request.messages = plain
    return request


def parse_completion(
    body: object, defaults: dict, model: str, max_gen_length: int | None = None
) -> ApiRequest:
    body = _object(body)
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    request = _common(body, defaults, model, "completion", max_gen_length)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt.strip():
            raise invalid("prompt", "must be a non-empty string")
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        request.token_ids = prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("prompt", "one prompt per request (send several requests concurrently)")
    else:
        raise invalid("prompt", "must be a non-empty string or a list of token ids")
    return request


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _check_fields(body: dict, known: set[str], neutral: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in DIFFUSION_FIELDS:
            continue
        if name in neutral:
            accepts, instead, why = NEUTRAL[name]
            if not accepts(value):
                raise ApiError(
                    400,
                    f"{name}: {value!r} is not supported by dinfer-serve ({why}); use {instead}",
                    param=name,
                    code="unsupported_parameter",
                )
            continue
        raise ApiError(
            400,
            f"{name}: unknown field; OpenAI's fields and SamplingParams' fields "
            f"({', '.join(sorted(DIFFUSION_FIELDS))}) are accepted",
            param=name,
            code="unknown_parameter",
        )


def _message(i: int, m: object) -> dict:
    if not isinstance(m, dict):
        raise invalid(f"messages[{i}]", "must be an object with 'role' and 'content'")
    for key in m:
        if key not in MESSAGE_FIELDS:
            raise invalid(
                f"messages[{i}].{key}",
                "not supported (a message has role, content and optionally name)",
            )
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"messages[{i}].content[{j}]", "only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content[{j}].text", "must be a string")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"messages[{i}].content", "must be a string or a list of text parts")
    role = m.get("role")
    if not isinstance(role, str):
        raise invalid(f"messages[{i}].role", "must be a string such as 'user'")
    return {"role": "system" if role == "developer" else role, "content": content}


def _common(
    body: dict, defaults: dict, model: str, kind: str, max_gen_length: int | None
) -> ApiRequest:
    asked = body.get("model")
    if asked is not None and asked != model:
        raise ApiError(
            404,
            f"model: {asked!r} is not served here; this server serves {model!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise invalid("stream", "must be true or false")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", 'must be {"include_usage": true|false}')
        include_usage = options.get("include_usage", False)
        if type(include_usage) is not bool:
            raise invalid("stream_options.include_usage", "must be true or false")
    denoise = False
    extension = body.get("dinfer")
    if extension is not None:
        if not isinstance(extension, dict):
            raise invalid("dinfer", 'must be an object such as {"denoise": true}')
        for key in extension:
            if key != "denoise":
                raise invalid(f"dinfer.{key}", "unknown option; the only one is denoise")
        denoise = extension.get("denoise", False)
        if type(denoise) is not bool:
            raise invalid("dinfer.denoise", "must be true or false")
        if denoise and not stream:
            raise invalid("dinfer.denoise", "only allowed when stream is true")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "must be a string")
    return ApiRequest(
        kind=kind,
        model=model,
        params=sampling_params(body, defaults, max_gen_length),
        stream=bool(stream),
        include_usage=include_usage,
        denoise=denoise,
    )


def sampling_params(
    body: dict, defaults: dict, max_gen_length: int | None = None
) -> SamplingParams:
    """The server's defaults, overridden by the request's fields (null means the default)."""
    given = {
        k: v for k, v in body.items() if v is not None and k in SamplingParams.__struct_fields__
    }
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    if given.get("stop") == []:
        del given["stop"]
    fields = {**defaults, **given}
    if "gen_length" in given and "max_tokens" not in given:
        fields.pop("max_tokens", None)  # a request's gen_length beats the server's max_tokens
    try:
        return SamplingParams(**fields).validate(max_gen_length)
    except InvalidRequestError as e:
        field = e.field  # name the field the caller sent
        if field == "gen_length" and "max_tokens" in given and "gen_length" not in given:
            field = "max_tokens"
        if field == "max_tokens" and body.get("max_completion_tokens") is not None:
            field = "max_completion_tokens"
        raise invalid(field, e.reason) from None


# ---- responses ---------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(stats: dict | None) -> dict:
    """OpenAI's usage plus dInfer's forwards and tokens per forward. prompt_tokens comes from
    the worker's stats when they carry it (0 otherwise: the server never sees the prompt's
    tokens, the worker applies the chat template and tokenizes)."""
    stats = stats or {}
    prompt = int(stats.get("prompt_tokens", 0))
    completion = int(stats.get("tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "forwards": int(stats.get("forwards", 0)),
        "tokens_per_forward": round(float(stats.get("tokens_per_forward", 0.0)), 4),
    }


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def response(request: ApiRequest, rid: str, text: str, last: Chunk) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    reason = finish_reason(last.finish_reason)
    if request.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [choice],
        "usage": usage(last.stats),
    }


class StreamShape:
    """Builds the SSE events of one streamed request (chat.completion.chunk or text_completion)."""

    def __init__(self, request: ApiRequest, rid: str):
        self.request, self.rid, self.created = request, rid, int(time.time())
        self.object = "chat.completion.chunk" if request.kind == "chat" else "text_completion"

    def _event(self, choices: list[dict], **extra) -> bytes:
        body = {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.request.model,
            "choices": choices,
            **extra,
        }
        if self.request.include_usage and "usage" not in extra:
            body["usage"] = None
        return b"data: " + msgspec.json.encode(body) + b"\n\n"

    def _choice(self, text: str | None, reason: str | None, role: bool = False) -> dict:
        if self.request.kind == "completion":
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}

    def start(self) -> bytes | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if self.request.kind != "chat":
            return None
        return self._event([self._choice("", None, role=True)])

    def chunk(self, chunk: Chunk) -> bytes | None:
        """A delta of the newly stable text (None if there is none), or with denoise, every
        step's block as it stands in the `dinfer` field."""
        if chunk.finish_reason is not None:
            return self.finish(chunk)
        if not self.request.denoise:
            return (
                self._event([self._choice(chunk.stable_text, None)]) if chunk.stable_text else None
            )
        return self._event([self._choice(chunk.stable_text or None, None)], dinfer=_denoise(chunk))

    def finish(self, chunk: Chunk) -> bytes:
        extra = {"dinfer": _denoise(chunk)} if self.request.denoise else {}
        text = chunk.stable_text or None
        events = [self._event([self._choice(text, finish_reason(chunk.finish_reason))], **extra)]
        if self.request.include_usage:
            events.append(self._event([], usage=usage(chunk.stats)))
        return b"".join(events) + b"data: [DONE]\n\n"


def _denoise(chunk: Chunk) -> dict:
    """The extension's view of a step: the block as it stands, which positions this step
    committed and which a token edit revised (decoder "joint"), and their confidence."""
    return {
        "block": chunk.block,
        "text": chunk.text,
        "committed": chunk.committed,
        "revised": chunk.revised,
        "confidence": chunk.confidence,
        "final": chunk.final,
    }


def error_event(error: ApiError) -> bytes:
    return b"data: " + msgspec.json.encode(error.body()) + b"\n\n"
