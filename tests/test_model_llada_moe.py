"""LLaDA-MoE: forward pass against a naive reference, checkpoint round trips, config errors, cache.

The reference loops over rows, heads and tokens and spells out every formula (RMSNorm, per-head
q/k norm, rotate-half RoPE, softmax attention, softmax router with an explicit top-k by sorting,
SwiGLU experts), sharing no code with `workers` or `kernels`. Checkpoints are described by the
upstream tensor names (inclusionAI/LLaDA-MoE-7B-A1B, `modeling_lladamoe.py`), written out by hand
in `upstream_shapes`, so a renamed module fails the round trip. All in float64.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny_models
from tests.naive import (
    naive_attention_head,
    naive_rms_norm,
    naive_rope,
    naive_softmax,
    naive_swiglu,
)
from tests.tiny_models import left_padded_batch, tiny_family_raw
from workers.cache import KVCache
from workers.errors import ModelConfigError, ModelLoadError
from workers.loader import load_model, save_model
from workers.models import FAMILIES
from workers.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel

F64 = torch.float64


def raw_config(**overrides) -> dict:
    """A tiny config.json with the upstream field names (vocabulary 37, mask 36); keyword
    arguments replace fields."""
    return tiny_family_raw("lladamoe", **{"vocab_size": 37, "mask_token_id": 36, **overrides})


def random_model(raw: dict, seed: int = 0) -> LLaDAMoEModel:
    """Every parameter drawn wide (norm weights around 1), so routing and norms matter."""
    return tiny_models.random_model(raw, seed=seed, std=0.4)


def upstream_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an upstream LLaDA-MoE checkpoint, written from the upstream
    layout."""
    d, heads, kv = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"]
    hd, vocab, E = d // heads, raw["vocab_size"], raw["num_experts"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not raw["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)

    def mlp(prefix, hidden):
        shapes.update(
            {
                prefix + "gate_proj.weight": (hidden, d),
                prefix + "up_proj.weight": (hidden, d),
                prefix + "down_proj.weight": (d, hidden),
            }
        )

    for i, moe in enumerate(raw["moe_layer_freq"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (heads * hd, d),
                p + "self_attn.k_proj.weight": (kv * hd, d),
                p + "self_attn.v_proj.weight": (kv * hd, d),
                p + "self_attn.o_proj.weight": (d, d),
            }
        )
        if raw["qk_layernorm"]:
            shapes.update(
                {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
            )
        if not moe:
            mlp(p + "mlp.", raw["dense_intermediate_size"])
            continue
        shapes[p + "mlp.gate.weight"] = (E, d)
        if raw["moe_router_enable_expert_bias"]:
            shapes[p + "mlp.expert_bias"] = (E,)
        for e in range(E):
            mlp(p + f"mlp.experts.{e}.", raw["expert_intermediate_size"])
        if raw["shared_expert_intermediate_size"] is not None:
            mlp(p + "shared_expert.", raw["shared_expert_intermediate_size"])
    return shapes


# ---------------------------------------------------------------- naive reference


def naive_moe(h, w, p, raw, chosen: list | None):
    """One token at a time: softmax over experts (+ bias), top-k by sorting, weighted experts."""
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        scores = naive_softmax(h[t] @ w[p + "mlp.gate.weight"].T)
        if raw["moe_router_enable_expert_bias"]:
            scores = scores + w[p + "mlp.expert_bias"]
        top = sorted(range(raw["num_experts"]), key=lambda e: -float(scores[e]))[
            : raw["num_experts_per_tok"]
        ]
        weights = [scores[e] for e in top]
        if raw["norm_topk_prob"]:
            weights = [x / sum(weights) for x in weights]
        if chosen is not None:
            chosen.append(tuple(sorted(top)))
        for e, weight in zip(top, weights):
            out[t] += weight * naive_swiglu(h[t], w, p + f"mlp.experts.{e}.")
    if raw["shared_expert_intermediate_size"] is not None:
        out += naive_swiglu(h, w, p + "shared_expert.")
    return out


def naive_forward(model, raw, input_ids, positions, key_mask=None, chosen=None):
    """Logits [B, L, vocab] from the named parameters, one row, head and token at a time."""
    w = {name: p.detach() for name, p in model.named_parameters()}
    H, Hkv = raw["num_attention_heads"], raw["num_key_value_heads"]
    D, eps, clip = raw["hidden_size"] // H, raw["rms_norm_eps"], raw["clip_qkv"]
    B, L = input_ids.shape
    head = w["model.embed_tokens.weight" if raw["tie_word_embeddings"] else "lm_head.weight"]
    out = []
    for b in range(B):
        pos = [int(p) for p in positions[b]]
        allowed = torch.ones(L, dtype=torch.bool) if key_mask is None else key_mask[b]
        x = w["model.embed_tokens.weight"][input_ids[b]]
        for layer, moe in enumerate(raw["moe_layer_freq"]):
            p = f"model.layers.{layer}."
            h = naive_rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
            heads = []
            for hq in range(H):
                g = hq // (H // Hkv)  # consecutive query heads share a kv head
                qh, kh, vh = (
                    q[:, hq * D : (hq + 1) * D],
                    k[:, g * D : (g + 1) * D],
                    v[:, g * D : (g + 1) * D],
                )
                if raw["qk_layernorm"]:
                    qh = naive_rms_norm(qh, w[p + "self_attn.q_norm.weight"], eps)
                    kh = naive_rms_norm(kh, w[p + "self_attn.k_norm.weight"], eps)
                if clip is not None:
                    qh, kh, vh = qh.clamp(-clip, clip), kh.clamp(-clip, clip), vh.clamp(-clip, clip)
                qh, kh = (
                    naive_rope(qh, pos, raw["rope_theta"]),
                    naive_rope(kh, pos, raw["rope_theta"]),
                )
                heads.append(naive_attention_head(qh, kh, vh, allowed))
            x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
            h = naive_rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + (naive_moe(h, w, p, raw, chosen) if moe else naive_swiglu(h, w, p + "mlp."))
        out.append(naive_rms_norm(x, w["model.norm.weight"], eps) @ head.T)
    return torch.stack(out)


def left_padded(raw, L: int, pad: int, seed: int):
    """Two rows of L tokens, the second left-padded by `pad` (junk ids, hidden from the keys)."""
    return left_padded_batch(raw, [L, L - pad], seed)


# ---------------------------------------------------------------- forward vs reference

CASES = {
    "gqa": dict(),
    "renorm+shared+dense-first+tied": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        norm_topk_prob=True,
        shared_expert_intermediate_size=10,
        moe_layer_freq=[0, 1],
        tie_word_embeddings=True,
    ),
    "mha+no-qk-norm+expert-bias+clip": dict(
        num_key_value_heads=4,
        qk_layernorm=False,
        num_experts_per_tok=3,
        moe_router_enable_expert_bias=True,
        clip_qkv=1.5,
        norm_topk_prob=True,
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [7, 13])
def test_forward_matches_naive_reference(case, length):
    """Logits equal the reference for a batch of two, the second row left-padded (pads hidden by
    the key mask, positions from 0 at its first real token), and routing really varies."""
    raw = raw_config(**CASES[case])
    model = random_model(raw, seed=length)
    ids, positions, key_mask = left_padded(raw, length, pad=3, seed=length)
    chosen = []
    want = naive_forward(model, raw, ids, positions, key_mask, chosen)
    got = model(ids, positions, key_mask)
    assert got.shape == (2, length, raw["vocab_size"]) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert len(set(chosen)) >= 4  # many distinct expert sets: the sort/gather path is exercised


def test_padding_is_invisible_to_real_tokens():
    """The padded row's real positions get the same logits as that row alone."""
    raw = raw_config()
    model = random_model(raw, seed=3)
    ids, positions, key_mask = left_padded(raw, 9, pad=4, seed=3)
    alone = model(ids[1:, 4:], torch.arange(5)[None])
    torch.testing.assert_close(model(ids, positions, key_mask)[1:, 4:], alone, rtol=0, atol=1e-10)


def test_routing_flags_and_weights_change_the_output():
    """Controls for the reference test: norm_topk_prob is wired, and other weights give other
    logits."""
    raw = raw_config()
    ids, positions, _ = left_padded(raw, 7, pad=0, seed=1)
    base = random_model(raw, seed=1)(ids, positions)
    renorm = random_model(raw_config(norm_topk_prob=True), seed=1)(ids, positions)
    other = random_model(raw, seed=2)(ids, positions)
    assert (base - renorm).abs().max() > 1e-2
    assert (base - other).abs().max() > 1e-2


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("case", ["gqa", "renorm+shared+dense-first+tied"])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_in_upstream_format(tmp_path, case, sharded):
    """save_model writes exactly the upstream tensor names and shapes; load_model reads them back
    (sharded or not) into a model with identical logits."""
    raw = raw_config(**CASES[case])
    model = random_model(raw, seed=5)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == upstream_shapes(raw)
    save_model(model, tmp_path, raw, max_shard_bytes=8_000 if sharded else None)
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3

    loaded = load_model(tmp_path, dtype="float64")
    assert isinstance(loaded, FAMILIES[raw["model_type"]][1])
    want = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, want[name]), name
    ids, positions, key_mask = left_padded(raw, 7, pad=2, seed=5)
    # Equal weights, but loaded float64 tensors sit in safetensors' buffer at addresses that are not
    # 64-byte aligned, which can switch BLAS to a kernel summing in another order: last-ulp noise.
    torch.testing.assert_close(
        loaded(ids, positions, key_mask), model(ids, positions, key_mask), rtol=0, atol=1e-12
    )


def test_wrong_expert_shape_is_named(tmp_path):
    """A checkpoint whose experts disagree with expert_intermediate_size fails, naming the
    tensor."""
    raw = raw_config()
    tensors = {n: p.float().contiguous() for n, p in random_model(raw).named_parameters()}
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[name] = torch.zeros(raw["hidden_size"], 10)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=re.escape(repr(name)) + r" has shape \(32, 10\)"):
        load_model(tmp_path)


# ---------------------------------------------------------------- config errors


def test_missing_mask_token_id_names_the_field_and_the_fix(tmp_path):
    raw = raw_config()
    del raw["mask_token_id"]
    save_model(random_model(raw_config()), tmp_path, raw)
    with pytest.raises(
        ModelConfigError, match=r"'mask_token_id' is missing.*\"mask_token_id\": 156895"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(num_experts="64"), r"num_experts='64' must be an integer"),
        (dict(num_experts_per_tok=7), r"num_experts_per_tok=7 exceeds num_experts=6"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3.*must divide"),
        (dict(moe_layer_freq=[1]), r"moe_layer_freq=\[1\] must be a list of 2"),
        (
            dict(shared_expert_intermediate_size=-1),
            r"shared_expert_intermediate_size=-1 must be an integer >= 1",
        ),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported"),
        (dict(mask_token_id=37), r"mask_token_id=37 must be a token id below vocab_size=37"),
        (dict(expert_intermediate_size=None), r"'expert_intermediate_size' is missing"),
    ],
)
def test_malformed_fields_are_named(overrides, pattern):
    with pytest.raises(ModelConfigError, match=pattern):
        LLaDAMoEConfig.from_dict(raw_config(**overrides))


def test_config_exposes_the_engine_attributes():
    cfg = LLaDAMoEConfig.from_dict(raw_config(eos_token_id=[5, 6]))
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model) == (
        2,
        4,
        2,
        8,
        32,
    )
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.max_sequence_length) == (
        37,
        36,
        5,
        64,
    )
    raw = raw_config()
    del raw["max_position_embeddings"]
    assert LLaDAMoEConfig.from_dict(raw).max_sequence_length == 4096


# ---------------------------------------------------------------- cache


@pytest.mark.parametrize("case", ["gqa", "renorm+shared+dense-first+tied"])
def test_cached_slice_matches_full_forward(case):
    """Fill the cache with a full forward, then feed only [s, e) at start=s: the slice's logits
    equal the full forward's (both with and without a per-query [B, Lq, Lk] key mask)."""
    raw = raw_config(**CASES[case])
    model = random_model(raw, seed=9)
    L, s, e = 13, 5, 9
    ids, positions, key_mask = left_padded(raw, L, pad=3, seed=9)
    cache = KVCache(model.config, "cpu", F64)
    cache.reserve(rows=2, length=L)

    full = model(ids, positions, key_mask, cache=cache, start=0)
    torch.testing.assert_close(full, model(ids, positions, key_mask), rtol=0, atol=1e-10)
    part = model(ids[:, s:e], positions[:, s:e], key_mask, cache=cache, start=s)
    torch.testing.assert_close(part, full[:, s:e], rtol=0, atol=1e-10)
    per_query = key_mask[:, None, :].expand(2, e - s, L)
    torch.testing.assert_close(
        model(ids[:, s:e], positions[:, s:e], per_query, cache=cache, start=s),
        full[:, s:e],
        rtol=0,
        atol=1e-10,
    )


def test_released_config_with_model_type_llada_loads_as_moe(tmp_path):
    """The released config.json says model_type "llada" like the dense model; its architectures
    entry (LLaDAMoEModelLM) must route it to this family, not to a confusing dense-LLaDA error."""
    raw = raw_config()
    model = random_model(raw, seed=2)
    save_model(
        model, tmp_path, {**raw, "model_type": "llada", "architectures": ["LLaDAMoEModelLM"]}
    )
    loaded = load_model(tmp_path, dtype="float64")
    assert isinstance(loaded, LLaDAMoEModel)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name
