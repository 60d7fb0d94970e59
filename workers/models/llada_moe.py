"""LLaDA-MoE (LLaDA-MoE-7B-A1B-Base/Instruct and the trajectory-distilled -TD): an OLMoE-style
mixture-of-experts transformer without a causal mask.

Per layer: RMSNorm -> q/k/v projections with per-head RMSNorm on q and k (`qk_layernorm`),
rotate-half RoPE, bidirectional attention -> RMSNorm -> softmax router over `num_experts`, top-k
SwiGLU experts (plus an optional shared expert; layers with `moe_layer_freq[i] == 0` are dense).
Module names mirror the upstream checkpoint (`model.layers.N.mlp.experts.E.gate_proj`, ...), so the
state dict's keys are the safetensors names and loading needs no renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from workers.errors import ModelConfigError
from workers.models.layers import (
    ConfigFields,
    GatedMLP,
    HFDiffusionLM,
    RMSNorm,
    Rotary,
    RoutedExperts,
    rotary_attention,
)

MASK_TOKEN_ID = (
    156895  # LLaDA-MoE's <|mdm_mask|>; upstream passes it to generate(), config.json lacks it
)


@dataclass(frozen=True)
class LLaDAMoEConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    dense_intermediate_size: int | None
    shared_expert_intermediate_size: int | None
    moe_layers: tuple[bool, ...]  # False: a dense SwiGLU MLP in that layer
    norm_topk_prob: bool
    expert_bias: bool
    qk_layernorm: bool
    clip_qkv: float | None
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
    def from_dict(cls, raw: dict) -> LLaDAMoEConfig:
        fields = ConfigFields(raw, "LLaDA-MoE")
        count = partial(fields.integer, minimum=1)  # sizes and counts

        fields.need(
            "mask_token_id",
            fix="a diffusion model needs the id of its mask token and LLaDA-MoE's "
            f'config.json does not carry it: add "mask_token_id": {MASK_TOKEN_ID}',
        )
        fields.only(
            {  # field -> values implemented here (None: absent; taken as full rotary for RoPE)
                "hidden_act": ("silu", None),
                "attention_bias": (False, None),
                "rope_scaling": (None,),
                "partial_rotary_factor": (1, 1.0, None),
            }
        )

        d_model, n_heads = count("hidden_size"), count("num_attention_heads")
        n_kv_heads = count("num_key_value_heads", n_heads)
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ModelConfigError(
                f"config.json: hidden_size={d_model}, num_attention_heads={n_heads}, "
                "num_key_value_heads="
                f"{n_kv_heads}: hidden_size must divide by num_attention_heads and that by "
                "num_key_value_heads"
            )
        head_dim = d_model // n_heads
        if raw.get("head_dim") not in (None, head_dim):
            fields.fail(
                "head_dim",
                f"differs from hidden_size / num_attention_heads = {head_dim}, which upstream uses",
            )
        if head_dim % 2:
            raise ModelConfigError(
                f"config.json: head dimension hidden_size / num_attention_heads = {head_dim} must "
                "be even for RoPE"
            )

        n_layers = count("num_hidden_layers")
        freq = raw.get("moe_layer_freq") or [1] * n_layers  # upstream: 0 = dense layer, else MoE
        if (
            not isinstance(freq, list)
            or len(freq) != n_layers
            or any(f not in (0, 1) for f in freq)
        ):
            fields.fail(
                "moe_layer_freq",
                f"must be a list of {n_layers} zeros (dense layer) and ones (MoE layer)",
            )
        moe_layers = tuple(bool(f) for f in freq)

        num_experts = count("num_experts")
        top_k = count("num_experts_per_tok")
        if top_k > num_experts:
            fields.fail("num_experts_per_tok", f"exceeds num_experts={num_experts}")
        vocab = count("vocab_size")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            n_layers=n_layers,
            vocab_size=vocab,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            expert_intermediate_size=count("expert_intermediate_size") if any(moe_layers) else 0,
            dense_intermediate_size=None if all(moe_layers) else count("dense_intermediate_size"),
            # null (not 0 or -1) means no shared expert
            shared_expert_intermediate_size=count("shared_expert_intermediate_size", None),
            moe_layers=moe_layers,
            norm_topk_prob=bool(raw.get("norm_topk_prob")),
            expert_bias=bool(raw.get("moe_router_enable_expert_bias")),
            qk_layernorm=bool(raw.get("qk_layernorm")),
            clip_qkv=fields.number("clip_qkv", None, positive=True),
            rope_theta=fields.number("rope_theta", positive=True),
            rms_norm_eps=fields.number("rms_norm_eps", 1e-5, positive=True),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            mask_token_id=fields.token_id("mask_token_id", vocab),
            eos_token_id=fields.token_id("eos_token_id"),
            max_sequence_length=count("max_position_embeddings", 4096),
        )


class SparseMoE(nn.Module):
    """Softmax router, top-k SwiGLU experts (computed by layers.RoutedExperts)."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = RoutedExperts(cfg.num_experts, cfg.d_model, cfg.expert_intermediate_size)
        if (
            cfg.expert_bias
        ):  # upstream's `expert_bias` buffer; a parameter here so the loader fills it
            self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] in x's dtype, expert ids [N, k]); softmax in at least
        fp32."""
        compute = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(self.gate(x).to(compute), dim=-1)
        if hasattr(self, "expert_bias"):
            probs = probs + self.expert_bias.to(
                compute
            )  # upstream weights by the biased scores too
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        return self.experts(x, experts, weights).view(shape)


class Attention(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.clip = (
            cfg.n_heads,
            cfg.n_kv_heads,
            hd,
            cfg.clip_qkv,
        )
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        if cfg.qk_layernorm:  # upstream normalises each head over head_dim (weights [head_dim])
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, key_mask, cache, layer: int, start: int):
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:  # upstream clamps after the qk norm
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return self.o_proj(rotary_attention(q, k, v, cos, sin, key_mask, cache, layer, start))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig, layer: int):
        super().__init__()
        moe = cfg.moe_layers[layer]
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp: nn.Module
        if moe:
            self.mlp = SparseMoE(cfg)
        else:
            assert cfg.dense_intermediate_size is not None  # from_dict sets it for dense layers
            self.mlp = GatedMLP(cfg.d_model, cfg.dense_intermediate_size)
        if (
            moe and cfg.shared_expert_intermediate_size is not None
        ):  # upstream hangs it off the layer
            self.shared_expert = GatedMLP(cfg.d_model, cfg.shared_expert_intermediate_size)

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int, keep=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, layer, start)
        h, x = self.post_attention_layernorm.add(x, attn, keep)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEModel(HFDiffusionLM):
    """The DiffusionLM contract (see workers.models.layers) over OLMoE-style layers."""

    def __init__(self, cfg: LLaDAMoEConfig):
        super().__init__(
            cfg,
            (DecoderLayer(cfg, i) for i in range(cfg.n_layers)),
            Rotary(cfg.head_dim, cfg.rope_theta),
        )
