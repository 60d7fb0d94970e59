"""Each decoder and cache policy of the engine against a straightforward re-implementation of its
published rule, written here one prompt at a time with Python lists (float64, greedy)."""

import math

import pytest
import torch

import dinfer_kernels as kernels
from dinfer_async import SamplingParams
from tests.tiny_models import random_prompts, tiny_model
from workers.scheduler import denoise

MASK, EOS = 39, 1


# ---- the rules, on one block's list of (position, confidence) of masked positions ----------


def rule_threshold(conf: dict[int, float], p) -> set[int]:
    best = max(conf, key=lambda i: (conf[i], -i))
    return {i for i, c in conf.items() if c >= p.threshold} | {best}


def rule_factor(conf: dict[int, float], p) -> set[int]:
    order = sorted(conf, key=lambda i: (-conf[i], i))
    n_best = 1
    for n in range(1, len(order) + 1):
        if (n + 1) * (1 - conf[order[n - 1]]) < p.factor:
            n_best = n
    return set(order[:n_best])


def rule_hierarchical(conf: dict[int, float], p) -> set[int]:
    chosen = rule_threshold(conf, p)
    run: list[int] = []
    for i in sorted(conf) + [None]:
        if run and (i is None or i != run[-1] + 1):
            best = max(run, key=lambda j: (conf[j], -j))
            if conf[best] >= p.low_threshold:
                chosen.add(best)
            run = []
        if i is not None:
            run.append(i)
    return chosen


# ---- a straightforward sampler: full forward every step, one prompt -------------------------


def model_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(x, torch.arange(len(ids))[None], None)[0].double()
    logits[:, MASK] = -math.inf
    return logits


def straightforward(model, prompt, p, rule, credit=False):
    x = prompt + [MASK] * p.gen_length
    P = len(prompt)
    for b in range(p.num_blocks):
        lo, hi = P + b * p.block_length, P + (b + 1) * p.block_length
        credits: dict[tuple[int, int], float] = {}
        while MASK in x[lo:hi]:
            logits = model_logits(model, x)
            masked = [i for i in range(lo, hi) if x[i] == MASK]
            if credit:
                for key in credits:
                    credits[key] *= p.credit_beta
                for i in masked:
                    probs = torch.softmax(logits[i], -1)
                    tok = int(probs.argmax())
                    credits[(i, tok)] = (
                        credits.get((i, tok), 0.0) + float(probs[tok]) ** p.credit_gamma
                    )
                for (i, tok), c in credits.items():
                    logits[i, tok] += p.credit_alpha * math.log1p(c)
            probs = {i: torch.softmax(logits[i], -1) for i in masked}
            conf = {i: float(probs[i].max()) for i in masked}
            for i in rule(conf, p):
                x[i] = int(probs[i].argmax())
    return x[P:]


CASES = {
    "threshold": (rule_threshold, dict(threshold=0.2)),
    "factor": (rule_factor, dict(factor=2.5)),
    "hierarchical": (rule_hierarchical, dict(threshold=0.5, low_threshold=0.15)),
    "credit": (
        rule_threshold,
        dict(threshold=0.3, credit_alpha=0.9, credit_gamma=0.4, credit_beta=0.7),
    ),
}


@pytest.mark.parametrize("decoder", sorted(CASES))
def test_decoder_equals_its_published_rule(decoder):
    rule, extra = CASES[decoder]
    model = tiny_model(21, std=0.7)
    prompts = random_prompts(21, [5, 2, 8], 39, MASK)
    p = SamplingParams(
        gen_length=16, block_length=8, decoder=decoder, cache="none", early_stop=False, **extra
    ).validate()
    engine = [s.window for s in denoise(model, prompts, p, [0, 0, 0])]
    expected = [straightforward(model, q, p, rule, credit=decoder == "credit") for q in prompts]
    assert engine == expected
    forwards = [s.forwards for s in denoise(model, prompts, p, [0, 0, 0])]
    assert max(forwards) < p.gen_length, "the rule should commit several tokens in some step"


# ---- KV caches: Fast-dLLM's prefix and dual cache, dInfer's vicinity refresh ------------------


def forward_with_stale_keys(model, ids, fresh_lo, fresh_hi, stale):
    """Logits of positions [fresh_lo, fresh_hi): they attend over the keys/values `stale` (per
    layer, from the block's refresh) with their own freshly computed ones in place. Written out
    layer by layer with the model's weights."""
    blocks = model.model.transformer["blocks"]
    cfg = model.config
    positions = torch.arange(fresh_lo, fresh_hi)[None]
    cos, sin = model.rotary(positions, torch.float64)
    x = model.embed(torch.tensor([ids[fresh_lo:fresh_hi]]))
    for layer, blk in enumerate(blocks):
        h = blk.attn_norm(x)
        n = fresh_hi - fresh_lo
        q = blk.q_proj(h).view(1, n, cfg.n_heads, -1).transpose(1, 2)
        k = blk.k_proj(h).view(1, n, cfg.n_kv_heads, -1).transpose(1, 2)
        v = blk.v_proj(h).view(1, n, cfg.n_kv_heads, -1).transpose(1, 2)
        rot = lambda t: (
            t * cos + torch.cat([-t[..., t.shape[-1] // 2 :], t[..., : t.shape[-1] // 2]], -1) * sin
        )
        q, k = rot(q), rot(k)
        K, V = stale[layer][0].clone(), stale[layer][1].clone()
        K[:, :, fresh_lo:fresh_hi], V[:, :, fresh_lo:fresh_hi] = k, v
        group = cfg.n_heads // cfg.n_kv_heads
        K, V = K.repeat_interleave(group, 1), V.repeat_interleave(group, 1)
        att = torch.softmax(q @ K.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ V
        x = x + blk.attn_out(att.transpose(1, 2).reshape(1, n, -1))
        h = blk.ff_norm(x)
        x = x + blk.ff_out(torch.nn.functional.silu(blk.ff_proj(h)) * blk.up_proj(h))
    logits = torch.nn.functional.linear(
        model.model.transformer["ln_f"](x), model.lm_head_weight[: cfg.vocab_size]
    )
    logits = logits[0].double()
    logits[:, MASK] = -math.inf
    return logits


def refresh(model, ids):
    """Full forward capturing every layer's post-RoPE keys and values."""
    captured = []

    class Capture:
        def attention(self, layer, q, k, v, start, key_mask):
            captured.append((k.clone(), v.clone()))
            return kernels.reference.attention(q, k, v, key_mask)

    model(torch.tensor([ids]), torch.arange(len(ids))[None], None, cache=Capture(), start=0)
    return captured


def cached_straightforward(model, prompt, p):
    """Threshold decoding with a cache refreshed at each block start (Fast-dLLM / dInfer)."""
    x = prompt + [MASK] * p.gen_length
    P, L = len(prompt), len(x)
    for b in range(p.num_blocks):
        lo, hi = P + b * p.block_length, P + (b + 1) * p.block_length
        stale = refresh(model, x)
        first = True
        while MASK in x[lo:hi]:
            if first:
                logits = model_logits(model, x)[lo:hi]
                first = False
            elif p.cache == "prefix":
                logits = forward_with_stale_keys(model, x, lo, L, stale)[: hi - lo]
            elif p.cache == "dual":
                logits = forward_with_stale_keys(model, x, lo, hi, stale)
            else:  # vicinity
                a, z = max(0, lo - p.prefix_look), min(L, hi + p.after_look)
                logits = forward_with_stale_keys(model, x, a, z, stale)[lo - a : hi - a]
            masked = [i for i in range(lo, hi) if x[i] == MASK]
            probs = {i: torch.softmax(logits[i - lo], -1) for i in masked}
            conf = {i: float(probs[i].max()) for i in masked}
            for i in rule_threshold(conf, p):
                x[i] = int(probs[i].argmax())
    return x[P:]


@pytest.mark.parametrize(
    "cache,look", [("prefix", 0), ("dual", 0), ("vicinity", 3), ("vicinity", 0)]
)
def test_cache_equals_straightforward_stale_key_decoding(cache, look):
    model = tiny_model(22, std=0.7)
    prompts = random_prompts(22, [6, 3, 9], 39, MASK)
    p = SamplingParams(
        gen_length=24,
        block_length=8,
        cache=cache,
        threshold=0.7,
        early_stop=False,
        prefix_look=look,
        after_look=look + 1,
    ).validate()
    engine = [s.window for s in denoise(model, prompts, p, [0, 0, 0])]
    expected = [cached_straightforward(model, q, p) for q in prompts]
    assert engine == expected
    no_cache = SamplingParams(
        gen_length=24, block_length=8, cache="none", threshold=0.7, early_stop=False
    ).validate()
    uncached = [s.window for s in denoise(model, prompts, no_cache, [0, 0, 0])]
    assert uncached != engine, (
        "stale keys should change some token here, or the test proves nothing"
    )


def test_soft_diffusion_feeds_mixed_embeddings():
    """With soft_diffusion the second step's input for a still-masked position is
    E[mask] + w * softmax(logits) @ E (w = 0.15 at step 0): checked through a recording model."""
    model = tiny_model(23, std=0.7)
    prompt = random_prompts(23, [5], 39, MASK)[0]
    p = SamplingParams(
        gen_length=8,
        block_length=8,
        cache="none",
        threshold=0.99,
        early_stop=False,
        soft_diffusion=True,
    ).validate()
    seen = []
    original = model.forward

    def recording(ids, positions, key_mask=None, inputs_embeds=None, **kwargs):
        seen.append((ids.clone(), None if inputs_embeds is None else inputs_embeds.clone()))
        return original(ids, positions, key_mask, inputs_embeds=inputs_embeds, **kwargs)

    model.forward = recording
    denoise(model, [prompt], p, [0])
    assert seen[0][1] is None and seen[1][1] is not None
    ids0 = seen[0][0]
    logits = original(ids0, torch.arange(13)[None], torch.ones(1, 13, dtype=torch.bool))[
        0, 5:
    ].double()
    logits[:, MASK] = -math.inf
    E = model.embed_weight
    mixed = E[MASK] + 0.15 * torch.softmax(logits, -1) @ E[:40]
    ids1, emb1 = seen[1]
    still = ids1[0, 5:] == MASK
    assert still.any() and (~still).any()
    torch.testing.assert_close(emb1[0, 5:][still], mixed[still], rtol=0, atol=1e-12)
    torch.testing.assert_close(emb1[0, 5:][~still], E[ids1[0, 5:][~still]], rtol=0, atol=0)
    torch.testing.assert_close(emb1[0, :5], E[ids1[0, :5]], rtol=0, atol=0)
