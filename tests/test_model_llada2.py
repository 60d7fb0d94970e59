"""LLaDA2 (llada2_moe) checked against a naive re-implementation written here, in float64.

The reference loops over rows, heads, tokens and experts and spells out every formula: RMSNorm,
per-head q/k norms, RoPE on the first rotary_dim dims of each head only, softmax under a
block-causal mask built by a double loop, and per-token sigmoid routing with the expert bias
used for choosing (groups scored by their top-2 biased scores) but not for weighting. It reads
the parameters by their upstream checkpoint names, so a renamed tensor fails here too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests import tiny_models
from tests.naive import naive_attention_head, naive_rms_norm, naive_rope, naive_swiglu
from tests.tiny_models import left_padded_batch, tiny_family_raw
from workers.cache import KVCache
from workers.errors import ModelConfigError
from workers.loader import load_model, save_model
from workers.models import FAMILIES
from workers.models.llada2 import LLaDA2Config, LLaDA2Model
from workers.shared import block_causal_mask

F64 = torch.float64
INDEX = "model.safetensors.index.json"


def tiny_raw(**overrides) -> dict:
    """tests.tiny_models' LLaDA2 config.json (3 layers, the first dense, 8 experts in 4 groups, 2
    groups kept, top-2, one shared expert, head_dim * heads != hidden_size, partial RoPE) with a
    vocabulary of 37, mask 36 and eos 35; keyword arguments replace fields."""
    fields = dict(vocab_size=37, pad_token_id=35, mask_token_id=36, eos_token_id=35)
    return tiny_family_raw("llada2_moe", **{**fields, **overrides})


# grouped KV with biases, full rotary, tied head, 2 shared experts, no expert bias, 1 of 2 groups,
# top-3
CASES = {
    "mini-like": {},
    "variant": dict(
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        partial_rotary_factor=1.0,
        rotary_dim=8,
        tie_word_embeddings=True,
        use_qkv_bias=True,
        use_bias=True,
        num_shared_experts=2,
        moe_router_enable_expert_bias=False,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=3,
    ),
}


def random_model(raw: dict, seed: int = 0) -> LLaDA2Model:
    """Every parameter drawn from a seeded normal: norm weights around 1, router weights small
    enough that sigmoid scores spread over (0, 1), expert biases large enough to change choices
    (tests.tiny_models.FIXED_STD)."""
    return tiny_models.random_model(raw, seed=seed, std=0.4)


def upstream_names(raw: dict) -> set[str]:
    """The tensor names of an upstream LLaDA2 checkpoint (modeling_llada2_moe.py's layout)."""
    names = {"model.word_embeddings.weight", "model.norm.weight"}
    if not raw["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + "attention.query_key_value.weight", p + "attention.dense.weight"}
        names |= {p + "attention.query_layernorm.weight", p + "attention.key_layernorm.weight"}
        if raw["use_qkv_bias"]:
            names.add(p + "attention.query_key_value.bias")
        if raw["use_bias"]:
            names.add(p + "attention.dense.bias")
        mlps = [p + "mlp."]
        if i >= raw["first_k_dense_replace"]:
            names.add(p + "mlp.gate.weight")
            if raw["moe_router_enable_expert_bias"]:
                names.add(p + "mlp.gate.expert_bias")
            mlps = [p + f"mlp.experts.{e}." for e in range(raw["num_experts"])] + [
                p + "mlp.shared_experts."
            ]
        names |= {
            m + f"{proj}.weight" for m in mlps for proj in ("gate_proj", "up_proj", "down_proj")
        }
    return names


# ---------------------------------------------------------------- naive reference


def naive_route(
    h: torch.Tensor, gate_w: torch.Tensor, bias, cfg: LLaDA2Config, grouped: bool = True
) -> list[tuple[int, float]]:
    """(expert, weight) pairs for one token vector h."""
    E = cfg.num_experts
    scores = [1 / (1 + math.exp(-float(gate_w[e] @ h))) for e in range(E)]
    biased = [scores[e] + (0.0 if bias is None else float(bias[e])) for e in range(E)]
    size = E // cfg.n_group
    allowed = set(range(E))
    if grouped:
        group_score = {
            g: sum(sorted(biased[g * size : (g + 1) * size], reverse=True)[:2])
            for g in range(cfg.n_group)
        }
        kept = sorted(group_score, key=group_score.get, reverse=True)[: cfg.topk_group]
        allowed = {e for e in range(E) if e // size in kept}
    chosen = sorted(allowed, key=lambda e: biased[e], reverse=True)[: cfg.top_k]
    total = sum(scores[e] for e in chosen)
    norm = total + 1e-20 if cfg.top_k > 1 else 1.0
    return [(e, scores[e] / norm * cfg.routed_scaling_factor) for e in chosen]


def naive_mask(positions: list[int], real: list[bool], block_length: int | None) -> torch.Tensor:
    L = len(positions)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            same_or_earlier = (
                block_length is None or positions[k] // block_length <= positions[q] // block_length
            )
            allowed[q, k] = real[k] and same_or_earlier
    return allowed


def naive_forward(
    model: LLaDA2Model, ids, positions, real, block_length: int | None
) -> torch.Tensor:
    cfg = model.config
    w = {name: p.detach() for name, p in model.named_parameters()}
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    head_w = w["model.word_embeddings.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    out = []
    for b in range(ids.shape[0]):
        pos = [int(p) for p in positions[b]]
        allowed = naive_mask(pos, [bool(r) for r in real[b]], block_length)
        x = w["model.word_embeddings.weight"][ids[b]]
        for layer in range(cfg.n_layers):
            p = f"model.layers.{layer}."
            h = naive_rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
            qkv = h @ w[p + "attention.query_key_value.weight"].T
            if p + "attention.query_key_value.bias" in w:
                qkv = qkv + w[p + "attention.query_key_value.bias"]
            heads = []
            for hq in range(H):
                g = hq // (H // Hkv)
                qh = qkv[:, hq * D : (hq + 1) * D]
                kh = qkv[:, (H + g) * D : (H + g + 1) * D]
                vh = qkv[:, (H + Hkv + g) * D : (H + Hkv + g + 1) * D]
                qh = naive_rms_norm(qh, w[p + "attention.query_layernorm.weight"], cfg.rms_norm_eps)
                kh = naive_rms_norm(kh, w[p + "attention.key_layernorm.weight"], cfg.rms_norm_eps)
                qh = naive_rope(qh, pos, cfg.rope_theta, cfg.rotary_dim)
                kh = naive_rope(kh, pos, cfg.rope_theta, cfg.rotary_dim)
                heads.append(naive_attention_head(qh, kh, vh, allowed))
            attn = torch.cat(heads, dim=-1) @ w[p + "attention.dense.weight"].T
            if p + "attention.dense.bias" in w:
                attn = attn + w[p + "attention.dense.bias"]
            x = x + attn
            h = naive_rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            if p + "mlp.gate.weight" not in w:
                x = x + naive_swiglu(h, w, p + "mlp.")
                continue
            moe = torch.zeros_like(h)
            for t in range(h.shape[0]):
                for expert, weight in naive_route(
                    h[t], w[p + "mlp.gate.weight"], w.get(p + "mlp.gate.expert_bias"), cfg
                ):
                    moe[t] += (
                        weight * naive_swiglu(h[t : t + 1], w, p + f"mlp.experts.{expert}.")[0]
                    )
            if p + "mlp.shared_experts.gate_proj.weight" in w:
                moe = moe + naive_swiglu(h, w, p + "mlp.shared_experts.")
            x = x + moe
        x = naive_rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
        out.append(x @ head_w.T)
    return torch.stack(out)


def padded_batch(raw: dict, length: int, pad: int, seed: int):
    """Two rows of `length` columns; row 1 is left-padded by `pad` (junk ids, masked, position
    0)."""
    return left_padded_batch(raw, [length, length - pad], seed)


# ---------------------------------------------------------------- forward


def test_registered_under_upstream_model_type():
    assert FAMILIES["llada2_moe"] == (LLaDA2Config, LLaDA2Model)
    assert LLaDA2Model.block_causal is True and LLaDA2Model.logit_shift == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_names_are_the_upstream_checkpoint_names(case):
    raw = tiny_raw(**CASES[case])
    assert set(dict(random_model(raw).named_parameters())) == upstream_names(raw)


def test_block_causal_mask_matches_loops():
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    real = torch.tensor([[True] * 7, [False, False] + [True] * 5])
    got = block_causal_mask(positions, positions, 3, real)
    assert got.shape == (2, 7, 7) and got.dtype == torch.bool
    for b in range(2):
        assert torch.equal(got[b], naive_mask(positions[b].tolist(), real[b].tolist(), 3))
    assert (
        not got[0, 0, 3] and got[0, 3, 0] and got[0, 3, 5]
    )  # causal across blocks, bidirectional inside


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("length,block", [(7, 3), (13, 4)])
def test_forward_matches_naive_reference(case, length, block):
    """Block-causal and plain key masks, batch 2 with the second row left-padded by 2."""
    raw = tiny_raw(**CASES[case])
    model = random_model(raw, seed=length)
    ids, positions, real = padded_batch(raw, length, pad=2, seed=length + block)
    for mask, bl in ((block_causal_mask(positions, positions, block, real), block), (real, None)):
        got = model(ids, positions, mask)
        assert got.shape == (2, length, raw["vocab_size"]) and got.dtype == F64
        torch.testing.assert_close(
            got, naive_forward(model, ids, positions, real, bl), rtol=0, atol=1e-10
        )


def test_router_matches_naive_and_grouping_and_bias_matter():
    """The router alone on many tokens: same experts and weights as the per-token loop, and the
    inputs are such that group limiting and the expert bias each change some token's choice
    (otherwise the forward test above would not prove they are implemented)."""
    raw = tiny_raw()
    model = random_model(raw, seed=5)
    cfg, router = model.config, model.model.layers[1].mlp.gate
    h = torch.randn(64, cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=F64)
    ids, weights = router(h)
    grouping_mattered = bias_mattered = 0
    for t in range(h.shape[0]):
        want = naive_route(h[t], router.weight, router.expert_bias, cfg)
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == {e for e, _ in want}
        for e, wt in want:
            assert abs(got[e] - wt) < 1e-12
        ungrouped = {
            e for e, _ in naive_route(h[t], router.weight, router.expert_bias, cfg, grouped=False)
        }
        unbiased = {e for e, _ in naive_route(h[t], router.weight, None, cfg)}
        grouping_mattered += ungrouped != set(got)
        bias_mattered += unbiased != set(got)
    assert grouping_mattered > 0 and bias_mattered > 0
    torch.testing.assert_close(
        weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor, dtype=F64)
    )


def test_reference_is_sensitive_to_the_expert_bias():
    """Zeroing the expert biases changes the logits clearly, so the tight agreement above checks
    them."""
    raw = tiny_raw()
    model = random_model(raw, seed=3)
    ids, positions, real = padded_batch(raw, 9, pad=0, seed=0)
    before = model(ids, positions, real)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.zero_()
    assert (model(ids, positions, real) - before).abs().max() > 1e-3


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_safetensors(tmp_path, case, sharded):
    raw = tiny_raw(**CASES[case])
    model = random_model(raw, seed=11)
    save_model(model, tmp_path, raw, max_shard_bytes=40_000 if sharded else None)
    if sharded:
        weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
        assert len(set(weight_map.values())) >= 3 and set(weight_map) == upstream_names(raw)
    loaded = load_model(tmp_path, dtype="float64")
    assert isinstance(loaded, LLaDA2Model) and loaded.config == model.config
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[name]) for name, p in loaded.named_parameters())
    ids, positions, real = padded_batch(raw, 11, pad=3, seed=2)
    mask = block_causal_mask(positions, positions, 4, real)
    # bit-identical weights; the logits may still differ in the last bits because BLAS picks its
    # code path by address alignment and loaded tensors keep the file's (unaligned) offsets
    torch.testing.assert_close(
        loaded(ids, positions, mask), model(ids, positions, mask), rtol=0, atol=1e-12
    )


def test_config_maps_upstream_names():
    cfg = LLaDA2Config.from_dict(tiny_raw())
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model) == (
        3,
        4,
        2,
        16,
        48,
    )
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.max_sequence_length) == (
        37,
        36,
        35,
        512,
    )
    assert cfg.rotary_dim == 8 and cfg.is_moe(1) and not cfg.is_moe(0)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(mask_token_id=None), "156895"),
        (dict(hidden_size="48"), "hidden_size='48'"),
        (dict(eos_token_id=None), "eos_token_id"),
        (dict(n_group=3), "n_group=3"),
        (dict(rotary_dim=12), "rotary_dim=12"),
        (dict(score_function="softmax"), "score_function"),
        (dict(num_hidden_layers=None), "num_hidden_layers"),
    ],
)
def test_clear_config_errors(tmp_path, change, fragment):
    raw = {k: v for k, v in tiny_raw(**change).items() if v is not None}
    with pytest.raises(ModelConfigError, match=fragment):
        LLaDA2Config.from_dict(raw)
    (tmp_path / "config.json").write_text(
        json.dumps(raw)
    )  # the loader reports it before reading weights
    with pytest.raises(ModelConfigError, match=fragment):
        load_model(tmp_path)


def test_missing_mask_token_names_field_and_fix():
    raw = tiny_raw()
    del raw["mask_token_id"]
    with pytest.raises(ModelConfigError) as err:
        LLaDA2Config.from_dict(raw)
    assert "'mask_token_id'" in str(err.value) and '"mask_token_id": 156895' in str(err.value)


# ---------------------------------------------------------------- cache


@pytest.mark.parametrize("case", sorted(CASES))
def test_last_block_over_cache_is_exact(case):
    """Full forward over [0, L) fills the cache; the last block [s, L) alone at start=s over the
    cache gives the same logits, and still does after the block's tokens change (earlier blocks
    never see it), equal then to a fresh uncached forward. Row 1 is left-padded by one block so
    column s starts a block in both rows; L is odd, so the last block is partial."""
    raw = tiny_raw(**CASES[case])
    model = random_model(raw, seed=21)
    block, L, s = 4, 15, 12
    ids, positions, real = padded_batch(raw, L, pad=block, seed=9)
    mask = block_causal_mask(positions, positions, block, real)
    cache = KVCache(model.config, "cpu", F64)
    cache.reserve(2, L)

    full = model(ids, positions, mask, cache=cache, start=0)
    part = model(ids[:, s:], positions[:, s:], mask[:, s:], cache=cache, start=s)
    torch.testing.assert_close(part, full[:, s:], rtol=0, atol=1e-10)

    changed = ids.clone()
    changed[:, s:] = torch.randint(
        0, raw["vocab_size"], (2, L - s), generator=torch.Generator().manual_seed(4)
    )
    changed[0, s] = raw["mask_token_id"]
    part = model(changed[:, s:], positions[:, s:], mask[:, s:], cache=cache, start=s)
    fresh = model(changed, positions, mask)[:, s:]
    torch.testing.assert_close(part, fresh, rtol=0, atol=1e-10)
    assert (
        fresh - full[:, s:]
    ).abs().max() > 1e-3  # the change is visible, so the check above has teeth


def test_cache_reuse_needs_the_block_causal_mask():
    """Control: with plain bidirectional attention the cached prefix depends on the old block, so
    the same reuse is not exact; the exactness above comes from the mask, not from luck."""
    raw = tiny_raw()
    model = random_model(raw, seed=21)
    L, s = 15, 12
    ids, positions, real = padded_batch(raw, L, pad=4, seed=9)
    cache = KVCache(model.config, "cpu", F64)
    cache.reserve(2, L)
    model(ids, positions, real, cache=cache, start=0)
    changed = ids.clone()
    changed[:, s:] = (ids[:, s:] + 1) % raw["vocab_size"]
    part = model(changed[:, s:], positions[:, s:], real, cache=cache, start=s)
    assert (part - model(changed, positions, real)[:, s:]).abs().max() > 1e-3
