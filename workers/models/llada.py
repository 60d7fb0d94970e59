"""LLaDA dense (LLaDA-8B-Base/Instruct, LLaDA-1.5): a LLaMA-style transformer without a causal mask.

Module names mirror the upstream checkpoint (`model.transformer.blocks.N.q_proj`, ...), so the
state dict's keys are the safetensors names and loading needs no renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from workers.errors import ModelConfigError


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
    def from_dict(cls, raw: dict) -> "LLaDAConfig":
        def need(field: str):
            if raw.get(field) is None:
                raise ModelConfigError(f"config.json: field {field!r} is missing; LLaDA checkpoints define it")
            return raw[field]

        if raw.get("mask_token_id") is None:
            raise ModelConfigError(
                "config.json: field 'mask_token_id' is missing; a diffusion model needs the id of its "
                "mask token (LLaDA uses 126336): add it to config.json"
            )
        unsupported = {
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
        for field, allowed in unsupported.items():
            if raw.get(field) not in allowed:
                raise ModelConfigError(
                    f"config.json: {field}={raw.get(field)!r} is not supported for LLaDA dense "
                    f"(supported: {[a for a in allowed if a is not None]})"
                )
        d_model, n_heads = int(need("d_model")), int(need("n_heads"))
        n_kv_heads = int(raw.get("n_kv_heads") or n_heads)
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ModelConfigError(
                f"config.json: d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
                "d_model must divide by n_heads and n_heads by n_kv_heads"
            )
        if (d_model // n_heads) % 2:
            raise ModelConfigError(f"config.json: head dimension d_model / n_heads = {d_model // n_heads} must be even for RoPE")
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for given positions, in at least fp32 (LLaDA's `rope_full_precision`)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.promote_types(dtype, torch.float32)
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=compute) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        angles = positions.to(compute)[..., None] * inv_freq  # [B, L, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, D]
        return angles.cos(), angles.sin()


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

    def forward(self, x, cos, sin, key_mask, cache, layer: int, start: int):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.attend(layer, k, v, start)
        a = kernels.attention(q, k, v, key_mask)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(kernels.swiglu(self.ff_proj(h), self.up_proj(h)))


class LLaDAModel(nn.Module):
    """forward(input_ids, positions, key_mask, cache=None, start=0) -> logits [B, L, vocab_size].

    `positions` are RoPE positions (rows of a left-padded batch start at 0 at their first real
    token); `key_mask` [B, Lk] marks keys that may be attended to. With a `cache`, the fed tokens
    sit at sequence offset `start` and attend over the cache (see workers.cache).
    """

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
            self.model.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t["wte"].weight if self.config.weight_tying else t["ff_out"].weight

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.transformer["wte"].weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](input_ids)

    def forward(self, input_ids, positions, key_mask=None, cache=None, start: int = 0, inputs_embeds=None):
        t = self.model.transformer
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(positions, x.dtype)
        for i, block in enumerate(t["blocks"]):
            x = block(x, cos, sin, key_mask, cache, i, start)
        x = t["ln_f"](x)
        return nn.functional.linear(x, self.lm_head_weight[: self.config.vocab_size])
