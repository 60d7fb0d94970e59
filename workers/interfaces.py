"""What the engine needs of a model and of a tokenizer, as structural types.

Every family (workers/models/) satisfies `DiffusionModel` through workers.models.layers'
DiffusionLM; the engine's modules are typed against these protocols, so they never import a
family. Test doubles (a recording wrapper, a model with other class traits) satisfy them too.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ModelConfig(Protocol):
    """The config fields the engine reads (each family's config dataclass has more)."""

    @property
    def mask_token_id(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_sequence_length(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...


class KVStore(Protocol):
    """What a model's attention calls on the cache it is given (workers.kv_cache)."""

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


class DiffusionModel(Protocol):
    """A family's model as the engine calls it (see workers.models.layers.DiffusionLM)."""

    @property
    def config(self) -> ModelConfig: ...
    @property
    def logit_shift(self) -> int: ...  # logits of position i predict token i + logit_shift
    @property
    def block_causal(self) -> bool: ...  # attention within a block and to earlier blocks only
    @property
    def lm_head_weight(self) -> torch.Tensor: ...
    @property
    def embed_weight(self) -> torch.Tensor: ...
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        start: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        logit_columns: slice | None = None,
    ) -> torch.Tensor: ...


class Tokenizer(Protocol):
    """The tokenizer calls the engine and the worker make (a transformers tokenizer)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def __len__(self) -> int: ...
