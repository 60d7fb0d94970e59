"""Dream (Dream-v0-Base-7B / Dream-v0-Instruct-7B): Qwen2.5-7B weights trained as a masked
diffusion model, i.e. a Qwen2 transformer run without a causal mask.

Two things differ from LLaDA: q/k/v projections carry biases (Qwen2), and the logits are shifted
by one, since Dream kept the autoregressive head: position i's logits predict token i + 1. The
model returns the raw logits and says so with `logit_shift = 1`; the engine realigns them.

Module names mirror the upstream checkpoint (`model.layers.N.self_attn.q_proj`, `lm_head`, ...),
so the state dict's keys are the safetensors names and loading needs no renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from workers.errors import ModelConfigError
from workers.models.layers import (
    ConfigFields,
    GatedMLP,
    HFDiffusionLM,
    RMSNorm,
    Rotary,
    rotary_attention,
)

DREAM_MASK_TOKEN_ID = 151666  # `<|mask|>` in Dream's tokenizer, for the error message


@dataclass(frozen=True)
class DreamConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    mask_token_id: int
    eos_token_id: int
    max_sequence_length: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict) -> DreamConfig:
        """Read an upstream config.json (Qwen2 field names); refuse what the model cannot run."""
        fields = ConfigFields(raw, "Dream")
        integer = partial(fields.integer, minimum=0)
        fields.need(
            "mask_token_id",
            fix="a diffusion model needs the id of its mask token "
            f"(Dream uses {DREAM_MASK_TOKEN_ID}, '<|mask|>'): add it to config.json",
        )
        fields.only({"hidden_act": ("silu", None)})
        scaling = raw.get("rope_scaling")
        kind = (
            scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        )
        if kind not in (None, "default"):
            raise ModelConfigError(
                f"config.json: rope_scaling={scaling!r} is not supported for Dream; only plain "
                "RoPE "
                "(rope_scaling null, as in Dream-v0) is implemented"
            )

        d_model, n_heads = integer("hidden_size"), integer("num_attention_heads")
        n_kv_heads = integer("num_key_value_heads", 0) or n_heads
        if not n_heads or not n_kv_heads or d_model % n_heads or n_heads % n_kv_heads:
            raise ModelConfigError(
                f"config.json: hidden_size={d_model}, num_attention_heads={n_heads}, "
                f"num_key_value_heads={n_kv_heads}: hidden_size must divide by num_attention_heads "
                "and num_attention_heads by num_key_value_heads"
            )
        head_dim = d_model // n_heads
        if raw.get("head_dim") not in (None, head_dim):  # upstream derives it and ignores the field
            fields.fail(
                "head_dim",
                f"differs from hidden_size / num_attention_heads = {head_dim}; Dream's "
                "attention uses the latter: remove head_dim or fix it",
            )
        if head_dim % 2:
            raise ModelConfigError(
                f"config.json: head dimension hidden_size / num_attention_heads = {head_dim} must "
                "be even for RoPE"
            )

        vocab = integer("vocab_size")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            n_layers=integer("num_hidden_layers"),
            intermediate_size=integer("intermediate_size"),
            vocab_size=vocab,
            rope_theta=fields.number("rope_theta", 10000.0, positive=True),
            rms_norm_eps=fields.number("rms_norm_eps", 1e-6, positive=True),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            mask_token_id=fields.token_id("mask_token_id", vocab),
            eos_token_id=fields.token_id("eos_token_id"),
            max_sequence_length=integer("max_position_embeddings", 32768),
        )


class Attention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, h, cos, sin, key_mask, cache, layer: int, start: int):
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.o_proj(rotary_attention(q, k, v, cos, sin, key_mask, cache, layer, start))


class Layer(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.intermediate_size)

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int, keep=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, layer, start)
        h, x = self.post_attention_layernorm.add(x, attn, keep)
        return x + self.mlp(h)


class DreamModel(HFDiffusionLM):
    """The DiffusionLM contract (see workers.models.layers) over Qwen2 layers; the logits are the
    raw ones, position i's predicting token i + 1 (`logit_shift`), and the engine realigns them."""

    logit_shift = 1  # Dream kept the AR head: position i predicts token i + 1

    def __init__(self, cfg: DreamConfig):
        # Qwen2 casts its cos/sin tables to the model dtype before rotating
        rotary = Rotary(cfg.head_dim, cfg.rope_theta, model_dtype_tables=True)
        super().__init__(cfg, (Layer(cfg) for _ in range(cfg.n_layers)), rotary)
