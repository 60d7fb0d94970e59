"""dinfer-batch's line formats: input lines to jobs, results to output records.

Input: {"id", "prompt"} (raw text) or {"id", "messages"} (chat template applied), optionally with
SamplingParams fields; or an OpenAI Batch line {"custom_id", "method", "url", "body"} whose body
holds "messages" (/v1/chat/completions) or "prompt" (/v1/completions), with "max_tokens",
"temperature" and "seed" honoured. Output: one record per input line, keyed like its input.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import msgspec

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams

PARAM_FIELDS = set(SamplingParams.__struct_fields__)
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Job:
    line: int
    id: object
    prompt: str | None
    messages: list | None
    params: SamplingParams
    openai: str | None = None  # the request url for an OpenAI Batch line

    @property
    def key(self) -> str:
        """What identifies this line's output record (see OutputFile)."""
        return "id:" + json.dumps(self.id)


@dataclass
class LineError:
    line: int
    id: object
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


def parse_line(line: int, text: str, defaults: dict) -> Job | LineError:
    """One input line -> a Job, or a LineError naming what is wrong and how to fix it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return LineError(line, None, f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return LineError(
            line, None, "a line must be a JSON object with 'id' and 'prompt' or 'messages'"
        )
    openai = "custom_id" in obj
    body = obj
    overrides = {k: v for k, v in obj.items() if k in PARAM_FIELDS}
    rid = obj.get("custom_id") if openai else obj.get("id")
    if openai:
        inner = obj.get("body")
        if not isinstance(inner, dict):
            return LineError(line, rid, "OpenAI Batch line: 'body' must be an object", openai=True)
        body = inner
        if obj.get("url", OPENAI_URLS[0]) not in OPENAI_URLS:
            return LineError(
                line,
                rid,
                f"OpenAI Batch line: url must be one of {', '.join(OPENAI_URLS)}",
                openai=True,
            )
        overrides = {k: body[k] for k in ("temperature", "seed") if body.get(k) is not None}
        if body.get("max_tokens") is not None:
            block = defaults.get("block_length", SamplingParams().block_length)
            if type(body["max_tokens"]) is not int or body["max_tokens"] < 1:
                return LineError(
                    line, rid, "body.max_tokens must be a positive integer", openai=True
                )
            overrides["gen_length"] = math.ceil(body["max_tokens"] / block) * block
    if rid is None or isinstance(rid, (dict, list, bool)):
        field = "custom_id" if openai else "id"
        return LineError(
            line,
            rid,
            f"'{field}' is missing or not a string/number; give each line a unique id",
            openai,
        )
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        return LineError(
            line, rid, "give exactly one of 'prompt' (raw text) or 'messages' (chat)", openai
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        return LineError(line, rid, "'prompt' must be a non-empty string", openai)
    try:
        params = msgspec.convert({**defaults, **overrides}, SamplingParams).validate()
    except msgspec.ValidationError as e:
        return LineError(line, rid, f"bad sampling parameter: {e}", openai)
    except InvalidRequestError as e:
        return LineError(line, rid, str(e), openai)
    url = (obj.get("url") or OPENAI_URLS[0 if messages is not None else 1]) if openai else None
    return Job(line, rid, prompt, messages, params, url)


def completion_record(
    job: Job, text: str, token_ids: list[int], finish_reason: str, stats: dict, model: str
) -> dict:
    summary = {
        "forwards": stats["forwards"],
        "tokens": stats["tokens"],
        "tokens_per_forward": round(stats["tokens_per_forward"], 4),
        "seconds": round(stats["seconds"], 4),
    }
    if job.openai is None:
        return {
            "id": job.id,
            "text": text,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "stats": summary,
        }
    reason = "stop" if finish_reason == "eos" else "length"
    if job.openai == "/v1/chat/completions":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason}
        kind = "text_completion"
    body = {
        "id": f"dinfer-line{job.line}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"completion_tokens": stats["tokens"]},
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


def record_keys(record: dict) -> tuple[str | None, str | None]:
    """(id key, line key) of an output record, for resuming: a completion is known by its id,
    an error by its input line number."""
    if "custom_id" in record:
        if record.get("error"):
            return None, f"line:{record['error'].get('line')}"
        return "id:" + json.dumps(record["custom_id"]), None
    if "error" in record:
        return None, f"line:{record['error'].get('line')}"
    return "id:" + json.dumps(record.get("id")), None
