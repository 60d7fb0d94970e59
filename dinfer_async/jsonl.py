"""dinfer-batch's line formats: input lines to jobs, results to output records.

Input, one JSON object per line (UTF-8; a BOM on line 1 is skipped):
- native: {"id", "prompt"} (raw text) or {"id", "messages"} (chat template applied), optionally
  with SamplingParams fields; any other field is an error naming the closest known one;
- OpenAI Batch: {"custom_id", "method": "POST", "url", "body"}, the body holding "messages"
  (/v1/chat/completions) or "prompt" (/v1/completions). Honoured: max_tokens (or
  max_completion_tokens), temperature, seed, stop, and SamplingParams fields as extensions;
  model, user and metadata are labels; top_p, n, logprobs, tools, ... only at their no-op value.

Output records, one per input line, keyed like their input (see `record_key`):
- completion: {"id", "text", "token_ids", "finish_reason", "stats"};
- error: {"id", "error": {"line", "message"}} (id null when the line has no usable id);
- OpenAI: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
  "error": null | {"code", "message", "line"}}.
Records are strict JSON (no NaN, valid UTF-8): `encode_record` guarantees it.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import cast

import msgspec

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams

PARAM_FIELDS = tuple(SamplingParams.__struct_fields__)
NATIVE_FIELDS = ("id", "prompt", "messages", *PARAM_FIELDS)
OPENAI_FIELDS = ("custom_id", "method", "url", "body")
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
OPENAI_HONOURED = (
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "seed",
    "stop",
)
OPENAI_LABELS = ("model", "user", "metadata")  # any value: they change nothing here
# OpenAI fields dinfer does not implement, accepted only at the value that changes nothing
OPENAI_NOOP: dict[str, object] = {
    "top_p": 1,
    "n": 1,
    "best_of": 1,
    "stream": False,
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "text"},
}
BOM = b"\xef\xbb\xbf"
LONG_KEY = 200  # ids longer than this (as JSON) are remembered by their hash
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass
class Job:
    line: int
    id: str | int | float
    prompt: str | None
    messages: list | None
    params: SamplingParams
    openai: str | None = None  # the request url for an OpenAI Batch line

    @property
    def key(self) -> str:
        """What identifies this line's output record (see record_key)."""
        return id_key(self.id)


@dataclass
class LineError:
    line: int
    id: str | int | float | None
    message: str
    openai: bool = False

    @property
    def key(self) -> str:
        return f"line:{self.line}"

    def record(self) -> dict:
        if self.openai:
            return {
                "id": f"batch_req_line{self.line}",
                "custom_id": self.id,
                "response": None,
                "error": {"code": "invalid_request", "message": self.message, "line": self.line},
            }
        return {"id": self.id, "error": {"line": self.line, "message": self.message}}


def id_key(value: str | int | float | None) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > LONG_KEY:
        return "id#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return "id:" + text


# ---- input ---------------------------------------------------------------------------------


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity); use a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a 64-bit float")
    return value


def strict_loads(text: str | bytes) -> object:
    """json.loads without NaN, Infinity or floats that overflow (ValueError, as for bad JSON)."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


class _NotJSON:
    """Stands for NaN, Infinity or an overflowing float while a line is parsed, so the error
    can name the field (and echo the line's id)."""

    def __init__(self, text: str):
        self.text = text


def _loads_marking(text: str) -> tuple[object, bool]:
    """json.loads with NaN, Infinity and overflowing floats as _NotJSON markers; and whether
    the value may hold a marker or a lone surrogate (only a \\uD800-\\uDFFF escape can make
    one: the text itself is valid UTF-8), so the walk over it is skipped for ordinary lines."""
    marked: list[_NotJSON] = []

    def constant(name: str) -> _NotJSON:
        marked.append(_NotJSON(name))
        return marked[-1]

    def number(digits: str) -> float | _NotJSON:
        value = float(digits)
        return value if math.isfinite(value) else constant(digits)

    value = json.loads(text, parse_constant=constant, parse_float=number)
    return value, bool(marked) or _SURROGATE_ESCAPE.search(text) is not None


def _not_text(value: object, path: str = "") -> str | None:
    """What in a parsed line cannot go on: NaN/Infinity (not strict JSON) or a lone UTF-16
    surrogate (JSON "\\ud800": not Unicode, so neither tokenized nor written back as UTF-8)."""
    stack: list[tuple[str, object]] = [(path, value)]
    while stack:
        path, item = stack.pop()
        where = path or "the line"
        if isinstance(item, _NotJSON):
            return f"{where} is {item.text}: not JSON (strict JSON has no NaN or Infinity)"
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return f"{where} holds U+{ord(found.group()):04X}, a lone surrogate: not Unicode"
        elif isinstance(item, dict):
            for k, v in item.items():
                if _SURROGATE.search(k):
                    return f"a key in {where} holds a lone surrogate: not Unicode"
                stack.append((f"{path}.{k}" if path else k, v))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return None


def decode_line(line: int, raw: bytes) -> str | LineError:
    """Bytes of one input line -> text, or a LineError saying where the bytes are not UTF-8."""
    if line == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(
            line,
            None,
            f"not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason}); "
            "save the file as UTF-8",
        )


def _bad_id(value: object, field: str) -> str | None:
    if isinstance(value, str) and value:
        return None
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return None
    return f"'{field}' is missing or not a non-empty string or number; give each line a unique id"


@functools.lru_cache(maxsize=1024)
def _closest(name: str, known: tuple[str, ...]) -> str | None:
    """The known field `name` is most likely a typo of (cached: a file repeats its mistakes)."""
    close = difflib.get_close_matches(name, known, n=1) if len(name) <= 64 else []
    return close[0] if close else None


def _unknown(fields: list[str], known: tuple[str, ...], where: str = "") -> str:
    names = []
    for name in fields:
        close = _closest(name, known)
        names.append(f"'{where}{name}'" + (f" (did you mean '{where}{close}'?)" if close else ""))
    return f"unknown field{'s' if len(names) > 1 else ''} " + ", ".join(names)


def _sampling(
    line: int, rid: str | int | float, openai: bool, defaults: dict, overrides: dict
) -> SamplingParams | LineError:
    base = dict(defaults)
    if "gen_length" in overrides and "max_tokens" not in overrides:
        base.pop("max_tokens", None)  # the line's own length wins over the flag's
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    try:
        return msgspec.convert({**base, **overrides}, SamplingParams).validate()
    except msgspec.ValidationError as e:
        return LineError(line, rid, f"bad sampling parameter: {e}", openai)
    except InvalidRequestError as e:
        return LineError(line, rid, str(e), openai)


def parse_line(line: int, text: str, defaults: dict) -> Job | LineError:
    """One input line -> a Job, or a LineError naming what is wrong and how to fix it."""
    try:
        obj, suspect = _loads_marking(text)
    except ValueError as e:  # not JSON, or an integer of more than 4300 digits
        return LineError(line, None, f"invalid JSON: {e}")
    except RecursionError:
        return LineError(line, None, "invalid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return LineError(
            line, None, "a line must be a JSON object with 'id' and 'prompt' or 'messages'"
        )
    openai = "custom_id" in obj or ("body" in obj and "url" in obj)
    field = "custom_id" if openai else "id"
    rid = obj.get(field)
    bad = (_not_text(rid, field) if suspect else None) or _bad_id(rid, field)
    if bad is not None:
        return LineError(line, None, bad, openai)
    rid = cast(str | int | float, rid)
    where = _not_text(obj) if suspect else None
    if where is not None:
        return LineError(line, rid, where, openai)
    if openai:
        return _parse_openai(line, obj, rid, defaults)
    unknown = [k for k in obj if k not in NATIVE_FIELDS]
    if unknown:
        return LineError(
            line,
            rid,
            _unknown(unknown, NATIVE_FIELDS) + "; known fields: id, prompt, messages and "
            "the SamplingParams fields",
        )
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return LineError(line, rid, "give exactly one of 'prompt' (raw text) or 'messages' (chat)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        return LineError(line, rid, "'prompt' must be a non-empty string")
    params = _sampling(line, rid, False, defaults, {k: obj[k] for k in PARAM_FIELDS if k in obj})
    if isinstance(params, LineError):
        return params
    return Job(line, rid, prompt, messages, params)


def _same(value: object, allowed: object) -> bool:
    """value == allowed, without True standing for 1 or 0 for False."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed and isinstance(value, (int, float)) == isinstance(allowed, (int, float))


def _text_content(messages: object) -> list | str:
    """OpenAI messages -> messages with string content (text parts joined, "developer" is the
    system role), or the error."""
    if not isinstance(messages, list):
        return "body.messages must be a list of {role, content} objects"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"body.messages[{i}] must be an object with 'role' and 'content'"
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            parts = []
            for j, part in enumerate(m["content"]):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    return f"body.messages[{i}].content[{j}]: only text parts, not {kind!r}"
                if not isinstance(part.get("text"), str):
                    return f"body.messages[{i}].content[{j}].text must be a string"
                parts.append(part["text"])
            m["content"] = "\n".join(parts)
        out.append(m)
    return out


def _parse_openai(line: int, obj: dict, rid: str | int | float, defaults: dict) -> Job | LineError:
    def fail(message: str) -> LineError:
        return LineError(line, rid, f"OpenAI Batch line: {message}", openai=True)

    unknown = [k for k in obj if k not in OPENAI_FIELDS]
    if unknown:
        return fail(_unknown(unknown, OPENAI_FIELDS))
    if obj.get("method", "POST") != "POST":
        return fail(f"method must be POST, not {obj['method']!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return fail("'body' must be an object")
    url = obj.get("url") or OPENAI_URLS[0 if "messages" in body else 1]
    if url not in OPENAI_URLS:
        return fail(f"url must be one of {', '.join(OPENAI_URLS)}, not {url!r}")
    chat = url == OPENAI_URLS[0]
    given = {k: v for k, v in body.items() if v is not None}  # null means "the default"
    problems = []
    for name, value in given.items():
        if name in OPENAI_HONOURED or name in OPENAI_LABELS or name in PARAM_FIELDS:
            continue
        if name in OPENAI_NOOP:
            if not _same(value, OPENAI_NOOP[name]):
                problems.append(
                    f"body.{name}={json.dumps(value)[:40]} is not supported "
                    f"(only {json.dumps(OPENAI_NOOP[name])}, or leave it out)"
                )
            continue
        known = OPENAI_HONOURED + OPENAI_LABELS + PARAM_FIELDS
        problems.append(_unknown([name], known, "body.") + " is not supported")
    if problems:
        return fail("; ".join(problems))
    wrong = "prompt" if chat else "messages"
    if wrong in given:
        return fail(f"{url} takes body.{'messages' if chat else 'prompt'}, not body.{wrong}")
    prompt = messages = None
    if chat:
        content = _text_content(given.get("messages"))
        if isinstance(content, str):
            return fail(content)
        messages = content
    else:
        prompt = given.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return fail("body.prompt must be a non-empty string (one prompt per line)")
    overrides = {k: given[k] for k in PARAM_FIELDS if k in given}
    limits = {given[k] for k in ("max_tokens", "max_completion_tokens") if k in given}
    if len(limits) > 1:
        return fail("body.max_tokens and body.max_completion_tokens differ; give one")
    if limits:
        overrides["max_tokens"] = limits.pop()
    params = _sampling(line, rid, True, defaults, overrides)
    if isinstance(params, LineError):
        return params
    return Job(line, rid, prompt, messages, params, url)


# ---- output --------------------------------------------------------------------------------


def record_stats(stats: dict) -> dict:
    """A record's stats: answer tokens per forward and committed positions (EOS padding of
    decoded blocks included) per forward, kept apart."""
    forwards, tokens = stats["forwards"], stats["tokens"]
    out = {
        "forwards": forwards,
        "tokens": tokens,
        "tokens_per_forward": round(tokens / max(forwards, 1), 4),
        "committed_per_forward": round(stats.get("committed", tokens) / max(forwards, 1), 4),
        "seconds": round(stats["seconds"], 4),
    }
    for name in ("prompt_tokens", "edits"):  # edits: token edits (decoder "joint")
        if isinstance(stats.get(name), int):
            out[name] = stats[name]
    return out


def completion_record(
    job: Job, text: str, token_ids: list[int], finish_reason: str, stats: dict, model: str
) -> dict:
    summary = record_stats(stats)
    if job.openai is None:
        return {
            "id": job.id,
            "text": text,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "stats": summary,
        }
    reason = "length" if finish_reason == "length" else "stop"  # eos or a stop string
    if job.openai == OPENAI_URLS[0]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason}
        kind = "text_completion"
    usage = {"completion_tokens": stats["tokens"]}
    if "prompt_tokens" in summary:
        usage = {
            "prompt_tokens": summary["prompt_tokens"],
            "completion_tokens": stats["tokens"],
            "total_tokens": summary["prompt_tokens"] + stats["tokens"],
        }
    body = {
        "id": f"dinfer-line{job.line}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "dinfer_stats": summary,
    }
    return {
        "id": f"batch_req_line{job.line}",
        "custom_id": job.id,
        "response": {"status_code": 200, "request_id": f"line{job.line}", "body": body},
        "error": None,
    }


def error_record(job: Job, message: str) -> dict:
    return LineError(job.line, job.id, message, openai=job.openai is not None).record()


def encode_record(record: dict, line: int) -> bytes:
    """One record as a line of strict JSON in UTF-8. Whatever slipped through (a NaN, text that
    is not Unicode) becomes an error record for the line instead of a crash or invalid JSON."""
    try:
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        openai = "custom_id" in record
        message = f"the result could not be written as JSON ({type(e).__name__}: {e})"
        fallback = LineError(line, None, message.encode("ascii", "replace").decode(), openai)
        return (json.dumps(fallback.record()) + "\n").encode()


def _is_line(value: object) -> bool:
    return type(value) is int and value >= 1


def _is_id(value: object) -> bool:
    return isinstance(value, str) or type(value) in (int, float)


def record_key(record: object) -> str | None:
    """The key of one of this tool's output records (id key for a completion, line key for an
    error), or None if `record` is not one: then the file is not ours to append to."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record:  # OpenAI
        if not {"id", "custom_id", "response", "error"} <= record.keys():
            return None
        error, response = record["error"], record["response"]
        if isinstance(error, dict) and _is_line(error.get("line")) and response is None:
            return f"line:{error['line']}"
        if (
            error is None
            and _is_id(record["custom_id"])
            and isinstance(response, dict)
            and isinstance(response.get("body"), dict)
            and "status_code" in response
        ):
            return id_key(record["custom_id"])
        return None
    if "error" in record:
        error = record["error"]
        ok = isinstance(error, dict) and _is_line(error.get("line"))
        return f"line:{error['line']}" if ok and isinstance(error.get("message"), str) else None
    if (
        _is_id(record.get("id"))
        and isinstance(record.get("text"), str)
        and isinstance(record.get("token_ids"), list)
        and isinstance(record.get("finish_reason"), str)
        and isinstance(record.get("stats"), dict)
    ):
        return id_key(record["id"])
    return None
