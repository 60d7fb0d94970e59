"""LLaDA dense (LLaDA-8B-Base/Instruct, LLaDA-1.5): a LLaMA-style transformer without a causal mask.

Module names mirror the upstream checkpoint (`model.transformer.blocks.N.q_proj`, ...), so the
state dict's keys are the safetensors names and loading needs no renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

import dinfer_kernels as kernels
from workers.errors import ModelConfigError
from workers.models.layers import ConfigFields, DiffusionLM, RMSNorm, Rotary, rotary_attention


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    rope_theta: float
    rms_norm_eps: float
    weight_tying: bool
    mask_token_id: int
    eos_token_id: int
    max_sequence_length: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict) -> LLaDAConfig:
        fields = ConfigFields(raw, "LLaDA dense")
        need = fields.need
        need(
            "mask_token_id",
            fix=(
                "a diffusion model needs the id of its mask token (LLaDA uses 126336): add it to "
                "config.json"
            ),
        )
        fields.only(
            {
                "block_type": ("llama", None),
                "layer_norm_type": ("rms", None),
                "activation_type": ("silu", "swiglu", None),
                "rope": (True, None),
                "alibi": (False, None),
                "include_bias": (False, None),
                "include_qkv_bias": (False, None),
                "attention_layer_norm": (False, None),
                "scale_logits": (False, None),
            }
        )
        d_model, n_heads = int(need("d_model")), int(need("n_heads"))
        n_kv_heads = int(raw.get("n_kv_heads") or n_heads)
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ModelConfigError(
                f"config.json: d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
                "d_model must divide by n_heads and n_heads by n_kv_heads"
            )
        if (d_model // n_heads) % 2:
            raise ModelConfigError(
                f"config.json: head dimension d_model / n_heads = {d_model // n_heads} must be "
                "even for RoPE"
            )
        mlp = raw.get("mlp_hidden_size") or int(need("mlp_ratio")) * d_model
        vocab = int(need("vocab_size"))
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            n_layers=int(need("n_layers")),
            mlp_hidden_size=int(mlp),
            vocab_size=vocab,
            embedding_size=int(raw.get("embedding_size") or vocab),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            weight_tying=bool(raw.get("weight_tying", False)),
            mask_token_id=int(raw["mask_token_id"]),
            eos_token_id=int(need("eos_token_id")),
            max_sequence_length=int(raw.get("max_sequence_length", 4096)),
        )


class Block(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)  # down

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int, keep=None):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        attn = self.attn_out(rotary_attention(q, k, v, cos, sin, key_mask, cache, layer, start))
        h, x = self.ff_norm.add(x, attn, keep)
        return x + self.ff_out(kernels.swiglu(self.ff_proj(h), self.up_proj(h)))


class LLaDAModel(DiffusionLM):
    """The DiffusionLM contract over `model.transformer` (wte, blocks, ln_f, and ff_out unless
    weight_tying). The embedding may have more rows than the vocabulary (`embedding_size`); the
    logits keep the first vocab_size."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
                blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            self.model.transformer["ff_out"] = nn.Linear(
                cfg.d_model, cfg.embedding_size, bias=False
            )
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    @property
    def _transformer(self) -> nn.ModuleDict:
        return cast(nn.ModuleDict, self.model.transformer)

    @property
    def embedding(self) -> nn.Embedding:
        return cast(nn.Embedding, self._transformer["wte"])

    @property
    def blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self._transformer["blocks"])

    @property
    def final_norm(self) -> nn.Module:
        return self._transformer["ln_f"]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        head = self._transformer["wte" if self.config.weight_tying else "ff_out"]
        return cast(torch.Tensor, head.weight)
