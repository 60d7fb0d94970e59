"""Engine: the in-process, synchronous way to run a model (tests, benchmarks, the worker's core)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams
from workers.loader import load_model, resolve_dtype
from workers.scheduler import denoise
from workers.tokenizer import chat_ids, load_tokenizer, text_ids

if TYPE_CHECKING:
    from workers.interfaces import DiffusionModel, Tokenizer
    from workers.iteration import Sequence


@dataclass
class Stats:
    forwards: int  # model calls that still had masked positions of this request
    tokens: int  # answer tokens before the first EOS
    committed: int  # positions committed (EOS padding of decoded blocks included)
    tokens_per_forward: float  # committed / forwards
    seconds: float  # from submission to the end
    tokens_per_second: float  # tokens / seconds
    edits: int = 0  # committed positions replaced by token edits (decoder "joint")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the answer up to (not including) the first EOS
    finish_reason: str  # "eos" or "length"
    stats: Stats


class Engine:
    def __init__(
        self,
        model: DiffusionModel,
        tokenizer: Tokenizer,
        name: str = "model",
        max_batch_size: int = 32,
        steps_per_check: int = 1,
    ):
        """steps_per_check: how many decoding steps run between host checks of which requests
        are done (see workers.iteration.BlockRound); results do not depend on it."""
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.steps_per_check = steps_per_check

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        **kwargs: Any,
    ) -> Engine:
        """Load a local Hugging Face directory; None loads the bundled model."""
        if path is None:
            from workers.bundled import MODEL_DIR

            name = "dinfer-bundled"
            folder = Path(MODEL_DIR)
        else:
            folder = Path(path)
            name = folder.name
        model = load_model(folder, device=torch.device(device), dtype=resolve_dtype(dtype))
        return cls(model, load_tokenizer(folder), name=name, **kwargs)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids for a raw-text prompt or for chat messages (the chat template applied)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt (raw text) or messages")
        if messages is not None:
            _check_messages(messages)
            return chat_ids(self.tokenizer, messages)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt", "must be a non-empty string")
        return text_ids(self.tokenizer, prompt)

    def generate(
        self,
        prompts: list[list[int] | str],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for each prompt (token ids, or raw text), with one params for all or one each.
        All requests go through one scheduler, so different params still share forwards."""
        per_prompt = (
            params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        )
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError(
                "params", f"{len(per_prompt)} params for {len(prompts)} prompts"
            )
        per_prompt = [p.validate() for p in per_prompt]
        ids = [self.encode(prompt=p) if isinstance(p, str) else list(p) for p in prompts]
        for i, (p, q) in enumerate(zip(ids, per_prompt)):
            self.check_prompt(p, q, f"prompts[{i}]")
        draw = random.Random()
        seeds = [q.seed if q.seed is not None else draw.randrange(2**63) for q in per_prompt]
        return [
            self._result(seq)
            for seq in denoise(
                self.model,
                ids,
                per_prompt,
                seeds,
                self.max_batch_size,
                self.steps_per_check,
                decode=self.decode,
            )
        ]

    def check_prompt(self, ids: list[int], params: SamplingParams, field: str) -> None:
        if not ids:
            raise InvalidRequestError(field, "is empty; give at least one token")
        if not all(type(t) is int and 0 <= t < self.config.vocab_size for t in ids):
            raise InvalidRequestError(
                field, f"token ids must be integers in [0, {self.config.vocab_size})"
            )
        # a block-causal model decodes whole blocks from the first token: up to a block more
        padded = len(ids) + params.gen_length
        if self.model.block_causal:
            padded += -padded % params.block_length
        if padded > self.config.max_sequence_length:
            raise InvalidRequestError(
                field,
                f"prompt of {len(ids)} tokens + gen_length {params.gen_length} exceeds the model's "
                f"max_sequence_length {self.config.max_sequence_length}; shorten one of them",
            )

    def decode(self, ids: list[int]) -> str:
        """Answer text for token ids (special tokens left out)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _result(self, seq: Sequence) -> GenerationResult:
        assert seq.finish_reason is not None, "denoise runs every request to its end"
        answer = seq.answer(self.config.eos_token_id)
        text = self.decode(answer) if seq.stop_text is None else seq.stop_text
        return GenerationResult(
            text, answer, seq.finish_reason, Stats(**seq.stats(self.config.eos_token_id))
        )


ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}"
            )
