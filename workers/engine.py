"""Engine: the in-process, synchronous way to run a model (tests, benchmarks, the worker's core)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dinfer_async.errors import InvalidRequestError
from dinfer_async.params import SamplingParams
from dinfer_async.validation import check_input, check_parallel, check_token_ids
from workers.graphs import StepGraphs, resolve_mode
from workers.loader import load_model, resolve_dtype
from workers.parallel.group import TensorParallel, join
from workers.scheduler import Scheduler, default_joins, denoise
from workers.tokenizer import chat_ids, load_tokenizer, text_ids

if TYPE_CHECKING:
    from workers.interfaces import DiffusionModel, Tokenizer
    from workers.iteration import Sequence
    from workers.models.layers import DiffusionLM


@dataclass
class Stats:
    forwards: int  # model calls that still had masked positions of this request
    tokens: int  # answer tokens before the first EOS
    committed: int  # positions committed (EOS padding of decoded blocks included)
    tokens_per_forward: float  # tokens / forwards: answer tokens per forward
    seconds: float  # from submission to the end
    tokens_per_second: float  # tokens / seconds
    committed_per_forward: float  # committed / forwards: positions per forward, padding included
    prompt_tokens: int  # the prompt's tokens
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
        steps_per_check: int | None = None,
        tensor_parallel_size: int = 1,
        expert_parallel: bool | str = False,
        split_overhead: float | None = None,
        chunk_slots: int | None = None,
        cuda_graphs: bool | str | None = None,
        joins: bool | None = None,
    ):
        """steps_per_check: how many decoding steps run between host checks of which requests
        are done (see workers.iteration.BlockRound; None: $DINFER_STEPS_PER_CHECK, else 1);
        results do not depend on it.

        tensor_parallel_size T > 1: this process is one of T ranks of a torch.distributed group
        (workers.parallel.group.launch, torchrun, or init_process_group); `model` is the full
        model, which is sharded in place over the group (workers/parallel/shard.py), or this
        rank's shard as workers.loader read it (from_pretrained does that). Every rank
        builds its Engine the same way and calls `generate` with the same prompts and params
        (SPMD); they take the same decisions and all return the same results. expert_parallel:
        the MoE families' routed experts are split over the same ranks (else replicated); True
        or "all_reduce" (no token moves, one all-reduce per MoE block) or "all_to_all" (tokens
        dispatched to their experts' ranks and back; workers/parallel/layers.py).
        split_overhead, chunk_slots: see workers.scheduler.Scheduler (None: the device's
        defaults; both 0: each group's rows in one round per block, one forward per step).
        cuda_graphs: a block's steps after its first as CUDA graphs on a GPU, static-shape
        eager steps elsewhere (workers/graphs.py; True/"on", "static", False/"off"; None:
        $DINFER_CUDA_GRAPHS, off when unset); opt-in until checked on a GPU. joins: requests
        start their next block in a running round instead of waiting for its slowest row
        (workers.scheduler.Scheduler; None: $DINFER_JOINS, on when unset); results do not
        depend on it.
        After `generate`, `last_run` holds that call's padding waste, rounds, steps and joins."""
        check_parallel(tensor_parallel_size, expert_parallel)
        self.tensor_parallel: TensorParallel | None = None
        if tensor_parallel_size > 1:
            from workers.parallel.shard import shard_model

            sharded = shard_model(
                cast("DiffusionLM", model), join(tensor_parallel_size), expert_parallel
            )
            self.tensor_parallel = sharded.tp
            model = cast("DiffusionModel", sharded)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.steps_per_check = steps_per_check
        self.split_overhead = split_overhead
        self.chunk_slots = chunk_slots
        self.joins = default_joins(joins)  # a bad $DINFER_JOINS fails here, not mid-run
        try:  # a bad value fails here, not mid-run
            mode = resolve_mode(cuda_graphs)
        except ValueError as e:
            raise InvalidRequestError("cuda_graphs", str(e)) from None
        # kept across generate calls, with the KV storage the graphs were captured over
        device = model.lm_head_weight.device
        self.graphs = None if mode == "off" else StepGraphs(device, mode)
        self.last_run: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        **kwargs: Any,
    ) -> Engine:
        """Load a local Hugging Face directory or a Hub id (`org/name`, from the local cache first,
        see workers.hub); None loads the bundled model. Keyword arguments go to Engine
        (tensor_parallel_size among them: each rank then reads from the checkpoint only the
        slices it keeps, workers.loader)."""
        from workers.hub import resolve_model

        local = resolve_model(path)  # a Hub id is named by its id, a directory by its name
        name = "dinfer-bundled" if path is None else Path(path).name
        if path is not None and not Path(path).expanduser().is_dir():
            name = str(path)
        size = kwargs.get("tensor_parallel_size", 1)
        tp = join(size) if type(size) is int and size > 1 else None  # else Engine says why not
        ep = kwargs.get("expert_parallel", False) if tp else False
        dev, dt = torch.device(device), resolve_dtype(dtype)
        model = load_model(local, dev, dt, tensor_parallel=tp, expert_parallel=ep)
        return cls(model, load_tokenizer(local), name=name, **kwargs)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids for a raw-text prompt or for chat messages (the chat template applied)."""
        check_input(prompt=prompt, messages=messages)
        if messages is not None:
            return chat_ids(self.tokenizer, messages)
        assert prompt is not None, "check_input requires one of them"
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
        if self.tensor_parallel is not None:  # every rank draws with rank 0's seeds
            seeds = self.tensor_parallel.broadcast([seeds])[0]
        self.last_run = {}
        seqs = denoise(
            self.model, ids, per_prompt, seeds, stats=self.last_run, **self._scheduling()
        )
        return [self._result(seq) for seq in seqs]

    def new_scheduler(self) -> Scheduler:
        """A streaming Scheduler over this engine's model with its settings (steps per check,
        cohorts, chunks, graphs): what a worker serves requests with."""
        return Scheduler(self.model, **self._scheduling())

    def _scheduling(self) -> dict:
        """This engine's Scheduler settings, the same for `generate` and `new_scheduler`."""
        return dict(
            max_batch_size=self.max_batch_size,
            steps_per_check=self.steps_per_check,
            decode=self.decode,
            split_overhead=self.split_overhead,
            chunk_slots=self.chunk_slots,
            cuda_graphs=self.graphs or False,
            joins=self.joins,
        )

    def check_prompt(self, ids: list[int], params: SamplingParams, field: str) -> None:
        check_token_ids(ids, self.config.vocab_size, field)
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
