"""Dream (Qwen2-style diffusion LM): forward pass against a naive re-implementation, checkpoint
round trips in the upstream layout, config errors, and the KV-cache contract.

The reference below loops over batch rows and heads and spells out every formula (RMSNorm,
rotate-half RoPE per position, q/k/v biases, softmax, SwiGLU). It reads parameters by their
upstream safetensors names, so a wrong name, a dropped bias, a wrong head grouping or shifted
logits in the model all make the comparison fail. Float64 throughout, so tolerances are tight.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.naive import naive_attention_head, naive_rms_norm, naive_rope, naive_swiglu
from tests.tiny_models import left_padded_batch, random_model, tiny_family_raw
from workers.cache import KVCache
from workers.errors import ModelConfigError
from workers.loader import load_model, save_model
from workers.models import FAMILIES
from workers.models.dream import DreamConfig, DreamModel

F64 = torch.float64
INDEX = "model.safetensors.index.json"


def dream_raw_config(**overrides) -> dict:
    """A tiny config.json in the upstream format (Qwen2 field names plus Dream's extras), with
    sizes and token ids of its own: hidden 24, vocabulary 29, mask 28."""
    fields = dict(
        hidden_size=24,
        intermediate_size=37,
        vocab_size=29,
        bos_token_id=25,
        eos_token_id=26,
        pad_token_id=26,
        mask_token_id=28,
    )
    return tiny_family_raw("Dream", **{**fields, **overrides})


def random_dream(raw: dict, seed: int = 0, dtype=F64) -> DreamModel:
    """Every parameter drawn wide from a seeded normal; norm weights around 1, so none is
    trivial."""
    return random_model(raw, seed=seed, std=0.4, dtype=dtype)


# ---------------------------------------------------------------- naive reference


def naive_forward(model, raw: dict, input_ids, positions, key_mask=None):
    """Raw (unshifted) logits [B, L, vocab], from upstream names and upstream config fields only."""
    w = {name: p.detach() for name, p in model.named_parameters()}
    H, Hkv = raw["num_attention_heads"], raw["num_key_value_heads"]
    D = raw["hidden_size"] // H
    eps, theta = raw["rms_norm_eps"], raw["rope_theta"]
    head = w["model.embed_tokens.weight" if raw["tie_word_embeddings"] else "lm_head.weight"]
    B, L = input_ids.shape
    out = []
    for b in range(B):
        pos = [int(p) for p in positions[b]]
        visible = torch.ones(L, dtype=torch.bool) if key_mask is None else key_mask[b]
        x = w["model.embed_tokens.weight"][input_ids[b]]
        for layer in range(raw["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = naive_rms_norm(x, w[p + "input_layernorm.weight"], eps)
            a = p + "self_attn."
            q = h @ w[a + "q_proj.weight"].T + w[a + "q_proj.bias"]
            k = h @ w[a + "k_proj.weight"].T + w[a + "k_proj.bias"]
            v = h @ w[a + "v_proj.weight"].T + w[a + "v_proj.bias"]
            heads = []
            for hq in range(H):
                g = hq // (H // Hkv)  # query heads share kv heads in consecutive groups
                qh = naive_rope(q[:, hq * D : (hq + 1) * D], pos, theta)
                kh = naive_rope(k[:, g * D : (g + 1) * D], pos, theta)
                # no causal mask: Dream is bidirectional
                heads.append(naive_attention_head(qh, kh, v[:, g * D : (g + 1) * D], visible))
            x = x + torch.cat(heads, dim=-1) @ w[a + "o_proj.weight"].T
            h = naive_rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + naive_swiglu(h, w, p + "mlp.")
        out.append(naive_rms_norm(x, w["model.norm.weight"], eps) @ head.T)
    return torch.stack(out)


# ---------------------------------------------------------------- forward


# (num_key_value_heads, query heads per kv head, tie_word_embeddings)
CASES = [(2, 3, False), (3, 2, True), (4, 1, False)]


@pytest.mark.parametrize("n_kv, groups, tied", CASES)
@pytest.mark.parametrize("length", [1, 5, 11])
def test_forward_matches_naive_reference(n_kv, groups, tied, length):
    """Batch of 2, the second row left-padded and its pads hidden by the key mask; grouped kv
    heads, tied and untied heads, odd lengths. Also with arbitrary offsets and no mask."""
    n_heads = n_kv * groups
    raw = dream_raw_config(
        hidden_size=n_heads * 6,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        tie_word_embeddings=tied,
    )
    model = random_dream(raw, seed=length + 10 * n_kv)
    ids, positions, key_mask = left_padded_batch(raw, [length, max(1, length - 3)], seed=length)
    got = model(ids, positions, key_mask)
    assert got.shape == (2, length, raw["vocab_size"]) and got.dtype == F64
    torch.testing.assert_close(
        got, naive_forward(model, raw, ids, positions, key_mask), rtol=0, atol=1e-10
    )

    shifted = positions + torch.tensor([[3], [17]])
    torch.testing.assert_close(
        model(ids, shifted), naive_forward(model, raw, ids, shifted), rtol=0, atol=1e-10
    )


def test_left_padding_is_invisible_and_per_query_masks_agree():
    """A padded row's real positions get the logits of that row alone; a [B, Lq, Lk] mask that
    repeats the [B, Lk] mask for every query gives the same logits."""
    raw = dream_raw_config()
    model = random_dream(raw, seed=3)
    ids, positions, key_mask = left_padded_batch(raw, [9, 4], seed=4)
    batched = model(ids, positions, key_mask)
    alone = model(ids[1:, 5:], torch.arange(4)[None])
    torch.testing.assert_close(batched[1, 5:], alone[0], rtol=0, atol=1e-10)
    per_query = key_mask[:, None, :].expand(2, 9, 9)
    torch.testing.assert_close(model(ids, positions, per_query), batched, rtol=0, atol=1e-12)


def test_reference_is_sensitive_to_biases_and_weights():
    """Sanity of the setup: zeroing the q/k/v biases, or another seed, moves the logits clearly,
    so agreement within 1e-10 above means the biases are really applied."""
    raw = dream_raw_config()
    model = random_dream(raw, seed=1)
    ids, positions, _ = left_padded_batch(raw, [7, 7], seed=0)
    base = model(ids, positions)
    no_bias = random_dream(raw, seed=1)
    for name, p in no_bias.named_parameters():
        if name.endswith("bias"):
            p.zero_()
    assert (no_bias(ids, positions) - base).abs().max() > 1e-2
    assert (random_dream(raw, seed=2)(ids, positions) - base).abs().max() > 1e-2


def test_interface_and_upstream_sizes():
    """Registered under config.json's model_type "Dream"; the Dream-7B config maps onto the
    engine's attribute names and builds the 7.6B-parameter Qwen2.5-7B layout (on meta)."""
    assert FAMILIES["Dream"] == (DreamConfig, DreamModel)
    assert DreamModel.logit_shift == 1 and DreamModel.block_causal is False
    raw = dream_raw_config(
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=151643,
        mask_token_id=151666,
    )
    cfg = DreamConfig.from_dict(raw)
    got = (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.vocab_size)
    assert got == (28, 28, 4, 128, 3584, 152064)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.max_sequence_length) == (
        151666,
        151643,
        131072,
    )
    with torch.device("meta"):
        model = DreamModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    assert model.lm_head_weight is model.lm_head.weight


# ---------------------------------------------------------------- checkpoints


def expected_names(raw: dict) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{n}_proj.{t}" for n in "qkv" for t in ("weight", "bias")}
        names |= {p + "self_attn.o_proj.weight"} | {
            p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")
        }
    return names if raw["tie_word_embeddings"] else names | {"lm_head.weight"}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_through_the_loader(tmp_path, tied, sharded):
    """save_model writes exactly the upstream tensor names (no lm_head.weight when tied);
    load_model rebuilds the model from config.json and gives identical logits."""
    raw = dream_raw_config(tie_word_embeddings=tied)
    model = random_dream(raw, seed=5)
    save_model(model, tmp_path, raw, max_shard_bytes=6_000 if sharded else None)
    if sharded:
        written = json.loads((tmp_path / INDEX).read_text())["weight_map"]
        assert len(set(written.values())) >= 3
    else:
        with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
            written = list(f.keys())
    assert set(written) == expected_names(raw)

    loaded = load_model(tmp_path, dtype="float64")
    assert isinstance(loaded, DreamModel) and loaded.config.tie_word_embeddings is tied
    if tied:
        assert loaded.lm_head_weight is loaded.embed_weight
    got = dict(loaded.named_parameters())
    assert set(got) == expected_names(raw)
    for name, p in model.named_parameters():
        assert got[name].dtype == F64 and torch.equal(got[name], p), name
    # Bit-equal weights; the logits may differ in the last bits only, since tensors read from a
    # safetensors file are not 64-byte aligned and BLAS then sums in another order.
    ids, positions, key_mask = left_padded_batch(raw, [7, 5], seed=6)
    torch.testing.assert_close(
        loaded(ids, positions, key_mask), model(ids, positions, key_mask), rtol=0, atol=1e-12
    )
    assert torch.equal(loaded.embed(ids), model.embed(ids))


def test_missing_mask_token_id_is_a_clear_error(tmp_path):
    raw = dream_raw_config()
    del raw["mask_token_id"]
    with pytest.raises(ModelConfigError, match=r"'mask_token_id' is missing.*151666.*config\.json"):
        DreamConfig.from_dict(raw)
    save_model(random_dream(dream_raw_config(), dtype=torch.float32), tmp_path, raw)
    with pytest.raises(ModelConfigError, match="mask_token_id"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=5), r"hidden_size=24, num_attention_heads=5.*must divide"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3.*must divide"),
        (dict(hidden_size=None), r"'hidden_size' is missing"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            r"rope_scaling=.*yarn.*not supported",
        ),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
        (dict(mask_token_id=29), r"mask_token_id=29 must be a token id below vocab_size=29"),
        (dict(head_dim=8), r"head_dim=8 differs"),
    ],
)
def test_malformed_fields_name_the_field(overrides, message):
    with pytest.raises(ModelConfigError, match=message):
        DreamConfig.from_dict(dream_raw_config(**overrides))


# ---------------------------------------------------------------- cache


@pytest.mark.parametrize("s, e", [(0, 4), (4, 9), (6, 13), (12, 13)])
def test_cached_slice_matches_full_forward(s, e):
    """Fill the cache with a full forward at start=0 (same logits as without a cache), then
    feed only [s, e) at start=s: it attends over the cache and reproduces the full logits."""
    raw = dream_raw_config()
    model = random_dream(raw, seed=8)
    ids, positions, key_mask = left_padded_batch(raw, [13, 8], seed=9)
    kv = KVCache(model.config, torch.device("cpu"), F64)
    kv.reserve(2, 13)
    full = model(ids, positions, key_mask, kv, 0)
    torch.testing.assert_close(full, model(ids, positions, key_mask), rtol=0, atol=1e-12)
    part = model(ids[:, s:e], positions[:, s:e], key_mask, kv, s)
    torch.testing.assert_close(part, full[:, s:e], rtol=0, atol=1e-10)
