"""LLaDA2.0 / LLaDA2.1 mini and flash: block-diffusion MoE models on the Ling (BailingMoeV2) layout.

Per layer: RMSNorm -> fused query_key_value (grouped KV) -> per-head RMSNorm on q, k -> RoPE on
the first `rotary_dim` dims of each head -> attention -> dense; RMSNorm -> SwiGLU MLP (the first
`first_k_dense_replace` layers) or MoE (sigmoid router, group-limited top-k, shared experts).

Attention is block-causal in upstream generation; the caller builds that mask
(`workers.shared.block_causal_mask`) and the model only passes it on. Module names mirror the
upstream checkpoint (`model.layers.N.attention.query_key_value`, ...), so state-dict keys are the
safetensors names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class LLaDA2Config:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    intermediate_size: int  # dense SwiGLU of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # each routed expert; shared experts use it times num_shared_experts
    num_experts: int  # 0: every layer dense
    num_shared_experts: int
    top_k: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    expert_bias: bool  # the router stores `gate.expert_bias` (moe_router_enable_expert_bias)
    first_k_dense_replace: int
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float
    use_qk_norm: bool
    use_qkv_bias: bool
    use_bias: bool  # bias of attention.dense
    vocab_size: int
    tie_word_embeddings: bool
    mask_token_id: int
    eos_token_id: int
    max_sequence_length: int

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict) -> LLaDA2Config:
        """Defaults are those of upstream's LLaDA2MoeConfig where config.json may omit a field."""
        fields = ConfigFields(raw, "LLaDA2")
        mask_fix = (
            "LLaDA2 checkpoints ship without it and a diffusion model needs its mask token: "
            'add "mask_token_id": 156895 (upstream generate()\'s mask_id)'
        )
        eos_fix = (
            "the engine needs it to end answers: add "
            '"eos_token_id": 156892 (upstream generate()\'s eos_id, also their pad_token_id)'
        )
        fields.need(
            "mask_token_id", mask_fix
        )  # before anything else: the fix is the first thing to know
        fields.need("eos_token_id", eos_fix)
        fields.only(
            {
                "hidden_act": ("silu", None),
                "score_function": ("sigmoid", None),
                "rope_scaling": (None,),
                "using_split_qkv_in_self_attention": (False, None),
            }
        )
        integer, number, flag = fields.integer, fields.number, fields.flag

        d_model, n_heads = integer("hidden_size"), integer("num_attention_heads")
        n_kv_heads = integer("num_key_value_heads", 0) or n_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelConfigError(
                f"config.json: num_attention_heads={n_heads} must be a positive multiple of "
                f"num_key_value_heads={n_kv_heads}"
            )
        if raw.get("head_dim") is None and d_model % n_heads:
            raise ModelConfigError(
                f"config.json: hidden_size={d_model} must divide by num_attention_heads={n_heads} "
                "(or set head_dim)"
            )
        head_dim = integer("head_dim", d_model // n_heads)
        rotary_dim = int(head_dim * number("partial_rotary_factor", 0.5))
        if raw.get("rotary_dim") is not None and integer("rotary_dim") != rotary_dim:
            raise ModelConfigError(
                f"config.json: rotary_dim={raw['rotary_dim']} disagrees with head_dim * "
                f"partial_rotary_factor = {rotary_dim} "
                "(upstream rotates head_dim * partial_rotary_factor dims): make them agree"
            )
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ModelConfigError(
                "config.json: the rotary dimension head_dim * partial_rotary_factor = "
                f"{rotary_dim} "
                "must be even and in (0, head_dim]"
            )

        n_layers = integer("num_hidden_layers")
        num_experts = integer("num_experts", 0)
        first_dense = integer("first_k_dense_replace", 0)
        has_dense = num_experts <= 0 or first_dense > 0
        top_k = n_group = topk_group = moe_size = 0
        if num_experts > 0 and first_dense < n_layers:
            moe_size = integer("moe_intermediate_size")
            top_k = integer("num_experts_per_tok")
            n_group, topk_group = integer("n_group", 8), integer("topk_group", 4)
            if n_group <= 0 or num_experts % n_group or num_experts // n_group < 2:
                raise ModelConfigError(
                    f"config.json: num_experts={num_experts} must split into n_group={n_group} "
                    "groups of at least "
                    "2 experts (a group is scored by its top-2 experts)"
                )
            if not 0 < topk_group <= n_group or not 0 < top_k <= topk_group * (
                num_experts // n_group
            ):
                raise ModelConfigError(
                    f"config.json: topk_group={topk_group} must be in [1, n_group={n_group}] and "
                    f"num_experts_per_tok={top_k} "
                    "in [1, topk_group * experts per group = "
                    f"{topk_group * (num_experts // max(n_group, 1))}]"
                )
        vocab = integer("vocab_size")
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_layers=n_layers,
            intermediate_size=integer("intermediate_size") if has_dense else 0,
            moe_intermediate_size=moe_size,
            num_experts=max(num_experts, 0),
            num_shared_experts=integer("num_shared_experts", 0),
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=number("routed_scaling_factor", 2.5),
            expert_bias=flag("moe_router_enable_expert_bias", True),
            first_k_dense_replace=first_dense,
            rotary_dim=rotary_dim,
            rope_theta=number("rope_theta", 10000.0),
            rms_norm_eps=number("rms_norm_eps", 1e-5),
            use_qk_norm=flag("use_qk_norm", True),
            use_qkv_bias=flag("use_qkv_bias", False),
            use_bias=flag("use_bias", True),
            vocab_size=vocab,
            tie_word_embeddings=flag("tie_word_embeddings", False),
            mask_token_id=fields.token_id("mask_token_id", vocab),
            eos_token_id=fields.token_id("eos_token_id"),
            max_sequence_length=integer("max_position_embeddings", 16384),
        )


class Router(nn.Module):
    """Sigmoid scores; the expert bias steers which experts are chosen but not their weights."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.top_k, cfg.n_group, cfg.topk_group
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        self.expert_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            if cfg.expert_bias
            else None
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, d] -> expert ids [N, top_k], weights [N, top_k] in at least fp32 (upstream's
        router_dtype)."""
        compute = torch.promote_types(h.dtype, torch.float32)
        scores = torch.sigmoid(F.linear(h.to(compute), self.weight.to(compute)))
        biased = scores if self.expert_bias is None else scores + self.expert_bias.to(compute)
        N, E = biased.shape
        groups = biased.view(N, self.n_group, E // self.n_group)
        group_score = groups.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
        kept = group_score.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        biased = groups.masked_fill(~keep[..., None], -torch.inf).view(N, E)
        ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale


class SparseMoE(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.num_experts, cfg.d_model, cfg.moe_intermediate_size)
        self.shared_experts = (
            GatedMLP(cfg.d_model, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Experts via layers.RoutedExperts, weighted and summed in the router's dtype."""
        B, L, d = x.shape
        h = x.reshape(-1, d)
        ids, weights = self.gate(h)
        y = self.experts(h, ids, weights).to(x.dtype).view(B, L, d)
        return y if self.shared_experts is None else y + self.shared_experts(x)


class Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        self.query_key_value = nn.Linear(cfg.d_model, (H + 2 * Hkv) * hd, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.use_qk_norm = cfg.use_qk_norm
        self.dense = nn.Linear(H * hd, cfg.d_model, bias=cfg.use_bias)

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int):
        B, L, _ = x.shape
        qkv = self.query_key_value(x).view(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = (
            t.transpose(1, 2)
            for t in qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        )
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        return self.dense(rotary_attention(q, k, v, cos, sin, key_mask, cache, layer, start))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = (
            SparseMoE(cfg) if cfg.is_moe(layer) else GatedMLP(cfg.d_model, cfg.intermediate_size)
        )

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int, keep=None):
        attn = self.attention(self.input_layernorm(x), cos, sin, key_mask, cache, layer, start)
        h, x = self.post_attention_layernorm.add(x, attn, keep)
        return x + self.mlp(h)


class LLaDA2Model(HFDiffusionLM):
    """The DiffusionLM contract (see workers.models.layers) over Bailing-style layers. `key_mask`
    is [B, Lk] or, for block-causal decoding, [B, Lq, Lk] (workers.shared.block_causal_mask)."""

    block_causal = True  # upstream decodes with block-causal attention; the caller builds the mask
    embed_name = "word_embeddings"

    def __init__(self, cfg: LLaDA2Config):
        layers = (DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        super().__init__(
            cfg, layers, Rotary(cfg.rotary_dim, cfg.rope_theta)
        )  # RoPE on the first rotary_dim dims
