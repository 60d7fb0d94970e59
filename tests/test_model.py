"""LLaDA forward pass checked against a deliberately naive re-implementation written here.

The reference below loops over batch rows and attention heads and spells out every formula
(RMSNorm, rotate-half RoPE from cos/sin per position and softmax attention from tests/naive.py,
SwiGLU under LLaDA's names here). It shares no code with `workers` or `kernels`, so a wrong
sign, a wrong head grouping or a skipped norm weight in the model makes the comparison fail.
Everything runs in float64 so the tolerance can be tight.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.naive import naive_attention_head, naive_rms_norm, naive_rope

F64 = torch.float64


# ---------------------------------------------------------------- naive reference


def naive_forward(model, input_ids, positions, key_mask=None) -> torch.Tensor:
    """Logits [B, L, vocab] computed from the model's parameters, one row and one head at a time."""
    cfg = model.config
    w = {name: p.detach() for name, p in model.named_parameters()}
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    B, L = input_ids.shape
    head_w = w[
        "model.transformer.wte.weight" if cfg.weight_tying else "model.transformer.ff_out.weight"
    ]
    out = []
    for b in range(B):
        pos = [int(p) for p in positions[b]]
        allowed = torch.ones(L, dtype=torch.bool) if key_mask is None else key_mask[b]
        x = w["model.transformer.wte.weight"][input_ids[b]]  # [L, d_model]
        for layer in range(cfg.n_layers):
            p = f"model.transformer.blocks.{layer}."
            h = naive_rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_norm_eps)
            q, k, v = (
                h @ w[p + "q_proj.weight"].T,
                h @ w[p + "k_proj.weight"].T,
                h @ w[p + "v_proj.weight"].T,
            )
            heads = []
            for hq in range(H):
                g = hq // (H // Hkv)  # the kv head this query head reads
                qh = naive_rope(q[:, hq * D : (hq + 1) * D], pos, cfg.rope_theta)
                kh = naive_rope(k[:, g * D : (g + 1) * D], pos, cfg.rope_theta)
                heads.append(naive_attention_head(qh, kh, v[:, g * D : (g + 1) * D], allowed))
            x = x + torch.cat(heads, dim=-1) @ w[p + "attn_out.weight"].T
            h = naive_rms_norm(x, w[p + "ff_norm.weight"], cfg.rms_norm_eps)
            gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "ff_out.weight"].T
        x = naive_rms_norm(x, w["model.transformer.ln_f.weight"], cfg.rms_norm_eps)
        out.append(x @ head_w[: cfg.vocab_size].T)
    return torch.stack(out)


# ---------------------------------------------------------------- configs

# (n_kv_heads, query heads per kv head, weight_tying, extra embedding rows): each case is a
# property the model must handle; the remaining sizes come from a seeded RNG so they are arbitrary
# but reproducible. Grouping needs n_kv_heads >= 2 to be tested: with a single kv head every
# query head reads it whichever way the heads are grouped.
CASES = [
    (3, 1, False, 0),  # n_kv_heads == n_heads, separate lm head, embedding_size == vocab_size
    (2, 3, True, 5),  # grouped kv, tied head, padded embedding
    (3, 2, False, 7),  # grouped kv, separate head, padded embedding
    (1, 4, True, 0),  # multi-query (one kv head), tied head
]


def random_raw_config(
    raw_config, seed: int, n_kv: int, groups: int, tying: bool, extra: int
) -> dict:
    rng = random.Random(seed)
    n_heads = n_kv * groups
    head_dim = rng.choice([4, 6, 8])  # >= 2 frequency pairs, so RoPE pairing and frequencies matter
    vocab = rng.randint(11, 37)
    return raw_config(
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        n_layers=rng.randint(1, 3),
        mlp_hidden_size=rng.randint(5, 40),
        vocab_size=vocab,
        embedding_size=vocab + extra,
        mask_token_id=vocab - 1,
        weight_tying=tying,
        rope_theta=rng.choice(
            [10.0, 500.0, 10000.0]
        ),  # small thetas rotate visibly at short lengths
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
    )


def test_cases_cover_the_required_shapes(raw_config):
    """Guard for the parametrisation: the configs really include grouped KV with several kv heads
    (so the grouping order matters), full KV, tied and untied heads, and embedding_size >
    vocab_size; otherwise the reference test would prove less than it claims."""
    cfgs = [random_raw_config(raw_config, i, *case) for i, case in enumerate(CASES)]
    assert any(1 < c["n_kv_heads"] < c["n_heads"] for c in cfgs)
    assert any(c["n_kv_heads"] == c["n_heads"] for c in cfgs)
    assert {c["weight_tying"] for c in cfgs} == {True, False}
    assert any(c["embedding_size"] > c["vocab_size"] for c in cfgs)
    assert all(c["d_model"] // c["n_heads"] >= 4 for c in cfgs)


@pytest.mark.parametrize("case_index", range(len(CASES)))
@pytest.mark.parametrize("length", [1, 7, 13])
def test_forward_matches_naive_reference(raw_config, make_model, case_index, length):
    """Logits equal the per-head reference in float64, with arbitrary per-row positions and a
    key mask that hides some keys (each row keeps at least one visible key)."""
    raw = random_raw_config(raw_config, case_index, *CASES[case_index])
    model = make_model(raw, seed=100 + case_index)
    gen = torch.Generator().manual_seed(length * 10 + case_index)
    B = 3
    ids = torch.randint(0, raw["vocab_size"], (B, length), generator=gen)
    positions = torch.arange(length)[None] + torch.randint(0, 50, (B, 1), generator=gen)
    key_mask = torch.rand(B, length, generator=gen) > 0.3
    key_mask[:, 0] = True

    for mask in (None, key_mask):
        got = model(ids, positions, mask)
        want = naive_forward(model, ids, positions, mask)
        assert got.shape == (B, length, raw["vocab_size"])
        assert got.dtype == F64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_reference_is_sensitive_to_the_weights(raw_config, make_model):
    """Sanity check of the setup: two different random models give clearly different logits,
    so agreement within 1e-10 above is not an artefact of tiny or saturated activations."""
    raw = random_raw_config(raw_config, 1, *CASES[1])
    ids = torch.randint(0, raw["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7).expand(2, 7)
    a = naive_forward(make_model(raw, seed=1), ids, pos)
    b = naive_forward(make_model(raw, seed=2), ids, pos)
    assert (a - b).abs().max() > 1e-2


# ---------------------------------------------------------------- padding


def test_left_padding_is_invisible_to_real_tokens(raw_config, make_model):
    """A left-padded batch gives each row's real positions the same logits as that row alone.

    Pad slots hold arbitrary (different) token ids and are masked out of the keys; positions
    start at 0 at each row's first real token. Fails if the key mask is ignored or misapplied.
    """
    raw = raw_config()
    model = make_model(raw, seed=7)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 9, 4]
    L = max(lengths)
    prompts = [torch.randint(0, raw["vocab_size"], (n,), generator=gen) for n in lengths]

    ids = torch.randint(0, raw["vocab_size"], (len(lengths), L), generator=gen)  # junk in the pads
    key_mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    positions = torch.zeros(len(lengths), L, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        pad = L - len(prompt)
        ids[row, pad:] = prompt
        key_mask[row, pad:] = True
        positions[row, pad:] = torch.arange(len(prompt))

    batched = model(ids, positions, key_mask)
    for row, prompt in enumerate(prompts):
        alone = model(prompt[None], torch.arange(len(prompt))[None], None)[0]
        torch.testing.assert_close(batched[row, L - len(prompt) :], alone, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- positions


def test_shifting_all_positions_leaves_logits_unchanged(raw_config, make_model):
    """RoPE encodes only relative offsets in q.k, so adding a constant to every position must
    not change the logits (fails e.g. if only q or only k is rotated, or with absolute terms)."""
    raw = raw_config(rope_theta=100.0)
    model = make_model(raw, seed=11)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, raw["vocab_size"], (2, 9), generator=gen)
    positions = torch.arange(9).expand(2, 9)
    base = model(ids, positions)
    for shift in (1, 37, 1000):
        torch.testing.assert_close(model(ids, positions + shift), base, rtol=0, atol=1e-9)


def test_token_order_matters_only_through_positions(raw_config, make_model):
    """Without positions, bidirectional attention is permutation-equivariant. So:
    - all positions equal: permuting the tokens permutes the logits exactly (control), and
    - positions 0..L-1: permuting the tokens changes the logits (fails if RoPE is skipped)."""
    raw = raw_config()
    model = make_model(raw, seed=5)
    gen = torch.Generator().manual_seed(6)
    L = 8
    ids = torch.randint(0, raw["vocab_size"], (1, L), generator=gen)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])

    same = torch.zeros(1, L, dtype=torch.long)
    torch.testing.assert_close(
        model(ids[:, perm], same), model(ids, same)[:, perm], rtol=0, atol=1e-10
    )

    ordered = torch.arange(L)[None]
    moved = model(ids[:, perm], ordered) - model(ids, ordered)[:, perm]
    assert moved.abs().max() > 1e-3
