"""Random tiny models for tests: small enough for float64 on CPU, big enough to disagree when
something is wrong (weights drawn wide, so predictions are far from uniform).

`tiny_raw_config` / `tiny_model` build dense LLaDA; `tiny_family_raw` / `tiny_family_model` build
any family of workers.models.FAMILIES from a config.json in its upstream field names.
"""

from __future__ import annotations

import torch

from dinfer_async.params import SamplingParams
from workers.models import FAMILIES, family_name


class IdTokenizer:
    """A stand-in tokenizer for engine tests that compare token ids: text is the ids."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, token_ids))

    def __len__(self) -> int:
        return 1 << 16


def decoder_params(decoder: str, cache: str, **kw) -> SamplingParams:
    """Short-window params that exercise each decoder's own options (sampling, EOS suppression,
    soft diffusion, guidance, edits), for tests that run every decoder x cache policy."""
    extra = dict(
        fixed=dict(steps=8, remasking="random", temperature=0.7),
        threshold=dict(threshold=0.3, suppress_eos=True),
        factor=dict(factor=2.5, temperature=0.5),
        hierarchical=dict(threshold=0.5, low_threshold=0.15, soft_diffusion=True),
        credit=dict(threshold=0.3, cfg_scale=0.5),
        joint=dict(threshold=0.4, edit_threshold=0.1, max_edit_steps=2),
    )[decoder]
    base = dict(gen_length=16, block_length=8, decoder=decoder, cache=cache, prefix_look=2)
    return SamplingParams(**{**base, **extra, **kw}).validate()


def tiny_raw_config(**overrides) -> dict:
    """The raw config.json dict of a tiny LLaDA model; keyword arguments replace fields."""
    raw = dict(
        model_type="llada",
        d_model=48,
        n_heads=6,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=40,
        embedding_size=48,
        mask_token_id=39,
        eos_token_id=1,
        rope_theta=10000.0,
    )
    raw.update(overrides)
    return raw


# Per family, a tiny config.json in the upstream field names: vocabulary 16, mask token 15 (the
# last id), eos 1, so engine tests decode quickly. Model tests pass overrides for their own sizes.
FAMILY_RAW = {
    "llada": tiny_raw_config(vocab_size=16, embedding_size=16, mask_token_id=15),
    "lladamoe": dict(  # LLaDA-MoE: OLMoE layout; model_type "llada" + architectures in the release
        model_type="lladamoe",
        architectures=["LLaDAMoEModelLM"],
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        expert_intermediate_size=12,
        dense_intermediate_size=20,
        shared_expert_intermediate_size=None,
        moe_layer_freq=[1, 1],
        norm_topk_prob=False,
        moe_router_enable_expert_bias=None,
        qk_layernorm=True,
        clip_qkv=None,
        hidden_act="silu",
        rope_theta=50.0,  # small, so rotations are visible at short lengths
        partial_rotary_factor=1.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        eos_token_id=1,
        mask_token_id=15,
    ),
    "llada2_moe": dict(  # 3 layers (the first dense), 8 experts in 4 groups, 2 kept, top-2, one
        model_type="llada2_moe",  # shared expert, head_dim * heads != hidden_size, partial RoPE
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        rotary_dim=8,
        use_qk_norm=True,
        use_qkv_bias=False,
        use_bias=False,
        rope_theta=100.0,  # a small theta rotates visibly at short lengths
        rms_norm_eps=1e-6,
        vocab_size=16,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        pad_token_id=1,
        mask_token_id=15,
        eos_token_id=1,
    ),
    "Dream": {  # Qwen2 field names plus Dream's extras
        "architectures": ["DreamModel"],
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "model_type": "Dream",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 48,
        "vocab_size": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 50.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "use_cache": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "mask_token_id": 15,
    },
}

# Parameters drawn with their own std whatever `std` says (name suffix -> std), per family: LLaDA2's
# sigmoid router needs small weights for its scores to spread over (0, 1), and expert biases
# large enough to change which experts are chosen.
FIXED_STD = {"llada2_moe": {"norm.weight": 0.3, "gate.weight": 0.2, "expert_bias": 0.3}}


def tiny_family_raw(family: str, **overrides) -> dict:
    """The raw config.json dict of a tiny model of `family` (a FAMILIES key); keyword arguments
    replace fields. LLaDA-MoE's moe_layer_freq follows an overridden num_hidden_layers."""
    raw = {**FAMILY_RAW[family], **overrides}
    if family == "lladamoe" and "moe_layer_freq" not in overrides:
        raw["moe_layer_freq"] = [1] * raw["num_hidden_layers"]
    return raw


def random_model(raw: dict, seed: int = 0, std: float = 0.3, dtype=torch.float64):
    """The model config.json `raw` describes (any family), every parameter drawn from a seeded
    normal: norm weights around 1 (1 + std * N(0, 1)) so they are neither trivial nor near zero,
    the rest std * N(0, 1), except the family's FIXED_STD parameters."""
    family = family_name(raw)
    config_cls, model_cls = FAMILIES[family]
    model = model_cls(config_cls.from_dict(raw)).to(dtype)
    fixed = FIXED_STD.get(family, {})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = next((s for suffix, s in fixed.items() if name.endswith(suffix)), std)
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            p.copy_(noise + 1.0 if name.endswith("norm.weight") or "ln_f" in name else noise)
    return model.eval().requires_grad_(False)


def tiny_model(seed: int = 0, dtype=torch.float64, std: float = 0.5, **overrides):
    """random_model of tiny_raw_config(**overrides): a dense LLaDA."""
    return random_model(tiny_raw_config(**overrides), seed=seed, std=std, dtype=dtype)


def tiny_family_model(family: str, seed: int = 0, std: float = 0.4, **overrides):
    """An eval-mode float64 random_model of tiny_family_raw(family, **overrides)."""
    return random_model(tiny_family_raw(family, **overrides), seed=seed, std=std)


def left_padded_batch(raw: dict, lengths: list[int], seed: int):
    """ids [B, max(lengths)] (junk in the pads), positions starting at 0 at each row's first real
    token (0 in the pads) and the key mask hiding the pads."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    ids = torch.randint(0, raw["vocab_size"], (B, L), generator=gen)
    key_mask = torch.zeros(B, L, dtype=torch.bool)
    positions = torch.zeros(B, L, dtype=torch.long)
    for row, n in enumerate(lengths):
        key_mask[row, L - n :] = True
        positions[row, L - n :] = torch.arange(n)
    return ids, positions, key_mask


def random_prompts(seed: int, lengths: list[int], vocab: int, mask_id: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[ids == mask_id] = 2
        prompts.append(ids.tolist())
    return prompts


class Recorder:
    """Wraps a model and keeps a copy of every input batch, to inspect what a sampler did."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    @property
    def lm_head_weight(self):
        return self.model.lm_head_weight

    @property
    def config(self):
        return self.model.config

    def __getattr__(self, name):  # logit_shift, block_causal, embed, ... of the wrapped model
        return getattr(self.model, name)

    def __call__(self, ids, *args, **kwargs):
        self.inputs.append(ids.clone())
        return self.model(ids, *args, **kwargs)
