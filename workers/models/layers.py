"""Building blocks that several model families share, each written once so a fix reaches them all.

Nothing here owns a parameter name: every family still creates its modules under its upstream
checkpoint names (`model.layers.N.mlp.gate_proj`, `model.transformer.blocks.N.ff_proj`, ...), so
the state dict's keys stay the safetensors names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn, cast

import torch
import torch.nn.functional as F
from torch import nn

import dinfer_kernels as kernels
from workers.errors import ModelConfigError

_REQUIRED = object()


class ConfigFields:
    """Typed reads of one config.json dict for a family's `from_dict`.

    Why: every family validates config.json before any weight is read, and a bad field must say
    which field it is and what would fix it. A null value counts as an absent one, so an optional
    field falls back to its default and a required one is reported missing.
    """

    def __init__(self, raw: dict, family: str):
        self.raw, self.family = raw, family

    def fail(self, field: str, problem: str, value=_REQUIRED) -> NoReturn:
        shown = self.raw.get(field) if value is _REQUIRED else value
        raise ModelConfigError(f"config.json: {field}={shown!r} {problem}")

    def need(self, field: str, fix: str | None = None):
        """The field's value; missing, a ModelConfigError that says `fix` (by default: the family's
        checkpoints define it)."""
        value = self.raw.get(field)
        if value is None:
            raise ModelConfigError(
                f"config.json: field {field!r} is missing; "
                f"{fix or f'{self.family} checkpoints define it'}"
            )
        return value

    def _get(self, field: str, default):
        return self.need(field) if default is _REQUIRED else self.raw.get(field)

    def integer(self, field: str, default=_REQUIRED, minimum: int | None = None) -> int:
        """An int (not a bool), at least `minimum` when given; the default, unchecked, when
        absent."""
        value = self._get(field, default)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (minimum is not None and value < minimum)
        ):
            self.fail(field, "must be an integer" + ("" if minimum is None else f" >= {minimum}"))
        return value

    def number(self, field: str, default=_REQUIRED, positive: bool = False) -> float:
        """An int or float (not a bool) as a float, above zero when `positive`; the default when
        absent."""
        value = self._get(field, default)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (positive and value <= 0)
        ):
            self.fail(field, "must be a positive number" if positive else "must be a number")
        return float(value)

    def flag(self, field: str, default: bool) -> bool:
        """true or false; the default when absent."""
        value = self.raw.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(field, "must be true or false")
        return value

    def token_id(self, field: str, vocab_size: int | None = None, fix: str | None = None) -> int:
        """A required token id, below `vocab_size` when given. Hugging Face allows a list for
        eos_token_id; its first entry, the model's own end token, is taken."""
        value = self.need(field, fix)
        if isinstance(value, list) and value:
            value = value[0]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < 0
            or (vocab_size is not None and value >= vocab_size)
        ):
            self.fail(
                field,
                "must be a token id"
                + ("" if vocab_size is None else f" below vocab_size={vocab_size}"),
                value,
            )
        return value

    def only(self, supported: dict[str, tuple]) -> None:
        """Refuse a field whose value is not in its tuple of implemented values (None: absent)."""
        for field, allowed in supported.items():
            if self.raw.get(field) not in allowed:
                listed = [a for a in allowed if a is not None] or "absent or null"
                self.fail(field, f"is not supported for {self.family} (supported: {listed})")


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale. Why a module of its own: the checkpoints store one `weight`
    per norm, and the computation (in at least fp32) lives in kernels.rms_norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add(
        self, x: torch.Tensor, residual: torch.Tensor, keep: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual add and the norm after it, one launch.
        keep: only these columns (of dim 1) go on, as in a model's last layer, whose outputs
        the caller reads at some columns only (DiffusionLM.hidden)."""
        if keep is not None:
            x, residual = x[:, keep], residual[:, keep]
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables [B, 1, L, dim] for rotate-half RoPE at given positions.

    Why per call rather than a buffer: the loader fills parameters only, and positions differ per
    row. Angles are computed in at least fp32 (LLaDA's `rope_full_precision`); the tables stay in
    that precision unless `model_dtype_tables` (Qwen2/Dream casts them to the model dtype). `dim`
    may be smaller than the head dimension: `apply_rope` then rotates only the first `dim` dims.
    """

    def __init__(self, dim: int, theta: float, model_dtype_tables: bool = False):
        super().__init__()
        self.dim, self.theta, self.model_dtype_tables = dim, theta, model_dtype_tables

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.promote_types(dtype, torch.float32)
        exponent = torch.arange(0, self.dim, 2, device=positions.device, dtype=compute) / self.dim
        inv_freq = 1.0 / (self.theta**exponent)
        angles = positions.to(compute)[..., None] * inv_freq  # [B, L, dim/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, dim]
        if self.model_dtype_tables:
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of each head of x [B, H, L, D]; the rest
    pass through (LLaDA2's partial rotary). Full-width tables go straight to kernels.rope."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return kernels.rope(x, cos, sin)
    return torch.cat((kernels.rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)


def rotary_attention(q, k, v, cos, sin, key_mask, cache, layer: int, start: int) -> torch.Tensor:
    """q [B, H, L, D], k and v [B, Hkv, L, D] -> attention output [B, L, H * D].

    Why shared: every family rotates q and k, joins the cache's keys and values when decoding
    with one (the fed tokens sit at sequence offset `start`, see workers.cache) and attends under
    `key_mask` ([B, Lk], or [B, Lq, Lk] for per-query masks); only the projections around it differ.
    """
    B, _, L, _ = q.shape
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        out = kernels.attention(q, k, v, key_mask)
    else:
        out = cache.attention(layer, q, k, v, start, key_mask)
    return out.transpose(1, 2).reshape(B, L, -1)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward under the Hugging Face names gate_proj / up_proj / down_proj: Dream's
    MLP, LLaDA-MoE's and LLaDA2's experts, shared experts and dense layers. (Dense LLaDA keeps
    its own ff_proj / up_proj / ff_out, the names its checkpoints use.)"""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class RoutedExperts(nn.ModuleList):
    """An MoE layer's routed experts: `num_experts` GatedMLPs under the checkpoint names
    (`experts.E.gate_proj.weight`, ...). forward(h [N, d], ids [N, k], weights [N, k]) ->
    sum_j weights[:, j] * experts[ids[:, j]](h), [N, d] in weights' dtype.

    Why a class: the kernels take the experts as one kernels.ExpertWeights (each weight where the
    loader put it, no stacked copy) and kernels.routed_experts picks the path (a Triton grouped
    GEMM, a dense torch path, or the reference loop; see kernels.moe_path). The ExpertWeights is
    built on the first call and kept while the parameters hold the same tensors, checked on the
    first and last expert: replacing parameters (model.to(), a loader) builds it anew."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__(GatedMLP(d_model, hidden) for _ in range(num_experts))
        self._weights: kernels.ExpertWeights | None = None
        self._key: tuple[int, ...] = ()

    def expert_weights(self) -> kernels.ExpertWeights:
        """Experts another rank holds (expert parallel: not a GatedMLP here) read one shared
        zero weight each, so they add exactly nothing and cost one expert's memory in all."""
        present = [m for m in self if isinstance(m, GatedMLP)]
        first, last = present[0], present[-1]
        key = tuple(
            w.data_ptr()
            for w in (first.gate_proj.weight, last.up_proj.weight, last.down_proj.weight)
        ) + (len(present),)
        if self._weights is None or key != self._key:
            zero = {
                name: torch.zeros_like(getattr(first, name).weight.detach())
                for name in ("gate_proj", "up_proj", "down_proj")
            }

            def weights(name: str) -> list[torch.Tensor]:
                return [
                    getattr(m, name).weight.detach() if isinstance(m, GatedMLP) else zero[name]
                    for m in self
                ]

            self._weights = kernels.ExpertWeights(
                weights("gate_proj"), weights("up_proj"), weights("down_proj")
            )
            self._key = key
        return self._weights

    def forward(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return kernels.routed_experts(h, ids, weights, self.expert_weights())


class DiffusionLM(nn.Module):
    """What the engine calls on every family:
    forward(input_ids, positions, key_mask=None, cache=None, start=0, inputs_embeds=None,
    logit_columns=None) -> logits [B, L, vocab_size] (only the fed columns `logit_columns` when
    given: a refresh forward over a long sequence needs the logits of one block, and the LM head
    over every column is a large share of it where the vocabulary is large), plus embed(),
    embed_weight, lm_head_weight, logit_shift and block_causal.

    `positions` are RoPE positions (rows of a left-padded batch start at 0 at their first real
    token); `key_mask` ([B, Lk] or [B, Lq, Lk]) marks the keys each query may attend to, and is
    passed to attention unchanged. With a `cache`, the fed tokens sit at sequence offset `start`
    and attend over the cache (see workers.cache).

    Why a base class: the families differ in their layers and module names, not in this loop.
    A subclass builds its modules under the upstream names and points at them through
    `embedding`, `blocks`, `final_norm`, `lm_head_weight` and `rotary`.
    """

    logit_shift = 0  # position i's logits predict token i (Dream's predict token i + 1)
    block_causal = False  # attention over the whole sequence (LLaDA2's is causal across blocks)
    config: Any  # the family's config dataclass
    rotary: Rotary

    @property
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.embedding.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def forward(
        self,
        input_ids,
        positions,
        key_mask=None,
        cache=None,
        start: int = 0,
        inputs_embeds=None,
        logit_columns: slice | None = None,
    ):
        h = self.hidden(input_ids, positions, key_mask, cache, start, inputs_embeds, logit_columns)
        return F.linear(h, self.lm_head_weight[: self.config.vocab_size])

    def hidden(
        self,
        input_ids,
        positions,
        key_mask=None,
        cache=None,
        start: int = 0,
        inputs_embeds=None,
        keep: slice | None = None,
    ) -> torch.Tensor:
        """The final norm's output [B, L, d] (columns `keep` only, when given), which the LM head
        reads (a tensor-parallel model applies its own vocabulary shard of the head,
        workers/parallel/shard.py). The last layer needs every column's keys and values (the
        cache keeps them) but its residual and MLP only at `keep`."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(positions, x.dtype)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, key_mask, cache, i, start, keep if i == last else None)
        return self.final_norm(x)


class HFDiffusionLM(DiffusionLM):
    """The Hugging Face layout: `model.<embed_name>`, `model.layers`, `model.norm`, and `lm_head`
    unless tie_word_embeddings. Why: Dream (Qwen2), LLaDA-MoE (OLMoE) and LLaDA2 (Bailing) all
    store their checkpoints this way; the config needs d_model, vocab_size, rms_norm_eps and
    tie_word_embeddings."""

    embed_name = "embed_tokens"

    def __init__(self, cfg, layers: Iterable[nn.Module], rotary: Rotary):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        setattr(self.model, self.embed_name, nn.Embedding(cfg.vocab_size, cfg.d_model))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:  # a tied checkpoint holds no lm_head.weight
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = rotary

    @property
    def embedding(self) -> nn.Embedding:
        return getattr(self.model, self.embed_name)

    @property
    def blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.model.layers)

    @property
    def final_norm(self) -> nn.Module:
        return cast(nn.Module, self.model.norm)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_weight if self.config.tie_word_embeddings else self.lm_head.weight
